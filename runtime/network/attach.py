"""A container on a bridge network: lease, veth pair, addresses, NAT, hosts entries; and
taking all of it down again.

    plan()     before the container exists: bridge up, lease (address), host ports chosen
    connect()  once PID 1 exists, before its program runs: the veth pair into its netns
    detach()   when it has exited (or the next kiln call, for a kiln killed with -9)
"""

from __future__ import annotations

import os

from runtime.network.networks import Lease, Network, NetworkError, Networks
from runtime.spec import Record

HOSTS_HEAD = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


class Plan(Record):
    def __init__(self, network: Network, lease: Lease, veth: str, created_bridge: bool):
        self.network = network
        self.lease = lease
        self.veth = veth
        self.created_bridge = created_bridge

    # the interface a container's network plan has (slirp.SlirpPlan's too)
    def connect(self, pid: int) -> None:
        connect(self, pid)

    def close(self) -> None:
        detach(Networks(), self.lease, self.veth)


def veth_name(container_id: str) -> str:
    return "kv" + container_id[:12]  # 14 of IFNAMSIZ's 15


def plan(networks: Networks, name: str, *, container_id: str, container_name: str,
         hostname: str, hosts_file: str, ip: str | None = None, port_specs=(),
         extra_hosts=(), aliases=()) -> Plan:
    """Lease an address and host ports on network ``name`` for a container about to start;
    its bridge and NAT are made on first use."""
    from runtime.network import ports

    with networks:
        network = networks.get(name)
        gone = networks.collect()
        created = ensure_bridge(network)
        lease = networks.lease(network, container_id, container_name, os.getpid(), ip,
                               hostname=hostname, hosts_file=hosts_file,
                               extra_hosts=[list(h) for h in extra_hosts],
                               aliases=list(aliases))
        try:
            if port_specs:
                bound = [p for other in networks.all_leases() for p in other.ports]
                lease.ports = ports.choose(list(port_specs), bound)
                networks.update(lease)
            if port_specs or created or gone:
                sync_nat(networks)
            write_hosts(networks, network)
        except BaseException:
            networks.release(lease)
            raise
    return Plan(network, lease, veth_name(container_id), created)


def connect(plan: Plan, pid: int) -> None:
    """Give PID ``pid``'s network namespace an eth0 on the plan's bridge."""
    from runtime.network.netlink import Netlink, in_netns, mac_for

    network, lease = plan.network, plan.lease
    nsfd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with Netlink() as nl:
            bridge = nl.index_of(network.bridge)
            if not bridge:
                raise NetworkError(f"bridge {network.bridge} of network {network.name} is gone")
            nl.delete_link(plan.veth)  # one a crashed kiln left behind under this id
            nl.add_veth(plan.veth, "eth0", nsfd, master=bridge, peer_mac=mac_for(lease.ip))
            nl.set_up(nl.index_of(plan.veth))
        _write_sys(f"/sys/class/net/{plan.veth}/brport/hairpin_mode", "1")
        with in_netns(nsfd) as inner:
            inner.set_up(inner.index_of("lo"))
            eth0 = inner.index_of("eth0")
            inner.add_address(eth0, lease.ip, network.prefix)
            inner.set_up(eth0)
            inner.add_default_route(network.gateway)
    finally:
        os.close(nsfd)


def detach(networks: Networks, lease: Lease, veth: str | None = None) -> None:
    """Everything ``plan`` and ``connect`` made for one container, gone."""
    with networks:
        release_leases(networks, [lease], veths=[veth] if veth else None)


def release_leases(networks: Networks, leases: list[Lease], veths=None) -> None:
    """Release leases (the network lock held): their veths, NAT entries, hosts entries."""
    from runtime.network.netlink import Netlink

    names = veths if veths is not None else [veth_name(x.container) for x in leases if x.container]
    with Netlink() as nl:
        for name in names:
            nl.delete_link(name)
    for lease in leases:
        networks.release(lease)
    if any(lease.ports for lease in leases) or not all(lease.container for lease in leases):
        sync_nat(networks)
    touched = {lease.network for lease in leases if lease.network}
    for name in touched:
        try:
            write_hosts(networks, networks.get(name))
        except NetworkError:
            continue


def ensure_bridge(network: Network) -> bool:
    """The network's bridge, up with its gateway address; True when it was made now."""
    from runtime.network.netlink import Netlink, mac_for

    with Netlink() as nl:
        index = nl.index_of(network.bridge)
        if index:
            return False
        try:
            nl.add_bridge(network.bridge, mac=mac_for(network.gateway))
        except NetworkError:
            if not nl.index_of(network.bridge):  # another kiln made it meanwhile: fine
                raise
            return False
        index = nl.index_of(network.bridge)
        nl.add_address(index, network.gateway, network.prefix)
        nl.set_up(index)
    # forwarding for the containers' traffic (Docker sets it too); 127.0.0.1 -> published
    # ports are routed to the bridge only with route_localnet
    _write_sys("/proc/sys/net/ipv4/ip_forward", "1")
    _write_sys(f"/proc/sys/net/ipv4/conf/{network.bridge}/route_localnet", "1")
    return True


def remove_bridge(network: Network) -> None:
    from runtime.network.netlink import Netlink

    with Netlink() as nl:
        nl.delete_link(network.bridge)


def sync_nat(networks: Networks) -> None:
    from runtime.network import nat  # subprocess: only when the table changes

    nets = networks.list()
    subnets = [n.subnet for n in nets]
    masq = [n.subnet for n in nets if not n.internal]
    ports = []
    for n in nets:
        for lease in networks.leases(n.name):
            ports += [(p[0], p[1], p[2], lease.ip, p[3]) for p in lease.ports]
    nat.apply(nat.ruleset(masq, subnets, ports))


def hosts_text(lease: Lease, peers: list[Lease], resolves_names: bool) -> str:
    lines = [HOSTS_HEAD]
    names = [lease.hostname] + [n for n in (lease.name, *lease.aliases) if n != lease.hostname]
    lines.append(f"{lease.ip}\t{' '.join(names)}\n")
    if resolves_names:
        for peer in peers:
            if peer.container != lease.container and peer.name:
                lines.append(f"{peer.ip}\t{' '.join([peer.name, *peer.aliases])}\n")
    for host, address in lease.extra_hosts:
        lines.append(f"{address}\t{host}\n")
    return "".join(lines)


def write_hosts(networks: Networks, network: Network) -> None:
    """Every /etc/hosts of the network's containers, as its leases say now. In place: the
    file is bind-mounted into the container, which would keep seeing a replaced one."""
    peers = networks.leases(network.name)
    for lease in peers:
        if not lease.hosts_file:
            continue
        data = hosts_text(lease, peers, network.resolves_names).encode()
        try:
            fd = os.open(lease.hosts_file, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)
        except OSError:
            continue
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)


def _write_sys(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        pass
