"""Bridge networks and their address leases, on disk, one set per host.

    /var/lib/kiln/networks/<name>.json          the network: bridge, subnet, gateway
    /var/lib/kiln/networks/<name>.leases/<ip>   one per attached container: who holds it,
                                                its ports, its hosts file
    /var/lib/kiln/networks/.lock

Not per store: bridges, addresses, host ports and the nft table belong to the host, and
containers of two stores (KILN_ROOT) on one bridge must not get one address. A lease is
made with O_EXCL, so two kiln processes can never hand out one address; the lock
serializes what reads many leases at once (hosts files, port conflicts, NAT, clean-up).
A lease names the kiln process that runs the container (``kiln run``, or a detached
container's monitor) by pid and start time: when that process is gone the container is
too (its PID 1 dies with it), and the next kiln call that touches networks removes what
the lease still holds (veth, nft elements, hosts entries).

The default network, ``bridge`` on interface kiln0, is made on first use, as Docker's
docker0 and podman's podman0 are; IPv4 only, as Docker's default bridge.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import time

from runtime.containers import process_start
from runtime.spec import Record
from store.errors import KilnError

DEFAULT_NETWORK = "bridge"
DEFAULT_BRIDGE = "kiln0"
DEFAULT_SUBNET = "10.89.0.0/16"
USER_SUBNETS = "10.90.0.0/16"  # user networks get a free /24 of it unless --subnet says
NETWORK_DIR = "/var/lib/kiln/networks"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
RESERVED = ("none", "host", DEFAULT_NETWORK)


class NetworkError(KilnError):
    pass


class Network(Record):
    def __init__(self, name: str, id: str, bridge: str, subnet: str, gateway: str,
                 created: float, internal: bool = False):
        self.name = name
        self.id = id
        self.bridge = bridge
        self.subnet = subnet
        self.gateway = gateway
        self.created = created
        self.internal = internal  # no outbound NAT

    @property
    def prefix(self) -> int:
        return int(self.subnet.rpartition("/")[2])

    @property
    def resolves_names(self) -> bool:
        """Docker's rule: containers find each other by name on user networks only."""
        return self.name != DEFAULT_NETWORK


class Lease(Record):
    def __init__(self, network: str, ip: str, container: str, name: str, holder_pid: int,
                 holder_start: int, ports: list | None = None, aliases: list | None = None,
                 hostname: str = "", extra_hosts: list | None = None, hosts_file: str = ""):
        self.network = network
        self.ip = ip
        self.container = container
        self.name = name
        self.holder_pid = holder_pid
        self.holder_start = holder_start  # /proc/PID/stat starttime: pids are reused
        self.ports = [] if ports is None else ports  # [proto, host_ip, host_port, ctr_port]
        self.aliases = [] if aliases is None else aliases
        self.hostname = hostname
        self.extra_hosts = [] if extra_hosts is None else extra_hosts  # [name, ip] of --add-host
        self.hosts_file = hosts_file  # the container's /etc/hosts on the host, kept current


def holder_alive(lease: Lease) -> bool:
    return bool(lease.holder_pid) and process_start(lease.holder_pid) == lease.holder_start


class Networks:
    """The host's networks (``directory``: NETWORK_DIR)."""

    def __init__(self, default_subnet: str | None = None, directory: str = NETWORK_DIR):
        self.default_subnet = default_subnet or DEFAULT_SUBNET  # kiln.conf [network] subnet
        self.dir = directory
        self.lock_path = os.path.join(directory, ".lock")
        self._lock_fd = -1
        self._depth = 0

    # ------------------------------------------------------------------ locking
    def __enter__(self) -> Networks:
        if self._depth == 0:
            import fcntl

            os.makedirs(self.dir, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            self._lock_fd = fd
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # ------------------------------------------------------------------ networks
    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name + ".json")

    def leases_dir(self, name: str) -> str:
        return os.path.join(self.dir, name + ".leases")

    def get(self, name: str) -> Network:
        if name == DEFAULT_NETWORK:
            return self._default()
        if not _NAME.match(name):
            raise NetworkError(f"invalid network name {name!r}")
        try:
            with open(self._path(name), "rb") as f:
                data = json.loads(f.read(1 << 16))
        except FileNotFoundError:
            raise NetworkError(f"network {name} not found (kiln network ls lists them)") \
                from None
        except (OSError, ValueError) as e:
            raise NetworkError(f"network {name}: unreadable definition: {e}") from None
        return _network_from(data, self._path(name))

    def list(self) -> list[Network]:
        out = [self._default()]
        try:
            names = sorted(n[:-5] for n in os.listdir(self.dir) if n.endswith(".json"))
        except FileNotFoundError:
            names = []
        for name in names:
            if name != DEFAULT_NETWORK:
                try:
                    out.append(self.get(name))
                except NetworkError:
                    continue
        return out

    def _default(self) -> Network:
        path = self._path(DEFAULT_NETWORK)
        try:
            with open(path, "rb") as f:
                return _network_from(json.loads(f.read(1 << 16)), path)
        except FileNotFoundError:
            pass
        except ValueError as e:
            raise NetworkError(f"{path}: unreadable definition: {e}") from None
        try:
            net = ipaddress.ip_network(self.default_subnet)
        except ValueError as e:
            raise NetworkError(f"invalid default subnet {self.default_subnet!r}: {e}") from None
        if net.version != 4 or net.prefixlen > 30:
            raise NetworkError(f"invalid default subnet {net}: an IPv4 subnet, /30 or wider")
        network = Network(DEFAULT_NETWORK, os.urandom(32).hex(), DEFAULT_BRIDGE, str(net),
                          str(net.network_address + 1), time.time())
        with self:
            try:
                self._write(network, exclusive=True)
            except FileExistsError:
                return self._default()
        return network

    def create(self, name: str, subnet: str | None = None, gateway: str | None = None,
               internal: bool = False) -> Network:
        if name in RESERVED or name.startswith("container:"):
            raise NetworkError(f"network name {name!r} is reserved")
        if not _NAME.match(name):
            raise NetworkError(f"invalid network name {name!r}: letters, digits, '_', '.' "
                               "and '-', starting with a letter or digit, at most 64")
        with self:
            existing = self.list()
            if any(n.name == name for n in existing):
                raise NetworkError(f"network {name} already exists")
            taken = [ipaddress.ip_network(n.subnet) for n in existing] + _host_routes()
            if subnet is None:
                net = _free_subnet(taken)
            else:
                try:
                    net = ipaddress.ip_network(subnet, strict=True)
                except ValueError as e:
                    raise NetworkError(f"invalid --subnet {subnet!r}: {e}") from None
                if net.version != 4 or net.prefixlen > 30:
                    raise NetworkError(f"invalid --subnet {subnet}: an IPv4 subnet of at "
                                       "least 4 addresses (/30)")
                clash = next((t for t in taken if t.overlaps(net)), None)
                if clash is not None:
                    raise NetworkError(f"subnet {net} overlaps {clash}, which is in use")
            gw = str(net.network_address + 1)
            if gateway is not None:
                try:
                    gw_addr = ipaddress.ip_address(gateway)
                except ValueError as e:
                    raise NetworkError(f"invalid --gateway {gateway!r}: {e}") from None
                if gw_addr not in net or gw_addr in (net.network_address,
                                                     net.broadcast_address):
                    raise NetworkError(f"--gateway {gateway} is not a host address of {net}")
                gw = str(gw_addr)
            nid = os.urandom(32).hex()
            network = Network(name, nid, "kbr-" + nid[:8], str(net), gw, time.time(), internal)
            self._write(network, exclusive=True)
        return network

    def remove(self, name: str) -> Network:
        with self:
            network = self.get(name)
            if name == DEFAULT_NETWORK:
                raise NetworkError("the default network cannot be removed")
            self.collect()
            if self.leases(name):
                users = ", ".join(sorted(lease.name for lease in self.leases(name)))
                raise NetworkError(f"network {name} is in use by {users}")
            try:
                os.rmdir(self.leases_dir(name))
            except FileNotFoundError:
                pass
            os.unlink(self._path(name))
        return network

    def _write(self, network: Network, *, exclusive: bool) -> None:
        from store.fsutil import replace_file

        os.makedirs(self.dir, exist_ok=True)
        data = json.dumps(vars(network), indent=1).encode()
        if exclusive:
            fd = os.open(self._path(network.name), os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            replace_file(self._path(network.name), data)

    # ------------------------------------------------------------------ leases
    def leases(self, name: str) -> list[Lease]:
        directory = self.leases_dir(name)
        try:
            files = os.listdir(directory)
        except FileNotFoundError:
            return []
        out = []
        for ip in sorted(files, key=_ip_key):
            lease = self._read_lease(directory, ip)
            if lease is not None:
                out.append(lease)
        return out

    def all_leases(self) -> list[Lease]:
        return [lease for n in self.list() for lease in self.leases(n.name)]

    @staticmethod
    def _read_lease(directory: str, ip: str) -> Lease | None:
        try:
            with open(os.path.join(directory, ip), "rb") as f:
                data = json.loads(f.read(1 << 20))
            return Lease(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):  # half-written by a killed kiln: stale
            return Lease("", ip, "", "", 0, 0)

    def lease(self, network: Network, container: str, name: str, holder_pid: int,
              ip: str | None = None, **fields) -> Lease:
        """A new lease on ``network``: ``ip`` if given and free, else the lowest free."""
        net = ipaddress.ip_network(network.subnet)
        directory = self.leases_dir(network.name)
        os.makedirs(directory, exist_ok=True)
        start = process_start(holder_pid)
        if ip is not None:
            try:
                wanted = ipaddress.ip_address(ip)
            except ValueError as e:
                raise NetworkError(f"invalid --ip {ip!r}: {e}") from None
            if (wanted not in net or wanted in (net.network_address, net.broadcast_address)
                    or str(wanted) == network.gateway):
                raise NetworkError(f"--ip {ip} is not a free host address of network "
                                   f"{network.name} ({net}, gateway {network.gateway})")
            candidates = [wanted]
        else:
            candidates = net.hosts()
        for address in candidates:
            if str(address) == network.gateway:
                continue
            lease = Lease(network.name, str(address), container, name, holder_pid, start,
                          **fields)
            try:
                fd = os.open(os.path.join(directory, str(address)),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(vars(lease)).encode())
            return lease
        if ip is not None:
            raise NetworkError(f"--ip {ip} is already in use on network {network.name}")
        raise NetworkError(f"network {network.name} ({net}) has no free address left")

    def update(self, lease: Lease) -> None:
        from store.fsutil import replace_file

        replace_file(os.path.join(self.leases_dir(lease.network), lease.ip),
                     json.dumps(vars(lease)).encode())

    def release(self, lease: Lease) -> None:
        try:
            os.unlink(os.path.join(self.leases_dir(lease.network), lease.ip))
        except FileNotFoundError:
            pass

    def stale(self) -> list[Lease]:
        return [lease for lease in self.all_leases() if not holder_alive(lease)]

    def collect(self) -> list[Lease]:
        """Release every lease whose holder is gone, with what it holds; call locked."""
        from runtime.network import attach

        gone = self.stale()
        if gone:
            attach.release_leases(self, gone)
        return gone


def _network_from(data: dict, path: str) -> Network:
    try:
        network = Network(**data)
        net = ipaddress.ip_network(network.subnet)
        ipaddress.ip_address(network.gateway)
    except (TypeError, ValueError) as e:
        raise NetworkError(f"{path}: invalid network definition: {e}") from None
    if net.version != 4 or not re.fullmatch(r"[A-Za-z0-9_-]{1,15}", network.bridge):
        raise NetworkError(f"{path}: invalid network definition")
    return network


def _ip_key(name: str) -> tuple:
    try:
        return (0, int(ipaddress.ip_address(name)))
    except ValueError:
        return (1, name)


def _host_routes() -> list:
    """The IPv4 networks the host routes already (a bridge subnet must not shadow them)."""
    out = []
    try:
        with open("/proc/net/route") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or fields[1] == "00000000":
            continue
        dest = ipaddress.IPv4Address(int(fields[1], 16).to_bytes(4, "little"))
        mask = ipaddress.IPv4Address(int(fields[7], 16).to_bytes(4, "little"))
        try:
            out.append(ipaddress.ip_network(f"{dest}/{mask}", strict=False))
        except ValueError:
            continue
    return out


def _free_subnet(taken: list) -> ipaddress.IPv4Network:
    for net in ipaddress.ip_network(USER_SUBNETS).subnets(new_prefix=24):
        if not any(t.overlaps(net) for t in taken):
            return net
    raise NetworkError(f"no free /24 left in {USER_SUBNETS}: give --subnet")
