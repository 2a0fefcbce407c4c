"""The daemon: the control plane that wires portproxy's data plane to the state.

It serves the static port proxies (:mod:`hns.daemon.netsh` words, kept by
:mod:`hns.daemon.config`, bound by :mod:`hns.daemon.proxies`), localhost forwarding
(:mod:`hns.daemon.forwarder`, planned by :mod:`hns.daemon.forward_plan`), the ports of
mirrored networks (:mod:`hns.daemon.mirror`, :mod:`hns.daemon.mirror_plan`) and the DNS
proxy on the gateways (:mod:`hns.daemon.dns`), all on one relay engine of
:mod:`portproxy`; :mod:`hns.daemon.daemon` runs them, :mod:`hns.daemon.control` is its
control socket, :mod:`hns.daemon.cli` the ``hnsctl`` commands that talk to it.
"""
