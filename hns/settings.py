"""hns's settings file, read the way WSL reads ``.wslconfig``.

Theory of operation.  A setting is a row of :data:`KEYS` (data, not code): its
camelCase name as the file spells it, the :class:`Settings` attribute it fills, the
sections it may appear in, its parser, and whether a running daemon can take a new
value (:data:`LIVE`) or the network must be made again (``hnsctl down`` / ``up``).
The default of a setting is the default of its :class:`Settings` field.

:func:`loads` reads the text line by line: ``[section]`` headers, ``key = value``
entries, ``#``/``;`` comments and blank lines; section names and keys compare without
case, values are trimmed (a value in double quotes is taken as it is).  Precedence is
one dict overwritten in order -- defaults, then the file, then the flags -- and every
value keeps the :class:`Source` that gave it.

Errors and notes follow WSL: what hns cannot act on as written (a bad value, a line that
is no entry, a key given twice, an unsupported networking mode) is an
:class:`InvalidRequest` (exit 2) whose one-line message starts with ``path:line:`` (or,
for a flag, the setting's name); what it can go on without (an unknown key or section,
a WSL machine setting such as ``memory``, a setting that has no effect in the chosen
networking mode) is a note in :attr:`Settings.notes` for the caller to print.

Pure: :func:`load` opens the file and nothing else touches the system.
"""

from __future__ import annotations

import codecs
import dataclasses
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from types import MappingProxyType
from typing import Any, Literal

from hns.errors import InvalidRequest
from hns.model import format_port_list, parse_netns_name, parse_port, parse_port_list, parse_subnet

__all__ = [
    "DEFAULT_PATH",
    "ENV_VAR",
    "HEADER",
    "LIVE",
    "NAMES",
    "RESTART",
    "Settings",
    "Source",
    "changes",
    "defaults",
    "load",
    "loads",
    "resolve_path",
]

DEFAULT_PATH = "/etc/hns/wslconfig"
ENV_VAR = "HNS_CONFIG"
HEADER = ("KEY", "VALUE", "SOURCE")
MAX_INT = 2**31 - 1
LIVE = frozenset({"localhostForwarding", "ignoredPorts", "hostAddressLoopback",
                  "vmIdleTimeout", "maxConnections", "relayIdleTimeout"})
TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})
UNSUPPORTED_MODES = frozenset({"none", "bridged", "virtioproxy"})
WSL_SECTIONS = frozenset({"wsl2", "experimental"})
SECTIONS = WSL_SECTIONS | {"hns"}
# WSL's keys of [wsl2] and [experimental] that hns has nothing to do with (lower case).
IGNORED_WSL_KEYS = frozenset(key.lower() for key in (
    "memory", "processors", "kernel", "kernelCommandLine", "kernelModules",
    "kernelBootTimeout", "loadDefaultKernelModules", "swap", "swapFile", "pageReporting",
    "guiApplications", "debugConsole", "earlyBootLogging", "nestedVirtualization",
    "hardwarePerformanceCounters", "dnsTunneling", "dnsTunnelingIpAddress", "autoProxy",
    "initialAutoProxyTimeout", "bestEffortDnsParsing", "useWindowsDnsCache", "safeMode",
    "sparseVhd", "autoMemoryReclaim", "defaultVhdSize", "distributionInstallPath",
    "vmSwitch", "macAddress", "dhcp", "ipv6", "maxCrashDumpCount", "virtio9p", "virtiofs",
    "mountDeviceTimeout", "telemetry"))
INT_RE = re.compile(r"-?[0-9]+")                 # ASCII digits only
KEY_RE = re.compile(r"[A-Za-z0-9_.-]+")
COMMENT_RE = re.compile(r"(?:^|\s)[#;]")         # a comment after a value: " # ..."

Kind = Literal["default", "file", "flag"]
Parser = Callable[[object, str], object]         # (value, directory of the file) -> value


@dataclass(frozen=True)
class Source:
    """Where a value came from; ``where`` is ``path:line`` for the file."""

    kind: Kind
    where: str | None = None

    def __str__(self) -> str:
        return self.where or self.kind


DEFAULT = Source("default")
FLAG = Source("flag")
_NO_FLAGS: Mapping[str, object] = MappingProxyType({})


@dataclass(frozen=True)
class Settings:
    """The settings in effect.  Equality and hash are of the values only."""

    networking_mode: str = "nat"
    localhost_forwarding: bool = True
    dns_proxy: bool = True
    firewall: bool = True
    ignored_ports: tuple[int, ...] = ()
    host_address_loopback: bool = False
    vm_idle_timeout_ms: int = 60000          # -1: never
    state_dir: str | None = None
    subnet: IPv4Network | None = None
    max_connections: int = 4096
    relay_idle_timeout: int = 0              # seconds; 0: off
    host_netns: str | None = None
    metrics: str | None = None     # the daemon's Prometheus endpoint, ADDR:PORT; None: off
    cluster: str | None = None     # etcd client URLs, comma-separated; None: no cluster
    host_name: str | None = None   # this host's name in the cluster
    sources: Mapping[str, Source] = field(default_factory=dict, compare=False)
    notes: tuple[str, ...] = field(default=(), compare=False)

    def value(self, name: str) -> object:
        """The value of setting ``name`` (camelCase, as in the file)."""
        return getattr(self, _BY_LOWER[name.lower()].attr)

    def source(self, name: str) -> Source:
        return self.sources.get(_BY_LOWER[name.lower()].name, DEFAULT)

    def to_json(self) -> dict[str, dict[str, Any]]:
        """``{"networkingMode": {"Value": "nat", "Source": "default", "Where": None}, ...}``."""
        out: dict[str, dict[str, Any]] = {}
        for key in KEYS:
            source = self.source(key.name)
            out[key.name] = {"Value": _json_value(getattr(self, key.attr)),
                             "Source": source.kind, "Where": source.where}
        return out

    def rows(self) -> list[tuple[str, str, str]]:
        """(KEY, VALUE, SOURCE) per setting, for :func:`hns.output.print_table` with
        :data:`HEADER`: values as the file writes them (``-``: none), the source as
        ``default``, ``flag`` or the file's ``path:line``."""
        return [(key.name, _text_value(getattr(self, key.attr)), str(self.source(key.name)))
                for key in KEYS]


def _json_value(value: object) -> object:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, IPv4Network):
        return str(value)
    return value


def _text_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return format_port_list(value) or "-"
    return "-" if value is None else str(value)


# parsers: each takes a str (from the file) or a typed value (from a flag) and raises
# InvalidRequest with what is expected; the caller adds where and which key


def _mode(value: object, base: str) -> object:
    word = value.strip().lower() if isinstance(value, str) else ""
    if word in ("nat", "mirrored"):
        return word
    if word in UNSUPPORTED_MODES:
        raise InvalidRequest(f"WSL's {word} mode is not supported by hns (use nat or mirrored)")
    raise InvalidRequest(f"expected nat or mirrored, not {value!r}")


def _bool(value: object, base: str) -> object:
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) and value.isascii() else ""
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise InvalidRequest(f"expected true or false, not {value!r}")


def _ports(value: object, base: str) -> object:
    if isinstance(value, str):
        return parse_port_list(value, "port list")
    if not isinstance(value, list | tuple | set | frozenset):
        raise InvalidRequest(f"expected comma separated ports, not {value!r}")
    ports = set()
    for port in value:
        if isinstance(port, bool) or not isinstance(port, int | str):
            raise InvalidRequest(f"invalid port {port!r}: not a number")
        ports.add(parse_port(port))
    if len(ports) > 4096:
        raise InvalidRequest("more than 4096 ports")
    return tuple(sorted(ports))


def _integer(low: int, high: int, expected: str, never: bool = False) -> Parser:
    """A parser of whole numbers ``low..high`` (and -1 when ``never``)."""
    def parse(value: object, base: str) -> object:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise InvalidRequest(f"expected {expected}, not {value!r}")
        if isinstance(value, str):
            text = value.strip()
            if not INT_RE.fullmatch(text):
                raise InvalidRequest(f"expected {expected}, not {value!r}")
            digits = text.lstrip("-").lstrip("0") or "0"
            number = int(digits) if len(digits) <= 18 else 10**18   # beyond every range
            number = -number if text.startswith("-") else number
        else:
            number = value
        if not (low <= number <= high or (never and number == -1)):
            raise InvalidRequest(f"expected {expected}, not {value!r}")
        return number
    return parse


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"expected text, not {value!r}")
    return value.strip()


def _path(value: object, base: str) -> object:
    """A path; relative in the file: to the file's directory (``base``)."""
    text = _text(value)
    if not text:
        return None
    if "\0" in text:
        raise InvalidRequest(f"invalid path {text!r}: contains NUL")
    return posixpath.normpath(posixpath.join(base, text)) if base else text


def _subnet(value: object, base: str) -> object:
    text = str(value) if isinstance(value, IPv4Network) else _text(value)
    return parse_subnet(text) if text else None


def _netns(value: object, base: str) -> object:
    text = _text(value)
    return parse_netns_name(text) if text else None


def _metrics(value: object, base: str) -> object:
    """``[ADDR:]PORT``, kept as ``ADDR:PORT`` (``[ADDR6]:PORT``)."""
    text = _text(value)
    if not text:
        return None
    from hns.daemon.metrics import format_address, parse_address
    return format_address(parse_address(text))


def _cluster(value: object, base: str) -> object:
    text = _text(value)
    if not text:
        return None
    from hns.cluster.config import parse_endpoints
    return ",".join(parse_endpoints(text))


def _host_name(value: object, base: str) -> object:
    text = _text(value)
    if not text:
        return None
    from hns.cluster.records import parse_host_name
    return parse_host_name(text)


@dataclass(frozen=True)
class _Key:
    name: str
    attr: str
    sections: frozenset[str]
    parse: Parser

    @property
    def live(self) -> bool:
        return self.name in LIVE


_W2, _HNS = frozenset({"wsl2"}), frozenset({"hns"})
KEYS = (    # [experimental]: the keys older WSL releases read there
    _Key("networkingMode", "networking_mode", WSL_SECTIONS, _mode),
    _Key("localhostForwarding", "localhost_forwarding", _W2, _bool),
    _Key("dnsProxy", "dns_proxy", _W2, _bool),
    _Key("firewall", "firewall", WSL_SECTIONS, _bool),
    _Key("ignoredPorts", "ignored_ports", WSL_SECTIONS, _ports),
    _Key("hostAddressLoopback", "host_address_loopback", WSL_SECTIONS, _bool),
    _Key("vmIdleTimeout", "vm_idle_timeout_ms", _W2,
         _integer(0, MAX_INT, f"milliseconds from 0 to {MAX_INT}, or -1 for never", True)),
    _Key("stateDir", "state_dir", _HNS, _path),
    _Key("subnet", "subnet", _HNS, _subnet),
    _Key("maxConnections", "max_connections", _HNS,
         _integer(1, 1_000_000, "a number from 1 to 1000000")),
    _Key("relayIdleTimeout", "relay_idle_timeout", _HNS,
         _integer(0, 31_536_000, "seconds from 0 to 31536000 (0: off)")),  # as portproxy
    _Key("hostNetns", "host_netns", _HNS, _netns),
    _Key("metrics", "metrics", _HNS, _metrics),
    _Key("cluster", "cluster", _HNS, _cluster),
    _Key("hostName", "host_name", _HNS, _host_name),
)
NAMES = tuple(key.name for key in KEYS)
RESTART = frozenset(NAMES) - LIVE
_BY_LOWER = {key.name.lower(): key for key in KEYS}


def _error(message: str) -> InvalidRequest:
    """The error to raise, its message on one line."""
    return InvalidRequest(" ".join(message.splitlines()))


def _parse(key: _Key, value: object, where: str, base: str) -> object:
    try:
        return key.parse(value, base)
    except InvalidRequest as exc:
        prefix = f"{where}: " if where else ""
        raise _error(f"{prefix}{key.name}: {exc}") from None


# the file


@dataclass(frozen=True)
class _Entry:
    key: str
    value: str


def _clip(text: str) -> str:
    return text if len(text) <= 40 else text[:40] + "..."


def _unquote(key: str, text: str, where: str) -> str:
    """The value of an entry: quoted as it is, else up to a ``#``/``;`` comment."""
    if not text.startswith('"'):
        match = COMMENT_RE.search(text)
        return (text[:match.start()] if match else text).strip()
    end = text.find('"', 1)
    if end < 0:
        raise _error(f"{where}: {key}: the quote is not closed")
    rest = text[end + 1:].strip()
    if rest and rest[0] not in "#;":
        raise _error(f"{where}: {key}: text after the closing quote: {_clip(rest)!r}")
    return text[1:end]


def _classify(line: str, where: str) -> str | _Entry | None:
    """None for a blank or comment line, the section's name (lower case) for a header,
    else the entry; InvalidRequest for anything else."""
    text = line.strip()
    if not text or text[0] in "#;":
        return None
    if text.startswith("["):
        end = text.find("]")
        name = text[1:end].strip() if end > 0 else ""
        rest = text[end + 1:].strip() if end > 0 else ""
        if end > 0 and KEY_RE.fullmatch(name) and (not rest or rest[0] in "#;"):
            return name.lower()
        raise _error(f"{where}: expected a [section] header, not {_clip(text)!r}")
    key, sep, raw = text.partition("=")
    key = key.strip()
    if sep and KEY_RE.fullmatch(key):
        return _Entry(key, _unquote(key, raw.strip(), where))
    raise _error(f"{where}: expected [section], key = value or a comment, "
                 f"not {_clip(text)!r}")


class _Reader:
    """The state of one pass over a file: the section, the entries seen, the notes."""

    def __init__(self, path: str, found: dict[str, tuple[object, Source]]) -> None:
        self.path = path
        self.base = posixpath.dirname(path) or "."
        self.found = found
        self.notes: list[str] = []
        self.section: str | None = None
        self.seen: dict[str, int] = {}

    def feed(self, number: int, line: str) -> None:
        where = f"{self.path}:{number}"
        item = _classify(line, where)
        if isinstance(item, str):
            self.section = item
            if item not in SECTIONS:
                self.notes.append(f"{where}: unknown section [{item}] (its keys are ignored)")
        elif isinstance(item, _Entry):
            self.entry(number, where, item)

    def entry(self, number: int, where: str, item: _Entry) -> None:
        lower, section = item.key.lower(), self.section
        key = _BY_LOWER.get(lower)
        if section is None:
            self.notes.append(f"{where}: {item.key} is outside any section (ignored)")
        elif section not in SECTIONS:
            pass                                  # noted at the section's header
        elif key is not None and section in key.sections:
            self.once(key.name, key.name, number, where)
            value = _parse(key, item.value, where, self.base)
            self.found[key.name] = (value, Source("file", where))
        elif lower in IGNORED_WSL_KEYS and section in WSL_SECTIONS:
            self.once(f"{section}.{lower}", item.key, number, where)
            self.notes.append(f"{where}: {item.key} is a WSL setting hns ignores")
        elif key is not None:
            home = "] or [".join(sorted(key.sections, reverse=True))
            self.notes.append(f"{where}: {key.name} is not read in [{section}] (ignored; "
                              f"it belongs in [{home}])")
        else:
            self.notes.append(f"{where}: unknown key {item.key!r} in [{section}] (ignored)")

    def once(self, ident: str, name: str, number: int, where: str) -> None:
        """InvalidRequest when the entry ``ident`` was seen on an earlier line."""
        first = self.seen.setdefault(ident, number)
        if first != number:
            raise _error(f"{where}: {name} is set twice (first on line {first})")


def _read(path: str, explicit: bool) -> str:
    """The file's text ("" for a missing default file)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        if explicit:
            raise _error(f"{path}: no such settings file") from None
        return ""
    except OSError as exc:
        raise _error(f"{path}: cannot read the settings file: {exc.strerror}") from None
    # UTF-16 with a byte order mark is what Notepad may save a .wslconfig as
    utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    encoding = "utf-16" if utf16 else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _error(f"{path}:{line}: not {encoding.partition('-sig')[0]} text") from None


# putting it together


def _mode_notes(settings: Settings) -> list[str]:
    """Settings given other values than their defaults that have no effect in the
    networking mode (WSL ignores them silently)."""
    mirrored = settings.networking_mode == "mirrored"
    pointless = (("subnet", "localhostForwarding") if mirrored
                 else ("ignoredPorts", "hostAddressLoopback"))
    notes = []
    for name in pointless:
        source = settings.source(name)
        if settings.value(name) != Settings().value(name):
            prefix = f"{source.where}: " if source.where else ""
            mode = "nat" if mirrored else "mirrored"
            notes.append(f"{prefix}{name} has an effect in {mode} mode only "
                         f"(networkingMode is {settings.networking_mode})")
    return notes


def _flag(name: str, value: object) -> tuple[str, object]:
    key = _BY_LOWER.get(name.lower())
    if key is None:
        raise _error(f"{name}: not a setting of hns (choose from: {', '.join(NAMES)})")
    return key.name, _parse(key, value, "", "")


def loads(text: str, path: str = DEFAULT_PATH, *,
          flags: Mapping[str, object] = _NO_FLAGS) -> Settings:
    """The settings of file text ``text`` (read from ``path``, for messages and relative
    paths) with ``flags`` over it: setting name -> value (a flag whose value is None was
    not given)."""
    found: dict[str, tuple[object, Source]] = {}
    reader = _Reader(path, found)
    for number, line in enumerate(text.split("\n"), 1):
        reader.feed(number, line)
    for name, value in flags.items():
        if value is not None:
            canonical, parsed = _flag(name, value)
            found[canonical] = (parsed, FLAG)
    values: dict[str, Any] = {key.attr: found[key.name][0] for key in KEYS if key.name in found}
    sources = {key.name: found.get(key.name, (None, DEFAULT))[1] for key in KEYS}
    settings = Settings(**values, sources=MappingProxyType(sources))
    return dataclasses.replace(settings, notes=(*reader.notes, *_mode_notes(settings)))


def load(path: str, *, explicit: bool, flags: Mapping[str, object] = _NO_FLAGS) -> Settings:
    """The settings of the file at ``path`` with ``flags`` over them.  A missing file is
    an error when ``explicit`` (given with ``--config`` or ``HNS_CONFIG``), else it means
    every setting has its default."""
    return loads(_read(path, explicit), path, flags=flags)


def defaults() -> Settings:
    return loads("")


def resolve_path(option: str | None, environ: Mapping[str, str]) -> tuple[str, bool]:
    """(path, explicit): ``--config`` if given, else ``$HNS_CONFIG`` if set and not
    empty, else the default path (not explicit)."""
    if option is not None:
        if not option:
            raise _error("--config: expected a path, not ''")
        return option, True
    env = environ.get(ENV_VAR, "")
    return (env, True) if env else (DEFAULT_PATH, False)


def changes(old: Settings, new: Settings) -> tuple[list[str], list[str]]:
    """(live, restart): the names of the settings that differ, those a running daemon
    takes at once (:data:`LIVE`) and those that need ``hnsctl down`` and ``up``
    (:data:`RESTART`), each in the order of :data:`NAMES`."""
    live: list[str] = []
    restart: list[str] = []
    for key in KEYS:
        if getattr(old, key.attr) != getattr(new, key.attr):
            (live if key.live else restart).append(key.name)
    return live, restart
