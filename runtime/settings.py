"""--ulimit, --sysctl and --oom-score-adj: parsed as Docker parses them, and applied by
kiln to PID 1 from outside (prlimit, /proc/PID/oom_score_adj, and /proc/sys written from a
thread that has joined the container's namespace) before its program runs."""

from __future__ import annotations

import os

from runtime import syscalls as sc
from store.errors import KilnError

ULIMITS = {"core": 4, "cpu": 0, "data": 2, "fsize": 1, "locks": 10, "memlock": 8,
           "msgqueue": 12, "nice": 13, "nofile": 7, "nproc": 6, "rss": 5, "rtprio": 14,
           "rttime": 15, "sigpending": 11, "stack": 3, "as": 9}  # Linux RLIMIT_* numbers
_INFINITY = (1 << 64) - 1
# Docker's namespaced sysctls (its validator in daemon/oci_linux.go): IPC and network
IPC_SYSCTLS = ("kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem",
               "kernel.shmall", "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced")


def parse_ulimit(text: str) -> tuple[int, int, int]:
    """nofile=1024[:2048] -> (RLIMIT_NOFILE, 1024, 2048); -1 is unlimited."""
    name, eq, values = text.partition("=")
    if not eq or name not in ULIMITS:
        raise KilnError(f"invalid --ulimit {text!r}: want NAME=SOFT[:HARD] with NAME one of "
                        f"{', '.join(sorted(ULIMITS))}")
    soft_text, _, hard_text = values.partition(":")
    try:
        soft = int(soft_text)
        hard = int(hard_text) if hard_text else soft
    except ValueError:
        raise KilnError(f"invalid --ulimit {text!r}: the limits must be numbers") from None
    soft, hard = (_INFINITY if v == -1 else v for v in (soft, hard))
    if min(soft, hard) < 0:
        raise KilnError(f"invalid --ulimit {text!r}: limits are -1 (unlimited) or more")
    if soft > hard:
        raise KilnError(f"invalid --ulimit {text!r}: the soft limit {soft_text} is more than "
                        f"the hard limit {hard_text}")
    return ULIMITS[name], soft, hard


def parse_sysctl(text: str, network: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key or any(not part or not all(c.isalnum() or c in "_-" for c in part)
                                for part in key.split(".")):
        raise KilnError(f"invalid --sysctl {text!r}: want KEY=VALUE, KEY dotted words")
    if key in IPC_SYSCTLS or key.startswith("fs.mqueue."):
        return key, value
    if key.startswith("net."):
        if network == "host":
            raise KilnError(f"--sysctl {key}: not allowed with --network host (it would "
                            "change the host's network settings)")
        if network == "container":
            raise KilnError(f"--sysctl {key}: not allowed with --network container:... (the "
                            "network belongs to the other container)")
        return key, value
    raise KilnError(f"--sysctl {key}: not a namespaced sysctl (kiln allows net.*, "
                    "fs.mqueue.* and the IPC ones, as Docker)")


def parse_oom_score_adj(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not -1000 <= value <= 1000:
        raise KilnError(f"invalid --oom-score-adj {text!r}: a number from -1000 to 1000")
    return value


def apply_to(spec, pid: int) -> None:
    import resource

    for res, soft, hard in spec.rlimits:
        limits = tuple(resource.RLIM_INFINITY if v == _INFINITY else v for v in (soft, hard))
        try:
            resource.prlimit(pid, res, limits)
        except (OSError, ValueError) as e:
            name = next(n for n, r in ULIMITS.items() if r == res)
            raise KilnError(f"cannot set --ulimit {name}={soft}:{hard}: {e}") from None
    if spec.oom_score_adj is not None:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(spec.oom_score_adj))
    by_ns: dict[str, list[tuple[str, str]]] = {}
    for key, value in spec.sysctls.items():
        by_ns.setdefault("net" if key.startswith("net.") else "ipc", []).append((key, value))
    for ns, items in by_ns.items():
        _write_sysctls_in(pid, ns, items)


def _write_sysctls_in(pid: int, ns: str, items: list[tuple[str, str]]) -> None:
    """/proc/sys shows the namespaces of whoever opens it: this thread joins PID 1's for the
    writes, then returns to its own."""
    flag = sc.CLONE_NEWNET if ns == "net" else sc.CLONE_NEWIPC
    own = os.open(f"/proc/thread-self/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    theirs = os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        sc.setns(theirs, flag)
        try:
            for key, value in items:
                path = "/proc/sys/" + key.replace(".", "/")
                try:
                    with open(path, "w") as f:
                        f.write(value)
                except OSError as e:
                    raise KilnError(f"cannot set --sysctl {key}={value}: {e.strerror}") \
                        from None
        finally:
            sc.setns(own, flag)
    finally:
        os.close(own)
        os.close(theirs)
