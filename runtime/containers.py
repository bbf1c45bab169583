"""Containers in the store: ``kiln run``'s options -> spec, state under containers/<id>/."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.spec import DEFAULT_PATH, BindMount, ContainerSpec, ProcessSpec, TmpfsMount
from store.errors import KilnError
from store.fsutil import atomic_write, remove_tree
from store.store import Store


@dataclass
class RunOptions:
    image: str
    command: list[str] = field(default_factory=list)
    entrypoint: str | None = None  # None: the image's; "": none
    env: list[str] = field(default_factory=list)
    env_files: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    hostname: str | None = None
    name: str | None = None
    remove: bool = False
    tty: bool = False
    interactive: bool = False
    read_only: bool = False
    volumes: list[str] = field(default_factory=list)
    tmpfs: list[str] = field(default_factory=list)
    network: str = "none"
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    privileged: bool = False
    security_opts: list[str] = field(default_factory=list)
    init: bool = False
    memory: str | None = None
    memory_swap: str | None = None
    cpus: str | None = None
    cpu_shares: str | None = None
    pids_limit: str | None = None
    stop_timeout: float = 10.0


@dataclass
class ContainerRecord:
    id: str
    name: str
    image: str  # manifest digest: keeps the image alive for prune and rmi
    image_name: str
    command: list[str]
    created: float
    status: str = "created"
    pid: int = 0
    exit_code: int | None = None
    finished: float | None = None

    def save(self, directory: Path) -> None:
        atomic_write(directory / "state.json", json.dumps(self.__dict__).encode(), durable=False)

    @classmethod
    def load(cls, directory: Path) -> ContainerRecord:
        with open(directory / "state.json", "rb") as f:
            data = json.loads(f.read(1 << 20))
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


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


def _security(opts: RunOptions, caps: frozenset[str]) -> tuple[bytes | None, bool]:
    from runtime.seccomp import profile_for

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
    return profile_for(seccomp_opt, set(caps)), nnp


def _etc_files(directory: Path, hostname: str, network: str) -> dict[str, str]:
    hosts = directory / "hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                     f"127.0.1.1\t{hostname}\n")
    (directory / "hostname").write_text(hostname + "\n")
    resolv = directory / "resolv.conf"
    try:
        with open("/etc/resolv.conf", "rb") as f:
            resolv.write_bytes(f.read(1 << 16))
    except OSError:
        resolv.write_text("")
    files = {"/etc/hosts": str(hosts), "/etc/resolv.conf": str(resolv)}
    files["/etc/hostname"] = str(directory / "hostname")
    return files


def create(store: Store, opts: RunOptions) -> tuple[ContainerRecord, ContainerSpec, Path]:
    from runtime.capabilities import resolve as resolve_caps

    if opts.network not in ("none", "host"):
        raise KilnError(f"unsupported --network {opts.network!r} (use none or host)")
    caps = resolve_caps(opts.cap_add, opts.cap_drop, privileged=opts.privileged)
    seccomp, nnp = _security(opts, caps)
    binds = [_parse_volume(v) for v in opts.volumes]
    tmpfs = [_parse_tmpfs(t) for t in opts.tmpfs]
    with store.writing():
        desc = store.resolve(opts.image)
        image = store.image_for(desc)
        config = image.config().get("config") or {}
        layer_dirs = [str(d) for d in store.unpack_image(image)]
        if opts.name and any(c.name == opts.name for c in list_containers(store)):
            raise KilnError(f"the container name {opts.name!r} is already in use")
        cid = os.urandom(32).hex()
        hostname = opts.hostname or cid[:12]
        argv = command_for(config, opts)
        directory = store.containers_dir / cid
        directory.mkdir(mode=0o700)
        try:
            for sub in ("upper", "work", "rootfs"):
                (directory / sub).mkdir(mode=0o755)
            record = ContainerRecord(cid, opts.name or f"kiln-{cid[:12]}", desc.digest,
                                     opts.image, argv, time.time())
            record.save(directory)
        except BaseException:
            remove_tree(directory)
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
        id=cid, layers=layer_dirs, upper=str(directory / "upper"),
        work=str(directory / "work"), rootfs=str(directory / "rootfs"), process=process,
        hostname=hostname, binds=binds, tmpfs=tmpfs,
        etc_files=_etc_files(directory, hostname, opts.network),
        readonly_rootfs=opts.read_only, network=opts.network, capabilities=caps,
        seccomp=seccomp, no_new_privileges=nnp, privileged=opts.privileged, init=opts.init,
    )
    return record, spec, directory


def run(store: Store, opts: RunOptions):
    """Create, start and wait for a container; returns its process.ExitStatus."""
    from runtime.cgroups import create_cgroup, parse_limits
    from runtime.process import Container

    limits = parse_limits(memory=opts.memory, memory_swap=opts.memory_swap, cpus=opts.cpus,
                          cpu_shares=opts.cpu_shares, pids_limit=opts.pids_limit)
    record, spec, directory = create(store, opts)
    cgroup = None
    try:
        cgroup = create_cgroup(f"kiln-{record.id[:12]}", limits)
        container = Container(spec, cgroup)
        def running(pid: int) -> None:
            record.status, record.pid = "running", pid
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
        if cgroup is not None:
            cgroup.remove()
        if opts.remove:
            remove_tree(directory)


def list_containers(store: Store) -> list[ContainerRecord]:
    out = []
    if store.containers_dir.is_dir():
        for entry in sorted(os.scandir(store.containers_dir), key=lambda e: e.name):
            try:
                out.append(ContainerRecord.load(Path(entry.path)))
            except (OSError, ValueError, TypeError):
                continue
    for rec in out:
        if rec.status == "running" and not _alive(rec.pid):
            rec.status = "exited"
    return out


def _alive(pid: int) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def find(store: Store, name_or_id: str) -> ContainerRecord:
    matches = [c for c in list_containers(store)
               if c.name == name_or_id or c.id.startswith(name_or_id)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise KilnError(f"no such container: {name_or_id}")
    raise KilnError(f"container ID prefix {name_or_id!r} is ambiguous")


def remove(store: Store, name_or_id: str, *, force: bool = False) -> str:
    rec = find(store, name_or_id)
    if rec.status == "running":
        if not force:
            raise KilnError(f"container {rec.name} is running; stop it first or use -f")
        import signal

        try:
            os.kill(rec.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    remove_tree(store.containers_dir / rec.id)
    return rec.id


