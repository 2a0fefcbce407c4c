"""The one-of-each helpers: host:port text, the socket opener, resolv.conf reading, the
table printer."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address

import pytest

from hns.output import print_table
from portproxy.addresses import endpoint
from portproxy.resolvconf import entries, nameservers
from portproxy.sockets import listen


def test_endpoint_brackets_ipv6_only() -> None:
    assert endpoint("10.0.0.1", 80) == "10.0.0.1:80"
    assert endpoint(IPv4Address("127.0.0.1"), 53) == "127.0.0.1:53"
    assert endpoint("::1", 8080) == "[::1]:8080"
    assert endpoint(IPv6Address("2001:db8::5"), 1) == "[2001:db8::5]:1"


def test_tcp_listeners_reuse_the_address_udp_sockets_never() -> None:
    tcp = listen(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", 0)
    udp = listen(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", 0)
    six = listen(socket.AF_INET6, socket.SOCK_DGRAM, "::1", 0)
    try:
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert udp.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
        assert six.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert not tcp.getblocking() and not udp.getblocking()
        assert tcp.get_inheritable() is False
    finally:
        for sock in (tcp, udp, six):
            sock.close()


def test_a_port_in_use_is_an_oserror_and_leaves_nothing_open() -> None:
    taken = listen(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            listen(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_resolv_conf_entries_skip_comments_and_blank_lines() -> None:
    text = ("# generated\n\nnameserver 10.0.0.53 # office\n; old\n  nameserver\t::1\n"
            "nameserver\nsearch example.test lan\noptions edns0\n")
    assert list(entries(text)) == [
        ("nameserver", ["10.0.0.53", "#", "office"]), ("nameserver", ["::1"]),
        ("nameserver", []), ("search", ["example.test", "lan"]), ("options", ["edns0"])]
    assert nameservers(text) == ["10.0.0.53", "::1"]


def test_tables_pad_each_column_to_its_widest_cell(capsys: pytest.CaptureFixture[str]) -> None:
    print_table([("a", 1), ("longer", 22)], ("NAME", "N"))
    assert capsys.readouterr().out == "NAME    N\na       1\nlonger  22\n"
