"""A server in a VM behind a WSL-style NAT, a client outside: what does the server see?

Run it with ``pytest examples/test_example.py`` as root after ``pip install`` of hns.
It uses only the documented fixtures of the hns pytest plugin.
"""

import socket
import threading


def test_outside_server_sees_the_host_address(hns_sandbox, nat_vm):
    # a server on the outside network, written with plain sockets
    server = hns_sandbox.outside.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((hns_sandbox.outside_ip, 8080))
    server.listen()
    seen = []

    def serve_once():
        conn, peer = server.accept()
        with conn:
            seen.append(peer[0])
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello from outside\n")
            conn.recv(4096)

    thread = threading.Thread(target=serve_once)
    thread.start()
    # a real client inside the VM
    result = nat_vm.run(["curl", "-sS", "--max-time", "10",
                         f"http://{hns_sandbox.outside_ip}:8080/"])
    thread.join(timeout=30)
    server.close()

    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from outside\n"
    assert seen == [hns_sandbox.uplink_ip]  # masqueraded to the host's uplink address


def test_server_in_the_vm_reached_from_a_second_vm(make_vm):
    server_vm, client_vm = make_vm("server"), make_vm("client")
    listener = server_vm.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((server_vm.ip, 9000))
    listener.listen()

    client = client_vm.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.settimeout(10)
    client.connect((server_vm.ip, 9000))
    conn, peer = listener.accept()
    conn.sendall(b"pong")
    assert client.recv(4) == b"pong"
    assert peer[0] == client_vm.ip  # same network: no NAT between VMs
    for s in (conn, client, listener):
        s.close()
