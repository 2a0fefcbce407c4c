"""``netsh interface portproxy`` words, parsed into static port proxies.  Pure.

netsh's grammar: ``add|set|delete v4tov4|v4tov6|v6tov4|v6tov6 key=value ...``, keywords
case-insensitive, in any order.  Defaults as netsh: ``listenaddress`` = every address of
the listen family, ``connectport`` = ``listenport``, ``connectaddress`` = this computer
(the loopback address of the connect family), ``protocol`` = tcp.  UDP goes beyond netsh,
and so do ``idletimeout=SECONDS`` (0, the default: never; for UDP, the flow timeout
instead of the engine's) and ``maxconnections=N`` (live connections or flows per
listener, default 4096).  Addresses must be IP literals: names are not resolved when a
proxy is configured.

:func:`parse_netsh` takes the words of a whole ``netsh interface portproxy ...`` command
line as pasted from Windows (``interface`` or ``int``, then ``portproxy``, a verb, a type;
values may be positional, in netsh's order, before any ``key=value``; ``localhost``
stands for the loopback address of its side's family) and names every value, so the same
:func:`parse_add` / :func:`parse_delete` check them.  :func:`render_show` prints proxies
in ``netsh interface portproxy show``'s layout.

:func:`loop_of` finds the proxies through which a new one would connect back to its own
listening socket (its connect address:port served by itself, or by a chain of others).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import Any

from hns.errors import InvalidRequest
from portproxy.addresses import endpoint

__all__ = ["DEFAULT_MAX_CONNECTIONS", "KINDS", "MODES", "NetshCommand", "PortProxy",
           "ProxyKey", "conflicts", "kernel_refusal", "loop_of", "parse_add", "parse_delete",
           "parse_netsh", "render_show"]

IPAddress = IPv4Address | IPv6Address
KINDS = ("v4tov4", "v4tov6", "v6tov4", "v6tov6")
PROTOCOLS = ("tcp", "udp")
ADD_KEYS = {"listenport", "listenaddress", "connectaddress", "connectport", "protocol",
            "idletimeout", "maxconnections", "mode"}
MODES = ("auto", "kernel", "relay")
DEFAULT_MAX_CONNECTIONS = 4096
MAX_IDLE_TIMEOUT = 365 * 86400     # seconds
MAX_CONNECTIONS = 1 << 20
DELETE_KEYS = {"listenport", "listenaddress", "protocol"}
# netsh's positional order (its documented syntax of add/set and of delete)
ADD_ORDER = ("listenport", "connectaddress", "connectport", "listenaddress", "protocol")
DELETE_ORDER = ("listenport", "listenaddress", "protocol")
NETSH_CONTEXTS = ("interface", "int")       # what Microsoft's own examples write
NETSH_VERBS = ("add", "set", "delete", "show", "reset")
NETSH_SYNTAX = "interface portproxy add|set|delete|show|reset ..."


@dataclass(frozen=True, order=True)
class ProxyKey:
    """What identifies a proxy: one listening socket."""

    protocol: str
    listen_address: str
    listen_port: int


@dataclass(frozen=True)
class PortProxy:
    kind: str
    protocol: str
    listen_address: IPAddress
    listen_port: int
    connect_address: IPAddress
    connect_port: int
    idle_timeout: int = 0                          # seconds; 0: never (TCP)
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    mode: str = "auto"                             # the path: auto, kernel or relay

    @property
    def key(self) -> ProxyKey:
        return ProxyKey(self.protocol, str(self.listen_address), self.listen_port)

    @property
    def listen_family(self) -> int:
        return self.listen_address.version

    @property
    def name(self) -> str:
        return (f"portproxy {self.kind} {self.protocol} "
                f"{endpoint(self.listen_address, self.listen_port)}")

    def to_json(self) -> dict[str, Any]:
        return {
            "Type": self.kind,
            "Protocol": self.protocol,
            "ListenAddress": str(self.listen_address),
            "ListenPort": self.listen_port,
            "ConnectAddress": str(self.connect_address),
            "ConnectPort": self.connect_port,
            "IdleTimeout": self.idle_timeout,
            "MaxConnections": self.max_connections,
            "Mode": self.mode,
        }


def _words(args: Sequence[str], allowed: set[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.strip().lower()
        if not sep or not value:
            raise InvalidRequest(f"expected key=value, got {arg!r}")
        if key not in allowed:
            raise InvalidRequest(f"unknown parameter {key!r} (known: "
                                 f"{', '.join(sorted(allowed))})")
        if key in found:
            raise InvalidRequest(f"parameter {key!r} given twice")
        found[key] = value.strip()
    return found


def _kind(text: str) -> tuple[int, int]:
    kind = text.lower()
    if kind not in KINDS:
        raise InvalidRequest(f"unknown proxy type {text!r} (choose from: {', '.join(KINDS)})")
    return int(kind[1]), int(kind[-1])


def _port(text: str, what: str) -> int:
    # ASCII digits only: str.isdigit() and int() also take '²' and other scripts' digits
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
        raise InvalidRequest(f"invalid {what} {text!r}: a port number from 1 to 65535")
    return int(text)


def _number(text: str, what: str, low: int, high: int, unit: str) -> int:
    if not re.fullmatch(r"[0-9]{1,10}", text) or not low <= int(text) <= high:
        raise InvalidRequest(f"invalid {what} {text!r}: {unit} from {low} to {high}")
    return int(text)


def _address(text: str, version: int, what: str) -> IPAddress:
    try:
        addr = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise InvalidRequest(f"invalid {what} {text!r}: an IPv{version} address "
                             "(names are not resolved)") from None
    if addr.version != version:
        raise InvalidRequest(f"invalid {what} {text!r}: this proxy type wants IPv{version}")
    scope = getattr(addr, "scope_id", None)
    if scope is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", scope):
        raise InvalidRequest(f"invalid {what} {text!r}: the zone is not an interface name")
    if addr.is_multicast:
        raise InvalidRequest(f"invalid {what} {text!r}: multicast")
    return addr


def _protocol(text: str | None) -> str:
    protocol = (text or "tcp").lower()
    if protocol not in PROTOCOLS:
        raise InvalidRequest(f"invalid protocol {text!r}: tcp or udp")
    return protocol


def _any(version: int) -> IPAddress:
    return IPv4Address(0) if version == 4 else IPv6Address(0)


def parse_add(kind: str, args: Sequence[str]) -> PortProxy:
    """``add``/``set`` words into a proxy, with netsh's defaults."""
    listen_v, connect_v = _kind(kind)
    words = _words(args, ADD_KEYS)
    if "listenport" not in words:
        raise InvalidRequest("listenport=N is required")
    listen_port = _port(words["listenport"], "listenport")
    listen = (_address(words["listenaddress"], listen_v, "listenaddress")
              if "listenaddress" in words else _any(listen_v))
    if "connectaddress" in words:
        connect = _address(words["connectaddress"], connect_v, "connectaddress")
    else:
        connect = IPv4Address("127.0.0.1") if connect_v == 4 else IPv6Address(1)
    if connect.is_unspecified:
        raise InvalidRequest(f"invalid connectaddress {connect}: unspecified address")
    connect_port = (_port(words["connectport"], "connectport") if "connectport" in words
                    else listen_port)
    idle = (_number(words["idletimeout"], "idletimeout", 0, MAX_IDLE_TIMEOUT, "seconds")
            if "idletimeout" in words else 0)
    cap = (_number(words["maxconnections"], "maxconnections", 1, MAX_CONNECTIONS,
                   "a number of connections") if "maxconnections" in words
           else DEFAULT_MAX_CONNECTIONS)
    mode = words.get("mode", "auto").lower()
    if mode not in MODES:
        raise InvalidRequest(f"invalid mode {words['mode']!r}: {', '.join(MODES)}")
    return PortProxy(kind.lower(), _protocol(words.get("protocol")), listen, listen_port,
                     connect, connect_port, idle, cap, mode)


def kernel_refusal(proxy: PortProxy, subnets: Iterable[IPv4Network]) -> str | None:
    """Why the kernel cannot serve ``proxy`` (None: it can).  ``subnets``: those of the
    instance's NAT and overlay networks, which the host forwards to (docs/datapath.md)."""
    if proxy.kind != "v4tov4":
        return f"a {proxy.kind} proxy changes the address family, which DNAT does not"
    if proxy.listen_address.is_loopback:
        return "it listens on loopback only, which stays with the relay"
    if proxy.idle_timeout or proxy.max_connections != DEFAULT_MAX_CONNECTIONS:
        return "an idle timeout or a connection cap is the relay's to enforce"
    if not any(proxy.connect_address in net for net in subnets):
        return (f"connect address {proxy.connect_address} is in none of this instance's "
                "NAT or overlay networks")
    return None


def parse_delete(kind: str, args: Sequence[str]) -> tuple[str, ProxyKey]:
    """``delete`` words into the key of the proxy to delete."""
    listen_v, _ = _kind(kind)
    words = _words(args, DELETE_KEYS)
    if "listenport" not in words:
        raise InvalidRequest("listenport=N is required")
    listen = (_address(words["listenaddress"], listen_v, "listenaddress")
              if "listenaddress" in words else _any(listen_v))
    return kind.lower(), ProxyKey(_protocol(words.get("protocol")), str(listen),
                                  _port(words["listenport"], "listenport"))


def conflicts(new: PortProxy, existing: Sequence[PortProxy]) -> PortProxy | None:
    """An existing proxy whose listening socket could not coexist with ``new``'s."""
    for old in existing:
        if (old.protocol != new.protocol or old.listen_port != new.listen_port
                or old.listen_family != new.listen_family):
            continue
        if (old.listen_address == new.listen_address or old.listen_address.is_unspecified
                or new.listen_address.is_unspecified):
            return old
    return None


def _plain(addr: IPAddress) -> IPAddress:
    """The address without its zone, and an IPv4-mapped IPv6 address as the IPv4 one (an
    AF_INET6 socket connecting to ``::ffff:a.b.c.d`` reaches IPv4 ``a.b.c.d``)."""
    if addr.version == 6:
        mapped = IPv6Address(int(addr)).ipv4_mapped
        return mapped if mapped is not None else IPv6Address(int(addr))
    return addr


def _serves(listener: PortProxy, protocol: str, address: IPAddress, port: int,
            local: Set[IPAddress]) -> bool:
    """Whether a connection to ``address:port`` would reach ``listener``'s socket."""
    if (listener.protocol != protocol or listener.listen_port != port
            or listener.listen_family != address.version):
        return False
    if _plain(listener.listen_address) == address:
        return True
    return listener.listen_address.is_unspecified and (address.is_loopback or address in local)


def loop_of(new: PortProxy, existing: Sequence[PortProxy],
            local: Set[IPAddress] = frozenset()) -> list[PortProxy] | None:
    """The proxies through which ``new`` would connect back to itself (``[new]`` when it
    would connect to its own socket), or None.

    ``local`` are the addresses of the host namespace: a wildcard listener serves each
    of them (and loopback, always) at its port.  ``existing`` should not hold ``new``'s
    own key (``set`` replaces it)."""
    proxies = [p for p in existing if p.key != new.key]
    plain_local = {_plain(a) for a in local}
    path = [new]
    current = new
    for _ in range(len(proxies) + 1):
        address = _plain(current.connect_address)
        hop = next((p for p in [new, *proxies]
                    if _serves(p, current.protocol, address, current.connect_port,
                               plain_local)), None)
        if hop is None or (hop is not new and hop in path):
            return None                    # ends elsewhere, or a loop of others only
        if hop is new:
            return path
        path.append(hop)
        current = hop
    return None


# -- a whole netsh command line -----------------------------------------------------------


@dataclass(frozen=True)
class NetshCommand:
    """A ``netsh interface portproxy`` command line, its values named: ``words`` are what
    :func:`parse_add` (add, set) or :func:`parse_delete` (delete) take, ``what`` is the
    argument of show."""

    verb: str
    kind: str | None = None
    words: tuple[str, ...] = ()
    what: str = "all"


def parse_netsh(args: Sequence[str]) -> NetshCommand:
    """The words after ``netsh``, as netsh reads them (see the module)."""
    words = list(args)
    if len(words) < 3:
        got = repr(" ".join(words)) if words else "nothing"
        raise InvalidRequest(f"expected {NETSH_SYNTAX}, got {got}")
    context, sub, verb, *rest = words
    if context.lower() not in NETSH_CONTEXTS:
        raise InvalidRequest(f"netsh context {context!r}: only 'interface portproxy' (or "
                             "'int portproxy') is emulated")
    if sub.lower() != "portproxy":
        raise InvalidRequest(f"netsh interface {sub!r}: only 'portproxy' is emulated")
    verb = verb.lower()
    if verb not in NETSH_VERBS:
        raise InvalidRequest(f"unknown portproxy command {words[2]!r} (choose from: "
                             f"{', '.join(NETSH_VERBS)})")
    if verb == "reset":
        if rest:
            raise InvalidRequest(f"reset takes no parameters, got {' '.join(rest)!r}")
        return NetshCommand(verb)
    if verb == "show":
        if len(rest) > 1:
            raise InvalidRequest(f"show takes one of all, {', '.join(KINDS)}, got "
                                 f"{' '.join(rest)!r}")
        return NetshCommand(verb, what=rest[0] if rest else "all")
    if not rest:
        raise InvalidRequest(f"{verb} needs a type: {'|'.join(KINDS)}")
    kind, *values = rest
    listen_v, connect_v = _kind(kind)
    order = DELETE_ORDER if verb == "delete" else ADD_ORDER
    named = [_localhost(w, listen_v, connect_v) for w in _named(values, order)]
    return NetshCommand(verb, kind.lower(), tuple(named))


def _named(values: Sequence[str], order: Sequence[str]) -> list[str]:
    """``values`` as key=value words: netsh's positional values (first, in ``order``)
    named, the key=value ones as they are."""
    named: list[str] = []
    keyed = False
    for value in values:
        if value.strip() == "=":
            raise InvalidRequest("'=' alone: write key=value without spaces")
        if "=" in value:
            keyed = True
            named.append(value)
        elif keyed:
            raise InvalidRequest(f"value {value!r} without a key after a key=value word "
                                 f"(positional values come first: {' '.join(order)})")
        elif len(named) == len(order):
            raise InvalidRequest(f"too many values: {value!r} (netsh's order: "
                                 f"{' '.join(order)})")
        else:
            named.append(f"{order[len(named)]}={value}")
    return named


def _localhost(word: str, listen_v: int, connect_v: int) -> str:
    """``word`` with the address ``localhost`` resolved as netsh does: the loopback
    address of the family of its side."""
    key, _, value = word.partition("=")
    version = {"listenaddress": listen_v, "connectaddress": connect_v}.get(key.strip().lower())
    if version is None or value.strip().lower() != "localhost":
        return word
    return f"{key}={'127.0.0.1' if version == 4 else '::1'}"


def render_show(proxies: Sequence[PortProxy]) -> str:
    """``proxies`` in the layout of ``netsh interface portproxy show``: one section per
    type that has any, in netsh's order; a UDP proxy's listen port reads ``N/udp``."""
    lines: list[str] = []
    for kind in KINDS:
        rows = [p for p in proxies if p.kind == kind]
        if not rows:
            continue
        lines += ["", f"{f'Listen on ipv{kind[1]}:':<28}Connect to ipv{kind[-1]}:", "",
                  f"{'Address':<16}{'Port':<12}{'Address':<16}Port",
                  f"{'-' * 15} {'-' * 10}  {'-' * 15} {'-' * 10}"]
        for p in rows:
            port = f"{p.listen_port}/udp" if p.protocol == "udp" else str(p.listen_port)
            lines.append(f"{p.listen_address!s:<15} {port:<10}  {p.connect_address!s:<15} "
                         f"{p.connect_port}")
    return "".join(f"{line}\n" for line in lines)
