"""The userspace data plane of hns, a library: the event loop and relay engine
(:mod:`portproxy.loop`, :mod:`portproxy.engine`; TCP with splice, UDP flows, their sans-IO state in
:mod:`portproxy.tcp` and :mod:`portproxy.udp`), the port tracker (:mod:`portproxy.tracker`,
sock_diag), dialing into a namespace (:mod:`portproxy.vmdial`) and the DNS proxy server
(:mod:`portproxy._dnsio`, :mod:`portproxy.dnsstate`, :mod:`portproxy.dnsmsg`).  It takes
plain values and callbacks; the daemon that wires it to the state is :mod:`hns.daemon`.
"""
