"""The userspace data plane of hns: relay engine, static port proxies, port tracker and
localhost forwarder, and the daemon that runs them.  Not built yet: NAT mode (the
``hns`` control plane and the ``nat`` package) works without it.
"""
