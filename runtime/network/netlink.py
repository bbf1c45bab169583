"""rtnetlink, the little of it that container networking needs: bridges, veth pairs,
addresses, routes, link flags.

Python's socket module speaks AF_NETLINK itself, so this is message packing over a plain
socket (no ctypes, no library). A socket belongs to the network namespace its creator was
in when it made it: ``in_netns`` makes one inside a container's namespace and returns, so
the rest of kiln never leaves the host's.
"""

from __future__ import annotations

# _socket, not socket: socket.py's enums cost kiln run 4 ms, and plain calls are all this needs
import _socket as socket
import errno
import os
import struct

from runtime import syscalls as sc
from store.errors import KilnError

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_NEWROUTE = 20, 24
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER = 1, 3, 4, 10
IFLA_LINKINFO, IFLA_NET_NS_FD = 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST = 1, 2, 4
RTA_GATEWAY = 5
IFF_UP = 0x1
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1

_HDR = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")


class NetlinkError(KilnError):
    def __init__(self, what: str, err: int):
        super().__init__(f"{what}: {os.strerror(err)}")
        self.errno = err


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length & 3)


def _name(name: str) -> bytes:
    return name.encode() + b"\0"


class Netlink:
    """One NETLINK_ROUTE socket; every request waits for its acknowledgement."""

    def __init__(self, sock=None):
        self.sock = sock or socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                          socket.NETLINK_ROUTE)
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, what: str, kind: int, flags: int, body: bytes) -> list[bytes]:
        """Send one request; the bodies of the messages answering it, up to its ack."""
        self.seq += 1
        self.sock.send(_HDR.pack(_HDR.size + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK,
                                 self.seq, 0) + body)
        replies = []
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset + _HDR.size <= len(data):
                length, mtype, _flags, seq, _pid = _HDR.unpack_from(data, offset)
                if length < _HDR.size or offset + length > len(data):
                    raise NetlinkError(what, errno.EPROTO)
                if seq == self.seq:
                    if mtype == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", data, offset + _HDR.size)
                        if code:
                            raise NetlinkError(what, -code)
                        return replies
                    replies.append(data[offset + _HDR.size:offset + length])
                offset += (length + 3) & ~3

    def index_of(self, name: str) -> int:
        """The index of link ``name`` in this socket's namespace; 0 when there is none."""
        try:
            replies = self._request(f"cannot look up link {name}", RTM_GETLINK, 0,
                                    _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(name)))
        except NetlinkError as e:
            if e.errno in (errno.ENODEV, errno.ENOENT):
                return 0
            raise
        for body in replies:
            if len(body) >= _IFINFO.size:
                return _IFINFO.unpack_from(body)[2]
        return 0

    # ------------------------------------------------------------------ links
    def add_bridge(self, name: str, mtu: int | None = None, mac: bytes = b"") -> None:
        """A bridge; with ``mac`` set its address no longer follows its ports' (the kernel
        otherwise takes the lowest port address, and containers' ARP caches go stale)."""
        attrs = _attr(IFLA_IFNAME, _name(name))
        if mac:
            attrs += _attr(IFLA_ADDRESS, mac)
        if mtu:
            attrs += _attr(IFLA_MTU, struct.pack("=I", mtu))
        attrs += _attr(IFLA_LINKINFO, _attr(IFLA_INFO_KIND, b"bridge"))
        self._request(f"cannot create bridge {name}", RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                      _IFINFO.pack(0, 0, 0, 0, 0) + attrs)

    def add_veth(self, name: str, peer: str, peer_netns_fd: int, *, master: int = 0,
                 mtu: int | None = None, peer_mac: bytes = b"") -> None:
        """A veth pair: ``name`` here (enslaved to ``master``), ``peer`` created straight in
        the namespace of ``peer_netns_fd`` (never visible on the host under its name)."""
        mtu_attr = _attr(IFLA_MTU, struct.pack("=I", mtu)) if mtu else b""
        peer_info = (_IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(peer))
                     + _attr(IFLA_NET_NS_FD, struct.pack("=I", peer_netns_fd)) + mtu_attr)
        if peer_mac:
            peer_info += _attr(IFLA_ADDRESS, peer_mac)
        info = _attr(IFLA_INFO_KIND, b"veth") + _attr(IFLA_INFO_DATA,
                                                      _attr(VETH_INFO_PEER, peer_info))
        attrs = _attr(IFLA_IFNAME, _name(name)) + mtu_attr + _attr(IFLA_LINKINFO, info)
        if master:
            attrs += _attr(IFLA_MASTER, struct.pack("=I", master))
        self._request(f"cannot create veth pair {name}", RTM_NEWLINK,
                      NLM_F_CREATE | NLM_F_EXCL, _IFINFO.pack(0, 0, 0, 0, 0) + attrs)

    def set_up(self, index: int) -> None:
        self._request(f"cannot bring up link {index}", RTM_NEWLINK, 0,
                      _IFINFO.pack(0, 0, index, IFF_UP, IFF_UP))

    def delete_link(self, name: str) -> bool:
        """False when there is no such link."""
        try:
            self._request(f"cannot delete link {name}", RTM_DELLINK, 0,
                          _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(name)))
        except NetlinkError as e:
            if e.errno in (errno.ENODEV, errno.ENOENT):
                return False
            raise
        return True

    # ------------------------------------------------------------------ addresses, routes
    def add_address(self, index: int, address: str, prefix: int) -> None:
        raw = socket.inet_aton(address)
        host = struct.unpack("!I", raw)[0]
        broadcast = struct.pack("!I", host | ((1 << (32 - prefix)) - 1)) if prefix < 31 else b""
        attrs = _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw)
        if broadcast:
            attrs += _attr(IFA_BROADCAST, broadcast)
        try:
            self._request(f"cannot add address {address}/{prefix}", RTM_NEWADDR,
                          NLM_F_CREATE | NLM_F_EXCL,
                          _IFADDR.pack(socket.AF_INET, prefix, 0, 0, index) + attrs)
        except NetlinkError as e:
            if e.errno != errno.EEXIST:
                raise

    def add_default_route(self, gateway: str) -> None:
        self._request(f"cannot add the default route via {gateway}", RTM_NEWROUTE,
                      NLM_F_CREATE | NLM_F_EXCL,
                      _RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT,
                                  RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
                      + _attr(RTA_GATEWAY, socket.inet_aton(gateway)))


def mac_for(address: str) -> bytes:
    """A locally administered MAC address made of an IPv4 address (Docker's 02:42:<ip>
    scheme, with kiln's 02:6b): an address handed out again comes with the same MAC, so
    the neighbours' ARP caches stay right (a new random MAC would be unreachable from
    the host for up to 30 s, until its stale entry was probed out)."""
    return b"\x02\x6b" + socket.inet_aton(address)


def in_netns(netns_fd: int) -> Netlink:
    """A Netlink whose socket lives in the namespace of ``netns_fd``; the calling thread is
    back in its own namespace when this returns."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        sc.setns(netns_fd, sc.CLONE_NEWNET)
        try:
            return Netlink()
        finally:
            sc.setns(own, sc.CLONE_NEWNET)
    finally:
        os.close(own)
