"""A container's /etc/resolv.conf."""

from __future__ import annotations

FALLBACK_DNS = ("8.8.8.8", "8.8.4.4")  # Docker's, when the host has only local resolvers


def resolv_conf(host_text: str, dns: list[str], own_netns: bool,
                loopback_via: str | None = None) -> str:
    """The host's resolv.conf with --dns servers instead of its nameservers. A resolver on
    the host's loopback (systemd-resolved's 127.0.0.53) is out of reach from a network
    namespace of its own, so those go (Docker's fallback servers when none is left), or
    are reached through ``loopback_via`` (slirp4netns' DNS forwarder, on the host's side)."""
    lines = host_text.splitlines()
    kept = [line for line in lines if line.split()[:1] != ["nameserver"]]
    servers = [line.split()[1] for line in lines
               if line.split()[:1] == ["nameserver"] and len(line.split()) > 1]
    if dns:
        servers = list(dns)
    elif own_netns and loopback_via:
        servers = list(dict.fromkeys(loopback_via if _loopback(s) else s
                                     for s in servers)) or [loopback_via]
    elif own_netns:
        servers = [s for s in servers if not _loopback(s)] or list(FALLBACK_DNS)
    return "".join(f"{line}\n" for line in kept) + "".join(f"nameserver {s}\n" for s in servers)


def _loopback(address: str) -> bool:
    address = address.partition("%")[0].lower()
    return address.startswith("127.") or address in ("::1", "0:0:0:0:0:0:0:1")
