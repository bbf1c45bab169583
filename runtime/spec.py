"""The container spec: what a process may see and do (close to the OCI runtime spec)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/interrupts", "/proc/kcore", "/proc/keys",
    "/proc/latency_stats", "/proc/sched_debug", "/proc/scsi", "/proc/timer_list",
    "/proc/timer_stats", "/sys/firmware", "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


@dataclass(frozen=True)
class BindMount:
    source: str  # host path
    target: str  # path in the container, resolved inside the rootfs
    readonly: bool = False


@dataclass(frozen=True)
class TmpfsMount:
    target: str
    options: str = "rw,nosuid,nodev,noexec,size=65536k"


@dataclass
class ProcessSpec:
    args: list[str]
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    user: str = ""  # name|uid[:group|gid], resolved inside the container
    terminal: bool = False
    stdin: bool = False


@dataclass
class ContainerSpec:
    id: str
    layers: list[str]  # unpacked layer dirs, bottom layer first
    upper: str  # overlay upper and work dirs (kept per container)
    work: str
    rootfs: str  # where the overlay is mounted
    process: ProcessSpec
    hostname: str = ""
    binds: list[BindMount] = field(default_factory=list)
    tmpfs: list[TmpfsMount] = field(default_factory=list)
    etc_files: dict[str, str] = field(default_factory=dict)  # /etc/hosts -> host file
    readonly_rootfs: bool = False
    network: str = "none"  # none | host
    capabilities: frozenset[str] = frozenset()
    seccomp: bytes | None = None  # compiled BPF, None = unconfined
    no_new_privileges: bool = False
    privileged: bool = False
    init: bool = False
    masked_paths: tuple[str, ...] = MASKED_PATHS
    readonly_paths: tuple[str, ...] = READONLY_PATHS
    shm_size: int = 64 << 20
