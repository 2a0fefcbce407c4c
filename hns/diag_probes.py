"""The kernel half of ``hnsctl diag`` (:mod:`hns.diag`): what each step looks at.

Theory of operation: everything inside the VM runs on one
:class:`~hns.netns.NetnsExecutor` thread that entered the VM's namespace, so each socket
below is made there and stays there; the calling thread never changes namespace.  The
host side (link MTUs, ``ip_forward``) runs on a second one in the host namespace, and nft
runs through :func:`hns.nft.nft` as the service's own runner does.

- link flags, addresses and MTUs: ``ioctl``\\ s on a datagram socket; routes: the
  thread's ``/proc/thread-self/net/route`` (no netlink: pyroute2's import alone costs
  a fifth of a second);
- ARP and the path MTU's DF echoes: a packet socket bound to eth0, frames built and
  parsed by scapy's layers (never ``scapy.all``, never scapy's own sockets).  The DF
  echoes go out as frames so that a reply that came back in fragments is seen as such
  (an IP socket would only see it reassembled);
- ICMP echo to the gateway: a raw ICMP socket (the kernel routes it and resolves the
  gateway's MAC); DNS and TCP: ordinary sockets.

Every wait is bounded: :data:`PROBE_TIMEOUT` per probe, :data:`MTU_ROUND_TIMEOUT` per
round of DF echoes sent together.  scapy's layers are imported with this module, before
any step is timed (a quarter of a second, the bulk of a run of ``hnsctl diag``).
"""

from __future__ import annotations

import array
import errno
import fcntl
import secrets
import socket
import struct
import time
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether

from hns.daemon.control import control_path, request
from hns.diag import Echo, Outcome
from hns.errors import KernelError
from hns.model import Network, Vm
from hns.netns import NetnsExecutor, netns_exists, netns_mounted

__all__ = ["MTU_ROUND_TIMEOUT", "PROBE_TIMEOUT", "KernelProbes", "parse_ifconf",
           "parse_routes"]

PROBE_TIMEOUT = 0.4         # s: one ARP, echo, DNS or TCP probe
MTU_ROUND_TIMEOUT = 0.25    # s: one round of DF echoes
SIOCGIFCONF = 0x8912
SIOCGIFFLAGS = 0x8913
SIOCGIFMTU = 0x8921
SIOCGIFHWADDR = 0x8927
IFF_UP = 0x1
IFF_RUNNING = 0x40          # operationally up: the carrier (the veth's peer is up)
RTF_GATEWAY = 0x2
ETH_P_ALL = 0x0003
ETHERTYPE_IP = b"\x08\x00"
ETHERTYPE_ARP = b"\x08\x06"
PACKET_OUTGOING = 4
IFREQ_SIZE = 40 if struct.calcsize("P") == 8 else 32
ROUTES = "/proc/thread-self/net/route"
DIAG_NAME = "hns-diag.invalid"
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
          5: "REFUSED"}


# pure: what the kernel's answers mean


def parse_ifconf(raw: bytes, ifname: str) -> list[IPv4Address]:
    """The IPv4 addresses of ``ifname`` (and its ``ifname:label`` aliases) in the
    ``struct ifreq`` array ``SIOCGIFCONF`` fills."""
    found = []
    for off in range(0, len(raw) - IFREQ_SIZE + 1, IFREQ_SIZE):
        label = raw[off:off + 16].split(b"\0", 1)[0].decode(errors="replace")
        if label == ifname or label.startswith(f"{ifname}:"):
            found.append(IPv4Address(raw[off + 20:off + 24]))
    return found


def parse_routes(text: str, ifname: str) -> list[tuple[IPv4Network, IPv4Address | None]]:
    """(destination, gateway or None for on-link) of the routes through ``ifname`` in
    ``/proc/net/route`` text (addresses in little-endian hex there)."""
    def addr(word: str) -> IPv4Address:
        return IPv4Address(struct.pack("<I", int(word, 16)))

    found = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[0] == ifname:
            net = IPv4Network(f"{addr(f[1])}/{addr(f[7])}", strict=False)
            found.append((net, addr(f[2]) if int(f[3], 16) & RTF_GATEWAY else None))
    return found


# inside a namespace (on an executor's thread)


def _ifreq_ioctl(ifname: str, op: int) -> int | None:
    """The flags (SIOCGIFFLAGS) or MTU (SIOCGIFMTU) of ``ifname``; None: no such link."""
    req = struct.pack("16s16x", ifname.encode())
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            res = fcntl.ioctl(sock, op, req)
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            return None
        raise
    return int(struct.unpack_from("H" if op == SIOCGIFFLAGS else "i", res, 16)[0])


def _addresses_and_routes(ifname: str) -> tuple[list[IPv4Address], str]:
    buf = array.array("B", bytes(IFREQ_SIZE * 256))
    ifc = struct.pack("iP", len(buf), buf.buffer_info()[0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        length = struct.unpack("iP", fcntl.ioctl(sock, SIOCGIFCONF, ifc))[0]
    with open(ROUTES) as f:
        return parse_ifconf(buf.tobytes()[:length], ifname), f.read()


def _link_mac(ifname: str) -> str | None:
    req = struct.pack("16s16x", ifname.encode())
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            return fcntl.ioctl(sock, SIOCGIFHWADDR, req)[18:24].hex(":")
    except OSError:
        return None


def _mtus(names: Sequence[str]) -> dict[str, int]:
    found = {}
    for name in names:
        mtu = _ifreq_ioctl(name, SIOCGIFMTU)
        if mtu is not None:
            found[name] = mtu
    return found


def _sysctl(path: str) -> str:
    with open(f"/proc/sys/{path}") as f:
        return f.read().strip()


def _next_frame(sock: socket.socket, deadline: float) -> bytes | None:
    """The next frame the link received (not one it sent) before ``deadline``."""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, addr = sock.recvfrom(65535)
        except TimeoutError:
            return None
        if addr[2] != PACKET_OUTGOING:
            return data
    return None


def _packet_socket(ifname: str) -> tuple[socket.socket, str]:
    """A packet socket on ``ifname`` (every protocol) and the link's MAC.  Made with
    protocol 0 and then bound: binding a socket that already has a protocol waits for an
    RCU grace period (some 10 ms), and so does every close: one socket serves every
    link-layer probe of a run."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.bind((ifname, ETH_P_ALL))
    except OSError:
        sock.close()
        raise
    return sock, sock.getsockname()[4].hex(":")


def _drain(sock: socket.socket) -> None:
    """Drop what the socket received since its last probe."""
    sock.setblocking(False)
    try:
        while True:
            sock.recv(65535)
    except (BlockingIOError, InterruptedError):
        pass
    finally:
        sock.setblocking(True)


def _arp(sock: socket.socket, mac: str, ip: str, gateway: str,
         timeout: float) -> tuple[str, float] | None:
    """Who has ``gateway``? (from ``ip``): the MAC that answered and the time, or None."""
    _drain(sock)
    ask = Ether(dst="ff:ff:ff:ff:ff:ff", src=mac) / ARP(op=1, hwsrc=mac, psrc=ip, pdst=gateway)
    start = time.monotonic()
    sock.send(bytes(ask))
    while (frame := _next_frame(sock, start + timeout)) is not None:
        if frame[12:14] != ETHERTYPE_ARP:
            continue
        reply = Ether(frame).getlayer(ARP)
        if reply is not None and reply.op == 2 and reply.psrc == gateway and reply.pdst == ip:
            return str(reply.hwsrc), time.monotonic() - start
    return None


def _ping(gateway: str, ident: int, timeout: float) -> tuple[str, float]:
    """An ICMP echo to ``gateway``: ("reply" | "lost" | an error, seconds)."""
    start = time.monotonic()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
            sock.connect((gateway, 0))
            sock.send(bytes(ICMP(type=8, id=ident, seq=1) / b"hns diag"))
            while (left := start + timeout - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    icmp = IP(sock.recv(65535)).getlayer(ICMP)
                except TimeoutError:
                    break
                if icmp is not None and icmp.type == 0 and icmp.id == ident:
                    return "reply", time.monotonic() - start
    except OSError as exc:
        return exc.strerror or str(exc), time.monotonic() - start
    return "lost", timeout


def _dns_status(gateway: str, ident: int, timeout: float) -> tuple[str, float]:
    """A DNS status request (opcode STATUS) to ``gateway``:53: (the answer's rcode |
    "lost" | "refused", seconds)."""
    start = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((gateway, 53))
        sock.send(bytes(DNS(id=ident, opcode=2, rd=0, qd=DNSQR(qname=DIAG_NAME))))
        while (left := start + timeout - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                answer = DNS(sock.recv(65535))
            except TimeoutError:
                break
            except ConnectionRefusedError:
                return "refused", time.monotonic() - start
            if answer.id == ident and answer.qr == 1:
                return RCODES.get(int(answer.rcode), str(answer.rcode)), \
                    time.monotonic() - start
    return "lost", timeout


def _connect(host: str, port: int, timeout: float) -> tuple[str, float, str]:
    """A TCP handshake: ("connected" | "timeout" | "refused" | "unreachable", seconds,
    the local address or the error)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    start = time.monotonic()
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except TimeoutError:
            return "timeout", timeout, ""
        except ConnectionRefusedError:
            return "refused", time.monotonic() - start, ""
        except OSError as exc:
            return "unreachable", time.monotonic() - start, exc.strerror or str(exc)
        return "connected", time.monotonic() - start, str(sock.getsockname()[0])


def _df_echoes(sock: socket.socket, mac: str, ip: str, gateway: str, gateway_mac: str,
               sizes: Sequence[int], timeout: float) -> dict[int, Echo]:
    """One DF echo of each size (IP length) at once, as frames; how each came back."""
    ident = secrets.randbelow(0x10000)
    found: dict[int, Echo] = {}
    _drain(sock)
    for seq, size in enumerate(sizes):
        frame = Ether(src=mac, dst=gateway_mac) / IP(src=ip, dst=gateway, flags="DF") / \
            ICMP(type=8, id=ident, seq=seq) / bytes(max(0, size - 28))
        try:
            sock.send(bytes(frame))
        except OSError as exc:      # too big for eth0; dropped at once by its peer
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            found[size] = Echo("unsent" if exc.errno == errno.EMSGSIZE else "dropped")
    deadline = time.monotonic() + timeout
    while len(found) < len(sizes) and (data := _next_frame(sock, deadline)) is not None:
        if data[12:14] != ETHERTYPE_IP or data[23] != socket.IPPROTO_ICMP:
            continue            # not IPv4, not ICMP: not worth parsing
        packet = Ether(data).getlayer(IP)
        if packet is None or packet.frag != 0 or packet.src != gateway:
            continue            # a later fragment has no ICMP header: the first tells
        icmp = packet.getlayer(ICMP)
        if icmp is None or icmp.type != 0 or icmp.id != ident or not 0 <= icmp.seq < len(sizes):
            continue
        whole = not packet.flags.MF and packet.len == sizes[icmp.seq]
        found.setdefault(sizes[icmp.seq], Echo("whole") if whole else
                         Echo("fragmented", int(packet.len)))
    return {size: found.get(size, Echo("lost")) for size in sizes}


class KernelProbes:
    """:class:`hns.diag.Probes` on the real kernel, for VM ``vm`` of network ``net``."""

    def __init__(self, svc: Any, vm: Vm, net: Network) -> None:
        self.svc = svc
        self.vm = vm
        self.net = net
        self._vm_ex: NetnsExecutor | None = None
        self._host_ex: NetnsExecutor | None = None
        self._link: tuple[socket.socket, str] | None = None

    def _in_vm(self, fn: Any, *args: object) -> Any:
        if self._vm_ex is None:
            self._vm_ex = NetnsExecutor(self.vm.netns)
        return self._vm_ex.call(fn, *args)

    def _in_host(self, fn: Any, *args: object) -> Any:
        if self._host_ex is None:
            self._host_ex = NetnsExecutor(self.svc.host_netns)
        return self._host_ex.call(fn, *args)

    def _packet(self) -> tuple[socket.socket, str]:
        """The packet socket on the VM's eth0 and eth0's MAC (made once per run)."""
        if self._link is None:
            self._link = self._in_vm(_packet_socket, self.vm.interface)
        return self._link

    def close(self) -> None:
        if self._link is not None:
            self._link[0].close()
            self._link = None
        for ex in (self._vm_ex, self._host_ex):
            if ex is not None:
                ex.close()

    # inside the VM

    def vm_netns(self) -> Outcome:
        vm = self.vm
        if not vm.running:
            return Outcome(False, f"vm {vm.name} is stopped: no namespace until it starts",
                           "stopped")
        if not netns_mounted(vm.netns):
            what = "is not a mounted namespace" if netns_exists(vm.netns) else "does not exist"
            return Outcome(False, f"namespace {vm.netns} {what}", "no-netns")
        flags = self._in_vm(_ifreq_ioctl, vm.interface, SIOCGIFFLAGS)
        if flags is None:
            return Outcome(False, f"{vm.interface} is missing in {vm.netns}", "no-eth0")
        if not flags & IFF_UP:
            return Outcome(False, f"{vm.interface} is down in {vm.netns}", "eth0-down")
        if not flags & IFF_RUNNING:
            return Outcome(False, f"{vm.interface} is up but has no carrier (its host side "
                                  f"{vm.host_ifname} is down or gone)", "no-carrier")
        return Outcome(True, f"namespace {vm.netns}; {vm.interface} up, carrier")

    def address_route(self) -> Outcome:
        vm = self.vm
        addresses, text = self._in_vm(_addresses_and_routes, vm.interface)
        routes = parse_routes(text, vm.interface)
        subnet = IPv4Network(f"{vm.ip}/{vm.prefixlen}", strict=False)
        if vm.ip not in addresses:
            have = ", ".join(str(a) for a in addresses) or "no IPv4 address"
            return Outcome(False, f"{vm.interface} has {have}, not {vm.ip}", "no-address")
        if (subnet, None) not in routes:
            return Outcome(False, f"{vm.ip} on {vm.interface} but no route to {subnet} on "
                                  "the link (a wrong prefix length?)", "no-address")
        where = f"{vm.ip}/{vm.prefixlen} on {vm.interface}"
        defaults = [gw for dst, gw in routes if dst.prefixlen == 0 and gw is not None]
        if vm.gateway in defaults:
            return Outcome(True, f"{where}; default via {vm.gateway}")
        if defaults:
            return Outcome(False, f"{where}; default via {defaults[0]}, not the gateway "
                                  f"{vm.gateway}", "no-route")
        return Outcome(False, f"{where}; no default route (via {vm.gateway})", "no-route")

    def arp_gateway(self) -> Outcome:
        from hns.naming import bridge_mac
        vm = self.vm
        found = self._in_vm(_arp, *self._packet(), str(vm.ip), str(vm.gateway), PROBE_TIMEOUT)
        if found is None:
            return Outcome(False, f"who-has {vm.gateway}: no answer in "
                                  f"{PROBE_TIMEOUT * 1000:.0f} ms", "no-answer")
        mac, seconds = found
        ours = bridge_mac(self.net.id)
        if mac != ours:
            where = f"not at bridge {self.net.bridge}'s {ours}"
            if mac == self._in_host(_link_mac, vm.host_ifname):
                return Outcome(False, f"{vm.gateway} is at {mac}, the host side {vm.host_ifname} "
                                      f"itself, {where}: the veth is off the bridge",
                               "off-bridge", mac)
            return Outcome(False, f"{vm.gateway} is at {mac}, {where}", "wrong-mac", mac)
        return Outcome(True, f"{vm.gateway} is at {mac} (bridge {self.net.bridge}), "
                             f"{seconds * 1000:.2f} ms", "", mac)

    def icmp_gateway(self) -> Outcome:
        gw = str(self.vm.gateway)
        kind, seconds = self._in_vm(_ping, gw, secrets.randbelow(0x10000), PROBE_TIMEOUT)
        if kind == "reply":
            return Outcome(True, f"echo reply from {gw} in {seconds * 1000:.2f} ms")
        if kind == "lost":
            return Outcome(False, f"no echo reply from {gw} in {PROBE_TIMEOUT * 1000:.0f} ms",
                           "no-answer")
        return Outcome(False, f"echo to {gw}: {kind}", "no-answer")

    def dns_gateway(self) -> Outcome:
        gw = str(self.vm.gateway)
        kind, seconds = self._in_vm(_dns_status, gw, secrets.randbelow(0x10000),
                                    PROBE_TIMEOUT)
        if kind == "lost":
            return Outcome(False, f"no DNS reply from {gw}:53 in "
                                  f"{PROBE_TIMEOUT * 1000:.0f} ms", "no-answer")
        if kind == "refused":
            return Outcome(False, f"{gw}:53 refused (port unreachable): no DNS proxy listens",
                           "no-answer")
        return Outcome(True, f"the DNS proxy on {gw}:53 answered a status request in "
                             f"{seconds * 1000:.2f} ms: rcode {kind} (answered by the proxy "
                             "itself, whatever its upstreams)")

    def tcp_target(self, target: tuple[str, int]) -> Outcome:
        host, port = target
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        kind, seconds, extra = self._in_vm(_connect, host, port, PROBE_TIMEOUT)
        if kind == "connected":
            return Outcome(True, f"handshake with {where} from {extra} in "
                                 f"{seconds * 1000:.2f} ms")
        what = {"timeout": f"no answer in {PROBE_TIMEOUT * 1000:.0f} ms",
                "refused": "refused (reset): nothing listens there",
                "unreachable": extra}[kind]
        return Outcome(False, f"{where}: {what}", kind)

    def df_echoes(self, gateway_mac: str, sizes: Sequence[int]) -> dict[int, Echo]:
        vm = self.vm
        found: dict[int, Echo] = self._in_vm(_df_echoes, *self._packet(), str(vm.ip),
                                             str(vm.gateway), gateway_mac, list(sizes),
                                             MTU_ROUND_TIMEOUT)
        return found

    # the host

    def host_mtus(self) -> dict[str, int]:
        found: dict[str, int] = self._in_host(_mtus, (self.net.bridge, self.vm.host_ifname))
        return found

    def host_nat(self) -> Outcome:
        from nat.drift import drifted_chains
        nat = self.svc.nat
        problems: list[tuple[str, str]] = []
        try:
            listing = self.svc.nft.list_table("inet", nat.name)
        except KernelError as exc:
            problems.append(("nft-error", f"cannot list the NAT table: {exc}"))
        else:
            want = nat.render()
            chains = drifted_chains(want, listing) if want and listing is not None else []
            if listing is None:
                problems.append(("no-table", f"nft table inet {nat.name} is gone"))
            elif chains:
                problems.append(("drift", f"nft table inet {nat.name} lost rules (chains "
                                          f"{', '.join(chains)})"))
        forward = self._in_host(_sysctl, "net/ipv4/ip_forward")
        if forward != "1":
            problems.append(("no-forward", f"net.ipv4.ip_forward is {forward} in the host "
                                           "namespace"))
        extra = ""
        if self.net.mirrored:
            found, extra = self._vm_table()
            problems += found
        if problems:
            return Outcome(False, "; ".join(text for _, text in problems), problems[0][0])
        return Outcome(True, f"nft table inet {nat.name} as the state renders it; "
                             f"net.ipv4.ip_forward = 1{extra}")

    def _vm_table(self) -> tuple[list[tuple[str, str]], str]:
        """A mirrored VM's own table: (problems, a note for the detail)."""
        from hns.nft import nft
        from nat.mirror import VM_TABLE
        if not netns_exists(self.vm.netns):
            return [], ""           # vm-netns says so
        if nft(self.vm.netns).list_table("inet", VM_TABLE) is None:
            return [("no-vm-table", f"the VM's nft table inet {VM_TABLE} is gone")], ""
        return [], f"; the VM's table inet {VM_TABLE} is there"

    def daemon(self) -> Outcome:
        state_dir = self.svc.store.state_dir
        path = control_path(state_dir)
        try:
            answer = request(state_dir, "status", timeout=PROBE_TIMEOUT)
        except (OSError, ValueError) as exc:
            return Outcome(False, f"the daemon does not answer on {path}: {exc}", "no-answer")
        if answer is None:
            return Outcome(False, f"no daemon listens on {path}", "no-daemon")
        if answer.get("Running") is not True:
            return Outcome(False, f"the daemon on {path} answered {answer}", "no-answer")
        return Outcome(True, f"daemon pid {answer.get('Pid')} answers on {path}")
