"""Linux capability names, Docker's default set, and how --cap-add/--cap-drop combine."""

from __future__ import annotations

from store.errors import KilnError

CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK",
    "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
]
CAP_NUMBER = {name: i for i, name in enumerate(CAPABILITIES)}

DOCKER_DEFAULT = frozenset({
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
})


_last_cap: list[int] = []  # read once per process: the kernel's answer cannot change


def last_cap() -> int:
    if not _last_cap:
        try:
            with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
                _last_cap.append(int(f.read()))
        except (OSError, ValueError):
            _last_cap.append(len(CAPABILITIES) - 1)
    return _last_cap[0]


def normalize(name: str) -> str:
    """'net_admin', 'NET_ADMIN' and 'CAP_NET_ADMIN' all name CAP_NET_ADMIN."""
    upper = name.strip().upper()
    if upper == "ALL":
        return "ALL"
    full = upper if upper.startswith("CAP_") else "CAP_" + upper
    if full not in CAP_NUMBER:
        raise KilnError(f"unknown capability {name!r}")
    return full


def resolve(cap_add: list[str] = (), cap_drop: list[str] = (), *,
            privileged: bool = False) -> frozenset[str]:
    """Docker's rule: start from the default set; drops apply, then adds (ALL allowed in both)."""
    top = last_cap()
    known = [c for c in CAPABILITIES if CAP_NUMBER[c] <= top]
    if privileged:
        return frozenset(known)
    adds = {normalize(c) for c in cap_add}
    drops = {normalize(c) for c in cap_drop}
    caps = set(DOCKER_DEFAULT)
    if "ALL" in drops:
        caps = set()
    caps -= drops
    caps |= set(known) if "ALL" in adds else adds - {"ALL"}
    return frozenset(c for c in caps if CAP_NUMBER[c] <= top)


def mask(caps: frozenset[str] | set[str]) -> int:
    value = 0
    for c in caps:
        value |= 1 << CAP_NUMBER[c]
    return value
