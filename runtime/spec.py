"""The container spec: what a process may see and do (close to the OCI runtime spec).

These are plain classes, not dataclasses: ``kiln run`` imports this module on its start-up
path, where importing ``dataclasses`` (and with it ``inspect``) alone costs more than
mounting the container's filesystems. ``Record`` gives them a dataclass's repr and equality.
"""

from __future__ import annotations

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/interrupts", "/proc/kcore", "/proc/keys",
    "/proc/latency_stats", "/proc/sched_debug", "/proc/scsi", "/proc/timer_list",
    "/proc/timer_stats", "/sys/firmware", "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


class Record:
    """Equality and repr over the attributes ``__init__`` sets, in that order."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"

    def _compared(self) -> dict:
        """The fields equality (and a frozen record's hash) looks at."""
        return vars(self)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._compared() == other._compared()

    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass with eq


class FrozenRecord(Record):
    """A value that cannot change once made, and so can be hashed."""

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of {type(self).__name__}")

    def __hash__(self) -> int:  # type: ignore[override]
        return hash((type(self), *self._compared().values()))

    def _set(self, **fields: object) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)


class BindMount(FrozenRecord):
    source: str  # host path
    target: str  # path in the container, resolved inside the rootfs
    readonly: bool
    subpath: str  # a directory inside source, made if missing, resolved inside source

    def __init__(self, source: str, target: str, readonly: bool = False, subpath: str = ""):
        self._set(source=source, target=target, readonly=readonly, subpath=subpath)


class TmpfsMount(FrozenRecord):
    target: str
    options: str

    def __init__(self, target: str, options: str = "rw,nosuid,nodev,noexec,size=65536k"):
        self._set(target=target, options=options)


class ProcessSpec(Record):
    def __init__(self, args: list[str], env: list[str] | None = None, cwd: str = "/",
                 user: str = "", terminal: bool = False, stdin: bool = False,
                 stdout: int | None = None, stderr: int | None = None):
        self.args = args
        self.env = [] if env is None else env
        self.cwd = cwd
        self.user = user  # name|uid[:group|gid], resolved inside the container
        self.terminal = terminal
        self.stdin = stdin
        # fds of kiln's that become the process's stdout and stderr (None: kiln's own); a
        # build relays a RUN step's output through them (builder.output)
        self.stdout = stdout
        self.stderr = stderr


class ContainerSpec(Record):
    def __init__(
        self, id: str, layers: list[str], upper: str, work: str, rootfs: str,
        process: ProcessSpec, hostname: str = "", binds: list[BindMount] | None = None,
        tmpfs: list[TmpfsMount] | None = None, etc_files: dict[str, str] | None = None,
        readonly_rootfs: bool = False, network: str = "none", netns_fd: int | None = None,
        capabilities: frozenset[str] = frozenset(), seccomp: bytes | None = None,
        no_new_privileges: bool = False, privileged: bool = False, init: bool = False,
        masked_paths: tuple[str, ...] = MASKED_PATHS,
        readonly_paths: tuple[str, ...] = READONLY_PATHS, shm_size: int = 64 << 20,
        rlimits: list[tuple[int, int, int]] | None = None,
        sysctls: dict[str, str] | None = None, oom_score_adj: int | None = None,
        devices: list[tuple[str, str, bool]] | None = None,
        id_map: tuple[int, int] | None = None,
    ):
        self.id = id
        self.layers = layers  # unpacked layer dirs, bottom layer first
        self.upper = upper  # overlay upper and work dirs (kept per container)
        self.work = work
        self.rootfs = rootfs  # where the overlay is mounted
        self.process = process
        self.hostname = hostname
        self.binds = [] if binds is None else binds
        self.tmpfs = [] if tmpfs is None else tmpfs
        self.etc_files = {} if etc_files is None else etc_files  # /etc/hosts -> host file
        self.readonly_rootfs = readonly_rootfs
        self.network = network  # none | host | bridge (a new netns) | container (netns_fd's)
        self.netns_fd = netns_fd
        self.capabilities = capabilities
        self.seccomp = seccomp  # compiled BPF, None = unconfined
        self.no_new_privileges = no_new_privileges
        self.privileged = privileged
        self.init = init
        self.masked_paths = masked_paths
        self.readonly_paths = readonly_paths
        self.shm_size = shm_size
        self.rlimits = [] if rlimits is None else rlimits  # (RLIMIT_*, soft, hard)
        self.sysctls = {} if sysctls is None else sysctls  # namespaced ones only
        self.oom_score_adj = oom_score_adj
        self.devices = [] if devices is None else devices  # (host node, path inside, writable)
        # --userns=auto: (first host id, count) that container ids 0.. map to; the layers
        # are idmapped onto it (runtime.userns)
        self.id_map = id_map
        self.userns_fd: int | None = None  # that namespace, while the container starts
