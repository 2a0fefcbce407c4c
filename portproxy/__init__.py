"""The userspace data plane of hns: the relay engine (:mod:`portproxy.engine`), static
port proxies in netsh's words (:mod:`portproxy.netsh`, :mod:`portproxy.config`), the DNS
proxy on the NAT gateways (:mod:`portproxy.dns`) and the daemon that serves them
(:mod:`portproxy.daemon`).  The port tracker and the localhost
forwarder are not built yet.
"""
