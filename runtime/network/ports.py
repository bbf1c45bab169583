"""Published ports: ``-p`` as Docker reads it, ``-P``, and picking host ports.

    -p CTR[/proto]                      a free host port on every address
    -p HOST:CTR  -p IP:HOST:CTR  -p IP::CTR
    -p 8000-8009:80-89                  ranges of one length, pairwise
    -p 8000-8009:80                     the first free host port of the range
"""

from __future__ import annotations

import ipaddress

from runtime.spec import FrozenRecord
from store.errors import KilnError

PROTOCOLS = ("tcp", "udp", "sctp")


class PortError(KilnError):
    pass


class PortSpec(FrozenRecord):
    """One ``-p`` after parsing: host ports to choose from (empty: any free one)."""

    def __init__(self, proto: str, host_ip: str, host_ports: tuple[int, ...], ctr_port: int):
        self._set(proto=proto, host_ip=host_ip, host_ports=host_ports, ctr_port=ctr_port)


def _port_range(text: str, what: str, spec: str) -> list[int]:
    first, dash, last = text.partition("-")
    try:
        lo, hi = int(first), int(last) if dash else int(first)
    except ValueError:
        raise PortError(f"invalid -p {spec!r}: {what} {text!r} is not a port or range") \
            from None
    if not (1 <= lo <= hi <= 65535):
        raise PortError(f"invalid -p {spec!r}: {what} {text!r} is not within 1-65535")
    return list(range(lo, hi + 1))


def parse(spec: str) -> list[PortSpec]:
    body, _, proto = spec.partition("/")
    proto = proto or "tcp"
    if proto not in PROTOCOLS:
        raise PortError(f"invalid -p {spec!r}: unknown protocol {proto!r} (tcp, udp, sctp)")
    host_ip = ""
    if body.startswith("["):
        raise PortError(f"invalid -p {spec!r}: IPv6 host addresses are not supported")
    parts = body.split(":")
    if len(parts) == 1:
        host, ctr = "", parts[0]
    elif len(parts) == 2:
        host, ctr = parts
    elif len(parts) == 3:
        host_ip, host, ctr = parts
    else:
        raise PortError(f"invalid -p {spec!r}: want [IP:][HOST:]CONTAINER[/PROTO]")
    if host_ip:
        try:
            addr = ipaddress.ip_address(host_ip)
        except ValueError:
            raise PortError(f"invalid -p {spec!r}: {host_ip!r} is not an IP address") from None
        if addr.version != 4:
            raise PortError(f"invalid -p {spec!r}: IPv6 host addresses are not supported")
        host_ip = "" if addr.is_unspecified else str(addr)
    ctr_ports = _port_range(ctr, "container port", spec)
    if not host:
        return [PortSpec(proto, host_ip, (), p) for p in ctr_ports]
    host_ports = _port_range(host, "host port", spec)
    if len(ctr_ports) == 1:
        return [PortSpec(proto, host_ip, tuple(host_ports), ctr_ports[0])]
    if len(host_ports) != len(ctr_ports):
        raise PortError(f"invalid -p {spec!r}: the host range and the container range "
                        "differ in length")
    return [PortSpec(proto, host_ip, (h,), c) for h, c in zip(host_ports, ctr_ports, strict=True)]


def exposed(config: dict) -> list[PortSpec]:
    """-P: every port the image EXPOSEs, each to a free host port."""
    out = []
    for key in sorted(config.get("ExposedPorts") or {}):
        port, _, proto = key.partition("/")
        try:
            out += parse(f"{port}/{proto or 'tcp'}")
        except PortError:
            continue
    return out


def _taken(bound: list, proto: str, host_ip: str, port: int) -> bool:
    return any(b[0] == proto and b[2] == port and (not b[1] or not host_ip or b[1] == host_ip)
               for b in bound)


def _free_on_host(proto: str, host_ip: str, port: int) -> int:
    """``port`` (0: any) if nothing on the host holds it; the port, else 0."""
    import socket

    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host_ip or "0.0.0.0", port))
        except OSError:
            return 0
        return s.getsockname()[1]


def choose(specs: list[PortSpec], bound: list) -> list[list]:
    """[proto, host_ip, host_port, ctr_port] for each spec: a host port neither another
    container (``bound``, as those lists) nor a program on the host holds."""
    chosen: list[list] = []
    for spec in specs:
        taken = bound + chosen
        if spec.host_ports:
            port = next((p for p in spec.host_ports
                         if not _taken(taken, spec.proto, spec.host_ip, p)
                         and _free_on_host(spec.proto, spec.host_ip, p)), 0)
            if not port:
                where = f"{spec.host_ip or '0.0.0.0'}:{_ports_text(spec.host_ports)}"
                raise PortError(f"cannot publish {where}/{spec.proto}: port is already "
                                "allocated (by another container or a program on the host)")
        else:
            for _ in range(64):
                port = _free_on_host(spec.proto, spec.host_ip, 0)
                if port and not _taken(taken, spec.proto, spec.host_ip, port):
                    break
            else:
                raise PortError(f"cannot find a free host port for {spec.ctr_port}/{spec.proto}")
        chosen.append([spec.proto, spec.host_ip, port, spec.ctr_port])
    return chosen


def _ports_text(ports: tuple[int, ...]) -> str:
    return str(ports[0]) if len(ports) == 1 else f"{ports[0]}-{ports[-1]}"


def describe(port: list) -> str:
    """``0.0.0.0:8080->80/tcp``, as docker ps shows it."""
    proto, host_ip, host_port, ctr_port = port
    return f"{host_ip or '0.0.0.0'}:{host_port}->{ctr_port}/{proto}"
