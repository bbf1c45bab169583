"""Containers in the store: ``kiln run``'s options -> spec, state under containers/<id>/."""

from __future__ import annotations

import os
import time

from runtime.spec import DEFAULT_PATH, BindMount, ContainerSpec, ProcessSpec, Record, TmpfsMount
from store.errors import KilnError
from store.fsutil import is_host_root

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from store.store import Store

# ``kiln run`` imports this module on its start-up path: the store's modules (and pathlib,
# shutil, dataclasses ...) are imported only when a lookup is not in the cache of
# runtime.image_lookup, or by the functions that need them.


class RunOptions(Record):
    def __init__(
        self, image: str, command: list[str] | None = None, entrypoint: str | None = None,
        env: list[str] | None = None, env_files: list[str] | None = None,
        workdir: str | None = None, user: str | None = None, hostname: str | None = None,
        name: str | None = None, remove: bool = False, tty: bool = False,
        interactive: bool = False, read_only: bool = False, volumes: list[str] | None = None,
        tmpfs: list[str] | None = None, network: str | None = None,
        cap_add: list[str] | None = None, cap_drop: list[str] | None = None,
        privileged: bool = False, security_opts: list[str] | None = None, init: bool = False,
        memory: str | None = None, memory_swap: str | None = None, cpus: str | None = None,
        cpu_shares: str | None = None, pids_limit: str | None = None,
        stop_timeout: float = 10.0, publish: list[str] | None = None,
        publish_all: bool = False, ip: str | None = None, dns: list[str] | None = None,
        add_hosts: list[str] | None = None, network_aliases: list[str] | None = None,
        default_subnet: str | None = None, restart: str | None = None,
        memory_reservation: str | None = None, cpuset_cpus: str | None = None,
        cpuset_mems: str | None = None, ulimits: list[str] | None = None,
        shm_size: str | None = None, sysctls: list[str] | None = None,
        oom_score_adj: str | None = None, cgroup_parent: str | None = None,
        blkio_weight: str | None = None, device_read_bps: list[str] | None = None,
        device_write_bps: list[str] | None = None, devices: list[str] | None = None,
        userns: str | None = None,
    ):
        self.image = image
        self.userns = userns  # None/"host": the host's ids; "auto[:size=N]": a private range
        self.command = [] if command is None else command
        self.entrypoint = entrypoint  # None: the image's; "": none
        self.env = [] if env is None else env
        self.env_files = [] if env_files is None else env_files
        self.workdir = workdir
        self.user = user
        self.hostname = hostname
        self.name = name
        self.remove = remove
        self.tty = tty
        self.interactive = interactive
        self.read_only = read_only
        self.volumes = [] if volumes is None else volumes
        self.tmpfs = [] if tmpfs is None else tmpfs
        self.network = network  # None: bridge as root (Docker's default), else none
        self.cap_add = [] if cap_add is None else cap_add
        self.cap_drop = [] if cap_drop is None else cap_drop
        self.privileged = privileged
        self.security_opts = [] if security_opts is None else security_opts
        self.init = init
        self.memory = memory
        self.memory_swap = memory_swap
        self.cpus = cpus
        self.cpu_shares = cpu_shares
        self.pids_limit = pids_limit
        self.stop_timeout = stop_timeout
        self.publish = [] if publish is None else publish
        self.publish_all = publish_all
        self.ip = ip
        self.dns = [] if dns is None else dns
        self.add_hosts = [] if add_hosts is None else add_hosts
        self.network_aliases = [] if network_aliases is None else network_aliases
        self.default_subnet = default_subnet  # kiln.conf [network] subnet
        self.restart = restart  # a detached container's --restart policy
        self.memory_reservation = memory_reservation
        self.cpuset_cpus = cpuset_cpus
        self.cpuset_mems = cpuset_mems
        self.ulimits = [] if ulimits is None else ulimits
        self.shm_size = shm_size
        self.sysctls = [] if sysctls is None else sysctls
        self.oom_score_adj = oom_score_adj
        self.cgroup_parent = cgroup_parent
        self.blkio_weight = blkio_weight
        self.device_read_bps = [] if device_read_bps is None else device_read_bps
        self.device_write_bps = [] if device_write_bps is None else device_write_bps
        self.devices = [] if devices is None else devices  # HOST[:CONTAINER[:PERMS]]


class ContainerRecord(Record):
    FIELDS = ("id", "name", "image", "image_name", "command", "created", "status", "pid",
              "exit_code", "finished", "network", "ip", "ports", "monitor", "started",
              "restart_count", "runner", "userns")

    def __init__(self, id: str, name: str, image: str, image_name: str, command: list[str],
                 created: float, status: str = "created", pid: int = 0,
                 exit_code: int | None = None, finished: float | None = None,
                 network: str | None = None, ip: str | None = None, ports: list | None = None,
                 monitor: int = 0, started: float | None = None, restart_count: int = 0,
                 runner: int = 0, userns: list | None = None):
        self.id = id
        self.name = name
        self.image = image  # manifest digest: keeps the image alive for prune and rmi
        self.image_name = image_name
        self.command = command
        self.created = created
        self.status = status
        self.pid = pid
        self.exit_code = exit_code
        self.finished = finished
        self.network = network
        self.ip = ip
        self.ports = [] if ports is None else ports  # [proto, host_ip, host_port, ctr_port]
        self.monitor = monitor  # a detached container's monitor process (0: kiln run's own)
        self.started = started
        self.restart_count = restart_count
        # the `kiln run --rm` process of a foreground container: when it is gone while its
        # container is too, nobody is left to remove the container (kill -9 of kiln)
        self.runner = runner
        self.userns = userns  # [first host id, count] of --userns=auto, else None

    def save(self, directory: str | os.PathLike) -> None:
        """Replace state.json at once; not flushed to disk: it means nothing after a reboot
        that ``kiln ps`` could not tell anyway (a pid, a status)."""
        from runtime.json_writer import dumps
        from store.fsutil import replace_file

        replace_file(os.path.join(os.fspath(directory), "state.json"), dumps(self.__dict__))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ContainerRecord:
        import json  # not on kiln run's path (unless --name): its import costs a millisecond

        with open(os.path.join(directory, "state.json"), "rb") as f:
            data = json.loads(f.read(1 << 20))
        return cls(**{k: data[k] for k in cls.FIELDS if k in data})


def default_root() -> str:
    """store.store.default_root's rule (a test holds them equal), without importing the store."""
    env = os.environ.get("KILN_ROOT")
    if env:
        return env
    if is_host_root():
        return "/var/lib/kiln"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                             "share")
    return os.path.join(data, "kiln")


class StoreHandle:
    """A store's paths at once, its Store object (and the imports that takes) on demand.

    ``store`` is a Store, or the root directory (None: the default root).
    """

    def __init__(self, store: Store | str | os.PathLike | None):
        if store is None or isinstance(store, (str, os.PathLike)):
            self._store = None
            self.root = os.path.abspath(default_root() if store is None else store)
        else:
            self._store = store
            self.root = str(store.root)
        self.containers_dir = os.path.join(self.root, "containers")
        self.cache_dir = os.path.join(self.containers_dir, ".cache")

    @property
    def store(self) -> Store:
        if self._store is None:
            from store.store import Store

            self._store = Store(self.root)
        return self._store

    def exists(self) -> bool:
        return self._store is not None or os.path.isfile(os.path.join(self.root, "oci-layout"))


class SharedStoreLock:
    """The store lock held shared, as Store.writing() holds it, without importing the store."""

    def __init__(self, root: str):
        self.path = os.path.join(root, "locks", "store.lock")
        self.fd = -1

    def __enter__(self) -> SharedStoreLock:
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing drops the flock


def command_for(config: dict, opts: RunOptions) -> list[str]:
    """Docker's rule: --entrypoint replaces the image's and clears its CMD; args replace CMD."""
    image_entry = config.get("Entrypoint") or []
    image_cmd = config.get("Cmd") or []
    if opts.entrypoint is not None:
        entry = [opts.entrypoint] if opts.entrypoint else []
        cmd = opts.command
    else:
        entry = list(image_entry)
        cmd = opts.command or list(image_cmd)
    argv = entry + cmd
    if not argv:
        raise KilnError(f"no command specified: image {opts.image} has no CMD or ENTRYPOINT; "
                        "give one after the image name")
    return argv


def _read_env_file(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as e:
        raise KilnError(f"cannot read env file {path}: {e.strerror}") from None
    out = []
    for lineno, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.partition("=")[0].strip() != line.partition("=")[0] or not line.partition("=")[0]:
            raise KilnError(f"{path}:{lineno}: invalid variable {line!r}")
        out.append(line)
    return out


def merge_env(image_env: list[str], opts: RunOptions, hostname: str) -> list[str]:
    merged: dict[str, str] = {}
    for e in image_env:
        k, _, v = e.partition("=")
        merged[k] = v
    merged.setdefault("PATH", DEFAULT_PATH)
    merged["HOSTNAME"] = hostname
    if opts.tty:
        merged.setdefault("TERM", "xterm")
    extra = []
    for path in opts.env_files:
        extra += _read_env_file(path)
    extra += opts.env
    for e in extra:
        k, eq, v = e.partition("=")
        if not k:
            raise KilnError(f"invalid environment variable {e!r}")
        if eq:
            merged[k] = v
        elif k in os.environ:  # -e NAME takes the value from kiln's environment
            merged[k] = os.environ[k]
    return [f"{k}={v}" for k, v in merged.items()]


def _parse_volume(text: str) -> BindMount:
    parts = text.split(":")
    if len(parts) < 2 or len(parts) > 3:
        raise KilnError(f"invalid volume {text!r}: want HOST:CONTAINER[:ro|rw]")
    host, target = parts[0], parts[1]
    opts = parts[2].split(",") if len(parts) == 3 else []
    if not os.path.isabs(host):
        raise KilnError(f"invalid volume {text!r}: the host path must be absolute "
                        "(named volumes are not supported)")
    if not os.path.isabs(target):
        raise KilnError(f"invalid volume {text!r}: the container path must be absolute")
    for o in opts:
        if o not in ("ro", "rw", "z", "Z"):
            raise KilnError(f"invalid volume {text!r}: unknown option {o!r}")
    if not os.path.exists(host):
        raise KilnError(f"invalid volume {text!r}: {host} does not exist")
    return BindMount(os.path.realpath(host), target, "ro" in opts)


def _parse_tmpfs(text: str) -> TmpfsMount:
    path, _, options = text.partition(":")
    if not os.path.isabs(path):
        raise KilnError(f"invalid tmpfs {text!r}: the path must be absolute")
    return TmpfsMount(path, options or "rw,nosuid,nodev,noexec,size=65536k")


def _security(opts: RunOptions, caps: frozenset[str],
              cache_dir: str | None) -> tuple[bytes | None, bool]:
    seccomp_opt = None
    nnp = False
    for s in opts.security_opts:
        key, sep, value = s.partition("=")
        if not sep:
            key, sep, value = s.partition(":")
        if key == "seccomp":
            seccomp_opt = value
        elif key == "no-new-privileges":
            nnp = value in ("", "true")
        elif key == "label":
            continue  # SELinux labels: nothing to do on this kind of host
        else:
            raise KilnError(f"unknown --security-opt {s!r}")
    if opts.privileged and seccomp_opt is None:
        seccomp_opt = "unconfined"
    if seccomp_opt is None:  # Docker's default profile: compiled once per host, then cached
        from runtime.seccomp_cache import default_filter

        return default_filter(caps, cache_dir), nnp
    from runtime.seccomp import profile_for

    return profile_for(seccomp_opt, set(caps)), nnp


def _etc_files(directory: str, hostname: str, mode: str, dns: list[str]) -> dict[str, str]:
    resolv = b""
    try:
        with open("/etc/resolv.conf", "rb") as f:
            resolv = f.read(1 << 16)
    except OSError:
        pass
    if mode != "host" and (dns or b"nameserver" in resolv or mode == "slirp4netns"):
        from runtime.network.resolv import resolv_conf

        via = None
        if mode == "slirp4netns":
            from runtime.network.slirp import DNS_IP as via
        resolv = resolv_conf(resolv.decode("utf-8", "replace"), dns,
                             own_netns=mode != "none", loopback_via=via).encode()
    contents = {
        "/etc/hosts": ("hosts", ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost "
                                 f"ip6-loopback\n127.0.1.1\t{hostname}\n").encode()),
        "/etc/resolv.conf": ("resolv.conf", resolv),
        "/etc/hostname": ("hostname", f"{hostname}\n".encode()),
    }
    files = {}
    for target, (name, data) in contents.items():
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        files[target] = path
    return files


def network_mode(opts: RunOptions) -> tuple[str, str]:
    """(kind, name): kind none|host|container|bridge|slirp4netns; name the network or
    container. Rootless, the default is slirp4netns (as podman's) where it is installed."""
    name = opts.network
    rootless = not is_host_root()
    if name is None:
        if not rootless:
            name = "bridge"
        else:
            from runtime.network.slirp import available

            name = "slirp4netns" if available() else "none"
    if name in ("none", "host", "slirp4netns"):
        return name, name
    if name.startswith("container:"):
        target = name[len("container:"):]
        if not target:
            raise KilnError("invalid --network container: give a container name or ID")
        return "container", target
    if rootless:
        raise KilnError(f"--network {name}: bridge networks need root; rootless kiln "
                        "has slirp4netns (the default), host, none and container:NAME")
    return "bridge", name


def _process_settings(opts: RunOptions, kind: str) -> dict:
    """--ulimit, --sysctl, --oom-score-adj, --shm-size as ContainerSpec fields."""
    out: dict = {}
    if opts.devices:
        out["devices"] = [_parse_device(d) for d in opts.devices]
    if not (opts.ulimits or opts.sysctls or opts.oom_score_adj is not None or opts.shm_size):
        return out
    from runtime import settings

    if opts.ulimits:
        out["rlimits"] = [settings.parse_ulimit(u) for u in opts.ulimits]
    if opts.sysctls:
        out["sysctls"] = dict(settings.parse_sysctl(t, kind) for t in opts.sysctls)
    if opts.oom_score_adj is not None:
        out["oom_score_adj"] = settings.parse_oom_score_adj(str(opts.oom_score_adj))
    if opts.shm_size:
        from runtime.cgroups import parse_size

        size = parse_size(str(opts.shm_size))
        if size <= 0:
            raise KilnError(f"invalid --shm-size {opts.shm_size!r}: must be more than 0")
        out["shm_size"] = size
    return out


def warn_about(*warnings) -> None:
    """What the limits had to change or drop, as docker warns about it."""
    import sys

    for group in warnings:
        for w in group:
            sys.stderr.write(f"kiln: warning: {w}\n")


def _parse_device(text: str) -> tuple[str, str, bool]:
    """--device HOST[:CONTAINER[:PERMS]] -> (host node, path inside, writable). kiln's
    mounts are all nodev, so a device is the host's node bind-mounted in; "m" (mknod)
    grants nothing more, as every mount stays nodev. Without "w", the v1 devices cgroup
    denies writes to it (a read-only mount would not stop writes to a device node)."""
    import stat

    parts = text.split(":")
    if len(parts) > 3 or not parts[0]:
        raise KilnError(f"invalid --device {text!r}: want HOST[:CONTAINER[:PERMS]]")
    host = parts[0]
    target = parts[1] if len(parts) > 1 and parts[1] else host
    perms = parts[2] if len(parts) == 3 else "rwm"
    if len(parts) == 2 and parts[1] and set(parts[1]) <= set("rwm"):
        target, perms = host, parts[1]  # --device /dev/fuse:r, as docker reads it
    if not perms or not set(perms) <= set("rwm") or "r" not in perms:
        raise KilnError(f"invalid --device {text!r}: permissions are r, w and m (r needed)")
    if not os.path.isabs(target):
        raise KilnError(f"invalid --device {text!r}: the container path must be absolute")
    try:
        st = os.stat(host)
    except OSError as e:
        raise KilnError(f"invalid --device {text!r}: {host}: {e.strerror}") from None
    if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise KilnError(f"invalid --device {text!r}: {host} is not a device")
    return host, target, "w" in perms


def _read_only_devices(devices: list[str]) -> tuple[str, ...]:
    import stat

    rules = []
    for text in devices:
        host, _target, writable = _parse_device(text)
        if not writable:
            st = os.stat(host)
            kind = "b" if stat.S_ISBLK(st.st_mode) else "c"
            rules.append(f"{kind} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} w")
    return tuple(rules)


def cgroup_options(opts: RunOptions) -> dict:
    """create_cgroup's limits and parent for these options."""
    from runtime.cgroups import parse_limits

    limits = parse_limits(memory=opts.memory, memory_swap=opts.memory_swap, cpus=opts.cpus,
                          cpu_shares=opts.cpu_shares, pids_limit=opts.pids_limit,
                          memory_reservation=opts.memory_reservation,
                          cpuset_cpus=opts.cpuset_cpus, cpuset_mems=opts.cpuset_mems,
                          blkio_weight=opts.blkio_weight, device_read_bps=opts.device_read_bps,
                          device_write_bps=opts.device_write_bps,
                          device_deny=_read_only_devices(opts.devices))
    out: dict = {"limits": limits}
    if opts.cgroup_parent:
        parent = opts.cgroup_parent.strip("/")
        if not parent or any(p in ("", ".", "..") for p in parent.split("/")):
            raise KilnError(f"invalid --cgroup-parent {opts.cgroup_parent!r}: a path of "
                            "cgroup names, without . or ..")
        out["parent"] = parent
    return out


def _check_network_options(opts: RunOptions, kind: str):
    """The -p specs, --add-host pairs and --dns servers, checked before anything is made."""
    if kind == "slirp4netns":
        given = [flag for flag, value in (("--ip", opts.ip),
                                          ("--network-alias", opts.network_aliases)) if value]
        if given:
            raise KilnError(f"{', '.join(given)} need a bridge network, not slirp4netns")
    elif kind != "bridge":
        given = [flag for flag, value in (("-p", opts.publish), ("-P", opts.publish_all),
                                          ("--ip", opts.ip),
                                          ("--network-alias", opts.network_aliases)) if value]
        if given and kind == "host":
            import sys

            sys.stderr.write(f"kiln: warning: {', '.join(given)} discarded with --network "
                             "host (the container uses the host's ports)\n")
        elif given:
            raise KilnError(f"{', '.join(given)} need a bridge network, not --network "
                            f"{opts.network}")
    if kind == "container":
        # Docker's runconfig errors: the other container's network owns these
        given = [flag for flag, value in (("--hostname", opts.hostname), ("--dns", opts.dns),
                                          ("--add-host", opts.add_hosts)) if value]
        if given:
            raise KilnError(f"conflicting options: {', '.join(given)} and --network "
                            f"{opts.network} (the container takes that container's "
                            "hostname, hosts and resolv.conf)")
    specs = []
    if kind in ("bridge", "slirp4netns") and opts.publish:
        from runtime.network import ports

        specs = [s for text in opts.publish for s in ports.parse(text)]
    if not opts.add_hosts and not opts.dns:
        return specs, []
    import ipaddress

    extra = []
    for text in opts.add_hosts:
        host, sep, address = text.partition(":") if "=" not in text else text.partition("=")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise KilnError(f"invalid --add-host {text!r}: want NAME:IP") from None
        if not sep or not host:
            raise KilnError(f"invalid --add-host {text!r}: want NAME:IP")
        extra.append((host, address))
    for server in opts.dns:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise KilnError(f"invalid --dns {server!r}: not an IP address") from None
    return specs, extra


def _resolve_image(handle: StoreHandle, name: str):
    """(manifest digest, the config's "config" object, layer dirs); call with the store
    lock held. From runtime.image_lookup when it knows the name, else the full way."""
    from runtime import image_lookup

    if handle.exists():
        known = image_lookup.lookup(handle.root, handle.cache_dir, name)
        if known is not None:
            return known.digest, known.config, known.layers
    store = handle.store
    identity = image_lookup.index_identity(handle.root)
    desc = store.resolve(name)
    image = store.image_for(desc)
    config = image.config().get("config") or {}
    layer_dirs = [str(d) for d in store.unpack_image(image)]
    if (identity == image_lookup.index_identity(handle.root)
            and any(t.descriptor == desc for t in store.tags())):
        image_lookup.remember(handle.cache_dir, identity, name,
                              image_lookup.Answer(desc.digest, config, layer_dirs))
    return desc.digest, config, layer_dirs


def create(store: Store | StoreHandle | str | None, opts: RunOptions,
           existing: ContainerRecord | None = None):
    """(record, spec, directory, network plan or None) of a new container, not started; or
    of ``existing`` again (kiln start: its writable layer, name and ID kept)."""
    from runtime.capabilities import resolve as resolve_caps

    handle = store if isinstance(store, StoreHandle) else StoreHandle(store)
    kind, net_name = network_mode(opts)
    caps = resolve_caps(opts.cap_add, opts.cap_drop, privileged=opts.privileged)
    seccomp, nnp = _security(opts, caps, handle.cache_dir if handle.exists() else None)
    binds = [_parse_volume(v) for v in opts.volumes]
    tmpfs = [_parse_tmpfs(t) for t in opts.tmpfs]
    port_specs, extra_hosts = _check_network_options(opts, kind)
    settings = _process_settings(opts, kind)
    userns_size = _userns_size(opts)
    if userns_size is not None:
        _check_searchable(handle.containers_dir if handle.exists() else str(handle.root))
    if not handle.exists():
        handle.store  # noqa: B018 - makes the store (and its lock file) as Store() does
    netns_fd = None
    plan = None
    with SharedStoreLock(handle.root):
        # kiln start runs the image the container was made from, as Docker does, even if
        # its name has moved to another image since
        pinned = (f"{opts.image.partition('@')[0]}@{existing.image}"
                  if existing and existing.image else opts.image)
        digest, config, layer_dirs = _resolve_image(handle, pinned)
        if existing is None and opts.name and any(c.name == opts.name
                                                  for c in list_containers(handle)):
            raise KilnError(f"the container name {opts.name!r} is already in use")
        shared_hostname = None
        if kind == "container":
            netns_fd, shared_etc, shared_hostname = _join_network_of(handle, net_name)
        cid = existing.id if existing else os.urandom(32).hex()
        hostname = opts.hostname or shared_hostname or cid[:12]
        name = existing.name if existing else (opts.name or f"kiln-{cid[:12]}")
        argv = command_for(config, opts)
        directory = os.path.join(handle.containers_dir, cid)
        if existing is None:
            os.mkdir(directory, 0o700)
            if userns_size is not None:
                # --userns=auto: the container's root (not the host's) sets it up from here
                os.chmod(directory, 0o711)
        try:
            for sub in ("upper", "work", "rootfs"):
                if existing is None:
                    os.mkdir(os.path.join(directory, sub), 0o755)
            etc_files = _etc_files(directory, hostname, kind, opts.dns)
            if kind == "container":
                etc_files.update(shared_etc)
            elif kind == "bridge":
                from runtime.network import attach, ports
                from runtime.network.networks import Networks

                if opts.publish_all:
                    port_specs += ports.exposed(config)
                plan = attach.plan(
                    Networks(opts.default_subnet), net_name, container_id=cid,
                    container_name=name, hostname=hostname, hosts_file=etc_files["/etc/hosts"],
                    ip=opts.ip, port_specs=port_specs, extra_hosts=extra_hosts,
                    aliases=opts.network_aliases)
            elif kind == "slirp4netns":
                from runtime.network import ports
                from runtime.network.slirp import SlirpPlan

                if opts.publish_all:
                    port_specs += ports.exposed(config)
                plan = SlirpPlan(port_specs, cid)
            if extra_hosts and kind != "bridge":
                with open(etc_files["/etc/hosts"], "a") as f:
                    f.write("".join(f"{ip}\t{host}\n" for host, ip in extra_hosts))
            record = ContainerRecord(cid, name, digest, opts.image, argv,
                                     existing.created if existing else time.time(),
                                     network=net_name,
                                     ip=plan.lease.ip if kind == "bridge" else None,
                                     ports=plan.lease.ports if kind == "bridge"
                                     else plan.ports if plan else [],
                                     restart_count=existing.restart_count if existing else 0,
                                     userns=existing.userns if existing else None)
            if userns_size is not None and record.userns is None:
                _save_with_id_block(handle, record, directory, userns_size)
                # the overlay's root dir is the upper dir's: the container's root owns it
                first = record.userns[0]
                os.chown(os.path.join(directory, "upper"), first, first)
            else:
                record.save(directory)
            _save_options(directory, opts)
        except BaseException:
            if kind == "bridge" and plan is not None:
                from runtime.network import attach

                attach.detach(Networks(), plan.lease)
            if netns_fd is not None:
                os.close(netns_fd)
            if existing is None:
                remove_container_dir(directory)
            raise
    process = ProcessSpec(
        args=argv,
        env=merge_env(config.get("Env") or [], opts, hostname),
        cwd=opts.workdir or config.get("WorkingDir") or "/",
        user=opts.user if opts.user is not None else (config.get("User") or ""),
        terminal=opts.tty,
        stdin=opts.interactive,
    )
    spec = ContainerSpec(
        id=cid, layers=layer_dirs, upper=os.path.join(directory, "upper"),
        work=os.path.join(directory, "work"), rootfs=os.path.join(directory, "rootfs"),
        process=process, hostname=hostname, binds=binds, tmpfs=tmpfs, etc_files=etc_files,
        readonly_rootfs=opts.read_only, network=kind, netns_fd=netns_fd, capabilities=caps,
        seccomp=seccomp, no_new_privileges=nnp, privileged=opts.privileged, init=opts.init,
        id_map=tuple(record.userns) if record.userns else None, **settings,
    )
    save_exec_config(directory, spec)
    return record, spec, directory, plan


OPTIONS_FILE = "options.json"  # what kiln start needs to run it again


def _save_options(directory: str, opts: RunOptions) -> None:
    from runtime.json_writer import dumps

    with open(os.path.join(directory, OPTIONS_FILE), "wb") as f:
        f.write(dumps(vars(opts)))


def load_options(directory: str) -> RunOptions:
    import json

    try:
        with open(os.path.join(directory, OPTIONS_FILE), "rb") as f:
            data = json.loads(f.read(1 << 20))
        return RunOptions(**data)
    except (OSError, ValueError, TypeError) as e:
        raise KilnError(f"cannot read {os.path.join(directory, OPTIONS_FILE)}: {e}") from None


EXEC_FILE = "exec.json"  # what kiln exec needs to confine its process as the container


def save_exec_config(directory: str, spec: ContainerSpec) -> None:
    from runtime.json_writer import dumps

    data = {"env": spec.process.env, "user": spec.process.user, "cwd": spec.process.cwd,
            "capabilities": sorted(spec.capabilities), "no_new_privileges":
            spec.no_new_privileges, "seccomp": spec.seccomp.hex() if spec.seccomp else None}
    with open(os.path.join(directory, EXEC_FILE), "wb") as f:
        f.write(dumps(data))


def _join_network_of(handle: StoreHandle,
                     target: str) -> tuple[int, dict[str, str], str | None]:
    """--network container:NAME: an fd of its network namespace, its hosts and
    resolv.conf (one network, one view of it) and its hostname, which Docker gives the
    joining container too."""
    other = find(handle, target)
    if other.status != "running":
        raise KilnError(f"--network container:{target}: container {other.name} is not running")
    try:
        fd = os.open(f"/proc/{other.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise KilnError(f"--network container:{target}: cannot open its network namespace: "
                        f"{e.strerror}") from None
    directory = os.path.join(handle.containers_dir, other.id)
    shared = {t: os.path.join(directory, n) for t, n in (("/etc/hosts", "hosts"),
                                                          ("/etc/resolv.conf", "resolv.conf"))
              if os.path.isfile(os.path.join(directory, n))}
    try:
        with open(os.path.join(directory, "hostname")) as f:
            hostname = f.read().strip() or None
    except OSError:
        hostname = None
    return fd, shared, hostname


def run(store: Store | str | os.PathLike | None, opts: RunOptions, *, warm_up: bool = True):
    """Create, start and wait for a container; returns its process.ExitStatus.

    ``store`` is a Store or a store's root directory (None: the default root).
    ``warm_up=False``: the caller has called cgroups.warm_up_migration itself, earlier."""
    from runtime.cgroups import create_cgroup, warm_up_migration
    from runtime.process import Container

    cg = cgroup_options(opts)
    if warm_up:
        warm_up_migration()  # the kernel's wait for the cgroup move, overlapped with create()
    record, spec, directory, plan = create(StoreHandle(store), opts)
    cgroup = None
    try:
        cgroup = create_cgroup(f"kiln-{record.id[:12]}", **cg)
        warn_about(cg["limits"].warnings, cgroup.warnings)
        container = Container(spec, cgroup)

        def running(pid: int) -> None:
            if plan is not None:
                plan.connect(pid)
            record.status, record.pid = "running", pid
            record.runner = os.getpid() if opts.remove else 0
            record.save(directory)

        container.start(on_pid=running)
        status = container.wait(stop_timeout=opts.stop_timeout)
        record.status, record.exit_code, record.finished = "exited", status.code, time.time()
        record.pid = 0
        if not opts.remove:
            record.save(directory)
        return status
    except BaseException:
        record.status = "exited"
        if not opts.remove:
            record.save(directory)
        raise
    finally:
        # each clean-up runs whatever the one before it raised: a --rm container must not
        # outlive a failed network teardown
        try:
            if spec.netns_fd is not None:
                os.close(spec.netns_fd)
            if plan is not None:
                plan.close()
        finally:
            try:
                if cgroup is not None:
                    cgroup.remove()
            finally:
                if opts.remove:
                    remove_container_dir(directory)


def _userns_size(opts: RunOptions) -> int | None:
    if opts.userns in (None, "", "host"):
        return None
    from runtime.userns import UsernsError, parse

    size = parse(opts.userns)
    if not is_host_root():
        raise UsernsError(f"--userns {opts.userns}: rootless kiln's containers are in the "
                          "user's namespace already (its /etc/subuid range)")
    if opts.privileged:
        raise UsernsError(f"--privileged and --userns {opts.userns} conflict: a privileged "
                          "container is the host's root (as Docker's userns-remap says)")
    return size


def _check_searchable(path: str) -> None:
    """The container's root (no host id of kiln's) sets its rootfs up by path: every
    directory above the store's containers must let others search it, as /var/lib does."""
    import stat

    from runtime.userns import UsernsError

    here = os.path.realpath(path)
    while here != "/":
        if not os.stat(here).st_mode & stat.S_IXOTH:
            raise UsernsError(f"--userns=auto: the container's root cannot reach {path}: "
                              f"{here} is not searchable by others (chmod o+x it, or use a "
                              "store outside it)")
        here = os.path.dirname(here)


def _save_with_id_block(handle: StoreHandle, record: ContainerRecord, directory: str,
                        size: int) -> None:
    """Give ``record`` a block of ids no other container of the store has, and save it,
    under one lock: two containers made at once never get the same block."""
    import fcntl

    from runtime.userns import allocate

    fd = os.open(os.path.join(handle.containers_dir, ".userns.lock"),
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        taken = [tuple(c.userns) for c in list_containers(handle)
                 if c.userns and c.id != record.id]
        record.userns = list(allocate(size, taken))
        record.save(directory)
    finally:
        os.close(fd)


def remove_container_dir(path: str | os.PathLike) -> None:
    """rm -rf of a container's directory, by file descriptors (no symlink is followed).

    What the container wrote into its upper dir may resist (a directory without write
    permission): store.fsutil.remove_tree, which knows to fix that up, takes over then.
    """
    try:
        _remove_tree_at(None, os.fspath(path))
    except FileNotFoundError:
        pass
    except OSError:
        from store.fsutil import remove_tree

        remove_tree(path)


def _remove_tree_at(dir_fd: int | None, name: str) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=dir_fd)
    try:
        with os.scandir(fd) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for child, is_dir in entries:
            if is_dir:
                _remove_tree_at(fd, child)
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def list_containers(store: Store | StoreHandle | str | None) -> list[ContainerRecord]:
    handle = store if isinstance(store, StoreHandle) else StoreHandle(store)
    out = []
    try:
        entries = sorted(os.scandir(handle.containers_dir), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        entries = []
    for entry in entries:
        if entry.name.startswith("."):  # .cache
            continue
        try:
            out.append(ContainerRecord.load(entry.path))
        except (OSError, ValueError, TypeError):
            continue
    kept = []
    for rec in out:
        if rec.status == "running" and not alive(rec.pid):
            if rec.runner and not alive(rec.runner):  # its kiln run --rm was killed
                remove_container_dir(os.path.join(handle.containers_dir, rec.id))
                continue
            rec.status = "exited"
        kept.append(rec)
    return kept


def process_start(pid: int) -> int:
    """The start time of ``pid`` in clock ticks since boot; 0 when it is gone (or a zombie,
    which has ended but is not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    fields = data[data.rindex(b")") + 2:].split()
    return 0 if fields[0] in (b"Z", b"X") else int(fields[19])


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: its container has ended)."""
    return bool(pid) and bool(process_start(pid))


def find(store: Store | StoreHandle | str | None, name_or_id: str) -> ContainerRecord:
    matches = [c for c in list_containers(store)
               if c.name == name_or_id or c.id.startswith(name_or_id)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise KilnError(f"no such container: {name_or_id}")
    raise KilnError(f"container ID prefix {name_or_id!r} is ambiguous")


def remove(store: Store | str | None, name_or_id: str, *, force: bool = False) -> str:
    handle = StoreHandle(store)
    rec = find(handle, name_or_id)
    if rec.status == "running":
        if not force:
            raise KilnError(f"container {rec.name} is running; stop it first or use -f")
        import signal

        try:
            os.kill(rec.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if rec.ip:
        _release_network(rec)
    elif rec.network == "slirp4netns" and rec.status == "running":
        # its slirp4netns (and published ports) end with the monitor's exit pipe
        deadline = time.monotonic() + 5.0
        while rec.monitor and alive(rec.monitor) and \
                time.monotonic() < deadline:
            time.sleep(0.02)
    remove_container_dir(os.path.join(handle.containers_dir, rec.id))
    return rec.id


def _release_network(rec: ContainerRecord, wait: float = 2.0) -> None:
    """The container's lease, gone: its kiln releases it as the container ends (waited for
    a moment), or nothing holds it any more and it is released here."""
    from runtime.network.attach import release_leases
    from runtime.network.networks import Networks, holder_alive

    networks = Networks()
    deadline = time.monotonic() + wait
    while True:
        with networks:
            mine = [x for n in networks.list() for x in networks.leases(n.name)
                    if x.container == rec.id]
            if not mine:
                return
            if not any(holder_alive(x) for x in mine) or time.monotonic() > deadline:
                release_leases(networks, mine)
                return
        time.sleep(0.05)
