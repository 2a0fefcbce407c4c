"""Mirrored networking: the VM wears the host's address, so the outside network sees
the VM's connections come from the host.

Run it with ``pytest examples/test_mirrored.py`` as root.
"""

import socket
import threading


def test_the_outside_sees_the_host_address(hns_sandbox, mirrored_vm):
    addresses = mirrored_vm.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert f"inet {hns_sandbox.uplink_ip}/" in addresses

    server = hns_sandbox.outside.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((hns_sandbox.outside_ip, 7000))
    server.listen()
    seen = []

    def accept_once():
        conn, peer = server.accept()
        seen.append(peer[0])
        conn.close()

    thread = threading.Thread(target=accept_once)
    thread.start()
    client = mirrored_vm.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.settimeout(10)
    client.connect((hns_sandbox.outside_ip, 7000))
    client.close()
    thread.join(timeout=30)
    server.close()
    assert seen == [hns_sandbox.uplink_ip]
