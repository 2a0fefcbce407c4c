"""netsh portproxy words, the proxy configuration in the store (no root, no kernel)."""

from __future__ import annotations

import sqlite3
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from hns.daemon.config import ProxyConfig
from hns.daemon.netsh import PortProxy, ProxyKey, conflicts, loop_of, parse_add, parse_delete
from hns.errors import AlreadyExists, Conflict, InvalidRequest
from hns.store import Store


def test_defaults_are_netsh_s() -> None:
    p = parse_add("v4tov4", ["listenport=8080", "connectaddress=172.16.0.2"])
    assert p == PortProxy("v4tov4", "tcp", IPv4Address("0.0.0.0"), 8080,
                          IPv4Address("172.16.0.2"), 8080)
    v6 = parse_add("V6toV6", ["ListenPort=53", "protocol=UDP"])
    assert v6.listen_address == IPv6Address("::") and v6.connect_address == IPv6Address("::1")
    assert v6.protocol == "udp" and v6.connect_port == 53 and v6.kind == "v6tov6"


def test_every_word_in_any_order() -> None:
    p = parse_add("v6tov4", ["connectport=80", "connectaddress=10.0.0.5", "protocol=tcp",
                             "listenaddress=[2001:db8::1]", "listenport=8080"])
    assert p.listen_address == IPv6Address("2001:db8::1") and p.listen_port == 8080
    assert p.connect_address == IPv4Address("10.0.0.5") and p.connect_port == 80
    assert p.name == "portproxy v6tov4 tcp [2001:db8::1]:8080"
    assert p.to_json() == {"Type": "v6tov4", "Protocol": "tcp", "ListenAddress": "2001:db8::1",
                           "ListenPort": 8080, "ConnectAddress": "10.0.0.5",
                           "ConnectPort": 80, "IdleTimeout": 0, "MaxConnections": 4096,
                           "Mode": "auto"}


@pytest.mark.parametrize("kind, words", [
    ("v4tov5", ["listenport=1"]),
    ("v4tov4", []),
    ("v4tov4", ["connectaddress=10.0.0.1"]),
    ("v4tov4", ["listenport=0"]),
    ("v4tov4", ["listenport=65536"]),
    ("v4tov4", ["listenport=http"]),
    ("v4tov4", ["listenport=-1"]),
    ("v4tov4", ["listenport=80", "connectport=99999"]),
    ("v4tov4", ["listenport=80", "listenaddress=::1"]),
    ("v4tov6", ["listenport=80", "connectaddress=10.0.0.1"]),
    ("v4tov4", ["listenport=80", "connectaddress=example.com"]),
    ("v4tov4", ["listenport=80", "connectaddress=0.0.0.0"]),
    ("v4tov4", ["listenport=80", "connectaddress=224.0.0.1"]),
    ("v4tov4", ["listenport=80", "protocol=sctp"]),
    ("v4tov4", ["listenport=80", "listenport=81"]),
    ("v4tov4", ["listenport=80", "color=blue"]),
    ("v4tov4", ["listenport"]),
    ("v4tov4", ["listenport="]),
    ("v4tov4", ["listenport=80", "idletimeout=-1"]),
    ("v4tov4", ["listenport=80", "idletimeout=1.5"]),
    ("v4tov4", ["listenport=80", "idletimeout=\u0663"]),
    ("v4tov4", ["listenport=80", "idletimeout=99999999999"]),
    ("v4tov4", ["listenport=80", "maxconnections=0"]),
    ("v4tov4", ["listenport=80", "maxconnections=²"]),
    ("v4tov4", ["listenport=80", "maxconnections=2000000"]),
    ("v4tov4", ["listenport=80", "maxconnections=many"]),
])
def test_bad_words_are_refused(kind: str, words: list[str]) -> None:
    with pytest.raises(InvalidRequest):
        parse_add(kind, words)


def test_delete_words() -> None:
    kind, key = parse_delete("v4tov4", ["listenport=8080"])
    assert (kind, key) == ("v4tov4", ProxyKey("tcp", "0.0.0.0", 8080))
    _, key = parse_delete("v6tov6", ["listenport=53", "listenaddress=::1", "protocol=udp"])
    assert key == ProxyKey("udp", "::1", 53)
    with pytest.raises(InvalidRequest):
        parse_delete("v4tov4", ["listenport=1", "connectport=2"])


def test_conflicts_follow_bind_rules() -> None:
    wild = parse_add("v4tov4", ["listenport=80", "connectaddress=10.0.0.1"])
    one = parse_add("v4tov4", ["listenport=80", "listenaddress=10.9.0.1",
                               "connectaddress=10.0.0.1"])
    other = parse_add("v4tov4", ["listenport=80", "listenaddress=10.9.0.2",
                                 "connectaddress=10.0.0.1"])
    udp = parse_add("v4tov4", ["listenport=80", "protocol=udp", "connectaddress=10.0.0.1"])
    v6 = parse_add("v6tov4", ["listenport=80", "connectaddress=10.0.0.1"])
    assert conflicts(one, [wild]) == wild and conflicts(wild, [one]) == one
    assert conflicts(other, [one]) is None
    assert conflicts(udp, [wild]) is None and conflicts(v6, [wild, udp]) is None


@pytest.fixture
def config(tmp_path: Path) -> ProxyConfig:
    return ProxyConfig(Store(tmp_path))


def test_config_add_list_delete_reset(config: ProxyConfig) -> None:
    a = parse_add("v4tov4", ["listenport=80", "connectaddress=10.0.0.1"])
    b = parse_add("v6tov4", ["listenport=53", "protocol=udp", "connectaddress=10.0.0.1"])
    config.add(a)
    config.add(b)
    assert config.list() == [a, b]
    with pytest.raises(AlreadyExists):
        config.add(a)
    with pytest.raises(Conflict):
        config.add(parse_add("v4tov4", ["listenport=80", "listenaddress=10.1.1.1"]))
    changed = parse_add("v4tov4", ["listenport=80", "connectaddress=10.0.0.2"])
    config.add(changed, replace=True)
    assert config.list() == [changed, b]
    assert not config.delete("v4tov6", a.key)  # the type must match, as in netsh
    assert config.delete("v4tov4", a.key) and not config.delete("v4tov4", a.key)
    assert config.reset() == 1 and config.list() == []


def test_data_version_moves_when_another_connection_commits(tmp_path: Path) -> None:
    reader = ProxyConfig(Store(tmp_path))
    writer = ProxyConfig(Store(tmp_path))
    before = reader.data_version()
    writer.add(parse_add("v4tov4", ["listenport=80", "connectaddress=10.0.0.1"]))
    assert reader.data_version() != before
    assert len(reader.list()) == 1


def test_idle_timeout_and_connection_cap_words() -> None:
    p = parse_add("v4tov4", ["listenport=80", "connectaddress=10.0.0.1", "IdleTimeout=30",
                             "maxconnections=100"])
    assert (p.idle_timeout, p.max_connections) == (30, 100)
    d = parse_add("v4tov4", ["listenport=80", "connectaddress=10.0.0.1"])
    assert (d.idle_timeout, d.max_connections) == (0, 4096)   # never, and the default cap
    assert parse_add("v4tov4", ["listenport=80", "idletimeout=0"]).idle_timeout == 0


def words(*text: str) -> PortProxy:
    kind, *rest = text
    return parse_add(kind, list(rest))


LOCAL: frozenset[IPv4Address | IPv6Address] = frozenset(
    {IPv4Address("198.51.100.2"), IPv6Address("2001:db8:100::2")})


@pytest.mark.parametrize("proxy", [
    ("v4tov4", "listenport=80"),                                      # netsh's defaults
    ("v4tov4", "listenport=80", "connectaddress=127.0.0.5"),         # all of 127/8 is local
    ("v4tov4", "listenport=80", "connectaddress=198.51.100.2"),      # a host address
    ("v4tov4", "listenport=81", "listenaddress=198.51.100.2", "connectaddress=198.51.100.2"),
    ("v4tov4", "listenport=82", "connectport=82"),
    ("v6tov6", "listenport=80"),
    ("v6tov6", "listenport=80", "connectaddress=2001:db8:100::2"),
    ("v4tov4", "listenport=53", "protocol=udp"),
])
def test_a_proxy_to_its_own_socket_is_a_loop(proxy: tuple[str, ...]) -> None:
    new = words(*proxy)
    assert loop_of(new, [], LOCAL) == [new]


@pytest.mark.parametrize("proxy", [
    ("v4tov4", "listenport=80", "connectport=81"),                   # another port
    ("v4tov4", "listenport=80", "connectaddress=198.51.100.9"),      # not local
    ("v4tov4", "listenport=80", "listenaddress=127.0.0.1", "connectaddress=127.0.0.2"),
    ("v6tov4", "listenport=80"),                                      # listens v6, dials v4
    ("v4tov6", "listenport=80"),
    ("v6tov6", "listenport=80", "connectaddress=::ffff:127.0.0.1"),  # reaches v4 80
])
def test_what_is_not_a_loop(proxy: tuple[str, ...]) -> None:
    assert loop_of(words(*proxy), [], LOCAL) is None


def test_a_v4_mapped_connect_address_reaches_the_v4_listener() -> None:
    v4 = words("v4tov4", "listenport=80", "connectaddress=10.0.0.1")
    back = words("v6tov6", "listenport=8080", "connectaddress=::ffff:127.0.0.1",
                 "connectport=80")
    v4_back = words("v4tov6", "listenport=80", "connectaddress=::1", "connectport=8080")
    assert loop_of(back, [v4_back], LOCAL) == [back, v4_back]
    assert loop_of(back, [v4], LOCAL) is None


def test_a_loop_through_other_proxies_and_a_chain_that_ends() -> None:
    a = words("v4tov4", "listenport=8080", "connectport=8081")
    b = words("v4tov4", "listenport=8081", "listenaddress=127.0.0.1",
              "connectaddress=198.51.100.2", "connectport=8082")
    c_loop = words("v6tov4", "listenport=8082", "connectport=8080")   # v4 8082 is free
    c_back = words("v4tov4", "listenport=8082", "connectport=8080")
    c_out = words("v4tov4", "listenport=8082", "connectaddress=172.16.0.2")
    assert loop_of(c_loop, [a, b], LOCAL) is None       # nothing listens on v4 8082
    assert loop_of(c_back, [a, b], LOCAL) == [c_back, a, b]
    assert loop_of(a, [b, c_back], LOCAL) == [a, b, c_back]
    assert loop_of(c_out, [a, b], LOCAL) is None
    assert loop_of(a, [b, c_out], LOCAL) is None        # a -> b -> c -> a VM: a chain
    # a loop of others that the new proxy only leads into is not the new proxy's loop
    x = words("v4tov4", "listenport=9000", "connectport=9001")
    y = words("v4tov4", "listenport=9001", "connectport=9000")
    lead = words("v4tov4", "listenport=9002", "connectport=9000")
    assert loop_of(lead, [x, y], LOCAL) is None
    # set replaces the proxy of the same key: its old target does not count
    assert loop_of(words("v4tov4", "listenport=8080", "connectaddress=10.0.0.1"),
                   [a, b, c_back], LOCAL) is None


def test_config_refuses_a_loop_and_keeps_the_new_columns(config: ProxyConfig) -> None:
    with pytest.raises(InvalidRequest, match="its own listening socket"):
        config.add(parse_add("v4tov4", ["listenport=80"]))
    a = parse_add("v4tov4", ["listenport=80", "connectport=81", "idletimeout=5",
                             "maxconnections=7"])
    config.add(a)
    with pytest.raises(InvalidRequest, match="back to itself through"):
        config.add(parse_add("v4tov4", ["listenport=81", "connectport=80"]))
    config.add(parse_add("v4tov4", ["listenport=81", "connectaddress=10.0.0.1"]))
    assert config.list()[0] == a and (a.idle_timeout, a.max_connections) == (5, 7)


def test_an_older_table_gets_the_new_columns(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "hns.db") as db:   # a store made before the columns
        db.execute("CREATE TABLE port_proxies (protocol TEXT NOT NULL, listen_address TEXT "
                   "NOT NULL, listen_port INTEGER NOT NULL, kind TEXT NOT NULL, "
                   "connect_address TEXT NOT NULL, connect_port INTEGER NOT NULL, "
                   "PRIMARY KEY (protocol, listen_address, listen_port))")
        db.execute("INSERT INTO port_proxies VALUES ('tcp', '0.0.0.0', 80, 'v4tov4', "
                   "'10.0.0.1', 80)")
    store = Store(tmp_path)
    (old,) = ProxyConfig(store).list()
    assert (old.idle_timeout, old.max_connections) == (0, 4096)
    assert ProxyConfig(Store(tmp_path)).list() == [old]     # opening again changes nothing


# -- the daemon's lock (a file in the state directory) ---------------------------------


def test_one_daemon_lock_per_state_directory(tmp_path: Path) -> None:
    import fcntl
    import os

    from hns.daemon.daemon import AlreadyRunning, DaemonLock

    first, second = DaemonLock(tmp_path), DaemonLock(tmp_path)
    first.acquire()
    assert (tmp_path / "daemon.lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(AlreadyRunning, match=rf"already serves {tmp_path} \(pid {os.getpid()}\)"):
        second.acquire()
    first.release()
    assert (tmp_path / "daemon.lock").read_text() == ""
    second.acquire()
    second.release()
    fd = os.open(tmp_path / "daemon.lock", os.O_RDWR)     # a holder that wrote no pid yet
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(AlreadyRunning, match=r"\(pid unknown\)"):
            DaemonLock(tmp_path).acquire(tries=3)
    finally:
        os.close(fd)
