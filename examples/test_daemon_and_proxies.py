"""A web server in a VM, reached from the outside network two ways: through a WSL port
mapping (NAT, kernel) and through a netsh-style port proxy (the hns daemon, userspace).

Run it with ``pytest examples/test_daemon_and_proxies.py`` as root.
"""

from hns.testing import wait_port


def serve_name(vm, port):
    """A web server (socat) in the VM answering every request with the VM's name; it
    reads the request up to its blank line first (closing on unread data would reset
    the connection)."""
    answer = f"sed -n /^.$/q; echo HTTP/1.0 200 OK; echo; echo {vm.name}"
    vm.popen(["socat", f"TCP-LISTEN:{port},reuseaddr,fork", f"SYSTEM:{answer}"])
    wait_port(vm, vm.ip, port)          # until it accepts connections


def curl(peer, url):
    return peer.run(["curl", "-sS", "--max-time", "10", url])


def test_port_mapping(hns_sandbox, nat_vm, port_mapping):
    serve_name(nat_vm, 80)
    port_mapping(nat_vm, 8080, 80)      # host tcp/8080 -> vm0:80, removed after the test
    result = curl(hns_sandbox.outside, f"http://{hns_sandbox.uplink_ip}:8080/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "vm0\n"


def test_port_proxy(hns_sandbox, nat_vm, hns_daemon, portproxy):
    serve_name(nat_vm, 8000)
    # netsh interface portproxy add v4tov4 listenport=9000 connectaddress=<vm> connectport=8000
    relay = portproxy(9000, nat_vm, 8000)
    assert relay["State"] == "listening"
    result = curl(hns_sandbox.outside, f"http://{hns_sandbox.uplink_ip}:9000/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "vm0\n"
    assert hns_daemon.status()["Running"] is True
