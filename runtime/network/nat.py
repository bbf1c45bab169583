"""kiln's nftables table: outbound NAT for its bridges and DNAT for published ports.

The whole table is rewritten from the networks and leases on disk in one ``nft -f``
transaction each time something changes: nothing is ever half-applied, a rule someone
deleted comes back, and a lease collected after kill -9 takes its ports with it. Our own
table (``ip kiln``), so iptables-nft's and netavark's rules are never touched.

    prerouting/output  local destination: (addr, proto, port) or (proto, port) -> ctr:port
    postrouting        masquerade subnet -> outside; 127.0.0.1 -> published port (with
                       route_localnet on the bridge); container -> container via a port
"""

from __future__ import annotations

import subprocess

from store.errors import KilnError

TABLE = "ip kiln"
_DNAT = ("fib daddr type local dnat ip to ip daddr . meta l4proto . th dport map @ports_at",
         "fib daddr type local dnat ip to meta l4proto . th dport map @ports_any")


class NatError(KilnError):
    pass


def ruleset(nat_subnets: list[str], all_subnets: list[str], ports: list) -> str:
    """The nft script that makes the table what these say; ``ports`` holds
    (proto, host_ip, host_port, ctr_ip, ctr_port), host_ip "" for every local address."""
    lines = [
        f"add table {TABLE}",
        f"add set {TABLE} masq {{ type ipv4_addr; flags interval; }}",
        f"add set {TABLE} subnets {{ type ipv4_addr; flags interval; }}",
        f"add map {TABLE} ports_any {{ type inet_proto . inet_service : "
        "ipv4_addr . inet_service; }",
        f"add map {TABLE} ports_at {{ type ipv4_addr . inet_proto . inet_service : "
        "ipv4_addr . inet_service; }",
        f"add chain {TABLE} prerouting {{ type nat hook prerouting priority dstnat; "
        "policy accept; }",
        f"add chain {TABLE} output {{ type nat hook output priority -100; policy accept; }}",
        f"add chain {TABLE} postrouting {{ type nat hook postrouting priority srcnat; "
        "policy accept; }",
        f"flush set {TABLE} masq",
        f"flush set {TABLE} subnets",
        f"flush map {TABLE} ports_any",
        f"flush map {TABLE} ports_at",
    ]
    for chain in ("prerouting", "output", "postrouting"):
        lines.append(f"flush chain {TABLE} {chain}")
    if nat_subnets:
        lines.append(f"add element {TABLE} masq {{ {', '.join(nat_subnets)} }}")
    if all_subnets:
        lines.append(f"add element {TABLE} subnets {{ {', '.join(all_subnets)} }}")
    anywhere = [f"{p} . {hp} : {ip} . {cp}" for p, h, hp, ip, cp in ports if not h]
    at = [f"{h} . {p} . {hp} : {ip} . {cp}" for p, h, hp, ip, cp in ports if h]
    if anywhere:
        lines.append(f"add element {TABLE} ports_any {{ {', '.join(anywhere)} }}")
    if at:
        lines.append(f"add element {TABLE} ports_at {{ {', '.join(at)} }}")
    for chain in ("prerouting", "output"):
        lines += [f"add rule {TABLE} {chain} {rule}" for rule in _DNAT]
    lines += [
        f"add rule {TABLE} postrouting ip saddr @masq ip daddr != @subnets masquerade",
        f"add rule {TABLE} postrouting ct status dnat ip saddr 127.0.0.0/8 masquerade",
        f"add rule {TABLE} postrouting ct status dnat ip saddr @subnets ip daddr @subnets "
        "masquerade",
    ]
    return "\n".join(lines) + "\n"


def apply(script: str) -> None:
    try:
        p = subprocess.run(["nft", "-f", "-"], input=script.encode(), capture_output=True)
    except FileNotFoundError:
        raise NatError("cannot set up NAT: the nft command is missing "
                       "(apt-get install nftables)") from None
    if p.returncode != 0:
        err = p.stderr.decode("utf-8", "replace").strip().splitlines()
        raise NatError(f"cannot set up NAT (nft): {err[0] if err else 'failed'}")


def remove_table() -> None:
    subprocess.run(["nft", "delete", "table", *TABLE.split()], capture_output=True)
