"""One sandbox for a whole session, and waiting for things without sleeping.

Run it with ``pytest examples/test_session_and_waiting.py`` as root.
"""

import sys

import pytest

from hns.testing import wait_port, wait_until


@pytest.fixture(scope="module")
def echo_vm(hns_session_sandbox):
    """A VM with a UDP echo server, made once for the tests of this module."""
    sandbox = hns_session_sandbox
    if not any(net.name == "lab" for net in sandbox.service.list_networks()):
        sandbox.service.create_network("lab", "nat")
    vm = sandbox.vm("echo", "lab")
    vm.popen([sys.executable, "-c",
              "import socket\n"
              "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              "s.bind(('0.0.0.0', 7))\n"
              "while True:\n"
              "    data, peer = s.recvfrom(2048)\n"
              "    s.sendto(data, peer)\n"])
    wait_port(vm, vm.ip, 7, protocol="udp")
    yield vm
    vm.stop_processes()
    sandbox.service.delete_vm("echo")


def test_the_host_reaches_the_echo_server(hns_session_sandbox, echo_vm):
    result = hns_session_sandbox.host.run(
        ["socat", "-T", "5", "-", f"UDP:{echo_vm.ip}:7"], input="hello\n")
    assert result.stdout == "hello\n"


def test_the_same_vm_in_the_next_test(hns_session_sandbox, echo_vm):
    assert echo_vm.name in [vm.name for vm in hns_session_sandbox.service.list_vms()]


def test_wait_until_a_condition(nat_vm, tmp_path):
    done = tmp_path / "pinged"
    # a job in the VM that takes a while: three pings of its gateway, then a file
    nat_vm.popen(["sh", "-c", f"ping -c3 -i0.2 {nat_vm.gateway} > {done}.tmp && "
                              f"mv {done}.tmp {done}"])
    # wait_until returns the predicate's first true value; TimeoutError names `what`
    text = wait_until(lambda: done.exists() and done.read_text(), timeout=10,
                      what="the VM's pings")
    assert "3 received" in text
