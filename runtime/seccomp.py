"""Seccomp for containers: Docker's default profile, Docker-format profiles, and a compiler
from a profile to the classic-BPF program the kernel runs on every system call.

Semantics are Docker's (moby's profile conversion followed by runc's rule loading), with
these deliberate differences, all in the direction of refusing more:

- Only the native ABI is filtered.  A call from another ABI (i386 ``int 0x80`` on x86_64,
  x32 numbers with bit 30 set, AArch32 on aarch64) gets the profile's default action, or
  ENOSYS when that default action lets calls through.  Docker instead filters i386/x32 calls
  by name; kiln containers therefore cannot run 32-bit binaries.
- Arguments the kernel truncates to 32 bits (``socket``'s family, ``personality``, ...) are
  compared on their low word only, so junk in the high word cannot slip a forbidden family
  past a 64-bit comparison that the kernel then ignores.
- For one syscall, conditional rules are tried in profile order and the first that matches
  decides; the unconditional rule (if any) decides otherwise.  Two unconditional rules with
  different actions for one syscall are refused as ambiguous.
- SCMP_ACT_TRACE is emitted as SECCOMP_RET_TRACE: with no tracer attached, the kernel fails
  the call with ENOSYS, which is also what Docker's containers see.
"""

from __future__ import annotations

import errno as errno_codes
import json
import os
import platform
import re
import struct
from dataclasses import dataclass
from typing import Any

from runtime.syscall_table import SYSCALLS
from store.errors import KilnError

# linux/seccomp.h
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000

# linux/audit.h
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000
BPF_MAXINSNS = 4096
MAX_PROFILE_BYTES = 1 << 20
MAX_ERRNO = 4095

# struct seccomp_data offsets; both supported arches are little-endian
_OFF_NR = 0
_OFF_ARCH = 4


def _arg_offset(index: int, high: bool) -> int:
    return 16 + 8 * index + (4 if high else 0)


# classic BPF opcodes (linux/bpf_common.h)
BPF_LD_W_ABS = 0x20
BPF_ALU_AND_K = 0x54
BPF_JMP_JA = 0x05
BPF_JMP_JEQ_K = 0x15
BPF_JMP_JGT_K = 0x25
BPF_JMP_JGE_K = 0x35
BPF_RET_K = 0x06

_ARCH_NAMES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
# includes/excludes "arches" hold libseccomp's native names (what moby derives from GOARCH)
_PROFILE_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}

_ACTIONS = {
    "SCMP_ACT_KILL": SECCOMP_RET_KILL_THREAD,
    "SCMP_ACT_KILL_THREAD": SECCOMP_RET_KILL_THREAD,
    "SCMP_ACT_KILL_PROCESS": SECCOMP_RET_KILL_PROCESS,
    "SCMP_ACT_TRAP": SECCOMP_RET_TRAP,
    "SCMP_ACT_ERRNO": SECCOMP_RET_ERRNO,
    "SCMP_ACT_TRACE": SECCOMP_RET_TRACE,
    "SCMP_ACT_LOG": SECCOMP_RET_LOG,
    "SCMP_ACT_ALLOW": SECCOMP_RET_ALLOW,
}
_OPS = ("SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE",
        "SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ")
_FLAGS = ("SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG",
          "SECCOMP_FILTER_FLAG_SPEC_ALLOW", "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV")

# Arguments the kernel declares as 32-bit (int / unsigned int) or truncates itself
# (clone's flags go through lower_32_bits()); only their low word reaches the kernel.
ARGS_32BIT = {
    "socket": (0, 1, 2), "socketpair": (0, 1, 2), "personality": (0,), "clone": (0,),
    "setns": (0, 1), "prctl": (0,), "ioctl": (0, 1), "kill": (0, 1), "tgkill": (0, 1, 2),
}

_U64 = (1 << 64) - 1


class SeccompProfileError(KilnError):
    """A seccomp profile cannot be read, is malformed, or cannot be compiled."""


# -- Docker's default profile ------------------------------------------------------

_DEFAULT_ALLOW = """
accept accept4 access adjtimex alarm bind brk cachestat capget capset chdir chmod chown
chown32 clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime
clock_gettime64 clock_nanosleep clock_nanosleep_time64 close close_range connect
copy_file_range creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old
epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2 execve execveat exit
exit_group faccessat faccessat2 fadvise64 fadvise64_64 fallocate fanotify_mark fchdir fchmod
fchmodat fchmodat2 fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr flistxattr
flock fork fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 fsync ftruncate
ftruncate64 futex futex_requeue futex_time64 futex_wait futex_waitv futex_wake futimesat
getcpu getcwd getdents getdents64 getegid getegid32 geteuid geteuid32 getgid getgid32
getgroups getgroups32 getitimer getpeername getpgid getpgrp getpid getppid getpriority
getrandom getresgid getresgid32 getresuid getresuid32 getrlimit get_robust_list getrusage
getsid getsockname getsockopt get_thread_area gettid gettimeofday getuid getuid32 getxattr
getxattrat inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl
io_destroy io_getevents io_pgetevents io_pgetevents_time64 ioprio_get ioprio_set io_setup
io_submit ipc kill landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown
lchown32 lgetxattr link linkat listen listmount listxattr listxattrat llistxattr _llseek
lremovexattr lseek lsetxattr lstat lstat64 madvise map_shadow_stack membarrier memfd_create
memfd_secret mincore mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap mmap2 mprotect
mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedreceive_time64 mq_timedsend
mq_timedsend_time64 mq_unlink mremap mseal msgctl msgget msgrcv msgsnd msync munlock
munlockall munmap name_to_handle_at nanosleep newfstatat _newselect open openat openat2 pause
pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll
ppoll_time64 prctl pread64 preadv preadv2 prlimit64 process_mrelease pselect6
pselect6_time64 pwrite64 pwritev pwritev2 read readahead readlink readlinkat readv recv
recvfrom recvmmsg recvmmsg_time64 recvmsg remap_file_pages removexattr removexattrat rename
renameat renameat2 restart_syscall riscv_hwprobe rmdir rseq rt_sigaction rt_sigpending
rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait
rt_sigtimedwait_time64 rt_tgsigqueueinfo sched_getaffinity sched_getattr sched_getparam
sched_get_priority_max sched_get_priority_min sched_getscheduler sched_rr_get_interval
sched_rr_get_interval_time64 sched_setaffinity sched_setattr sched_setparam
sched_setscheduler sched_yield seccomp select semctl semget semop semtimedop
semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto setfsgid setfsgid32
setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer setpgid setpriority
setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid setreuid32
setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address setuid setuid32
setxattr setxattrat shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4
sigprocmask sigreturn socketcall socketpair splice stat stat64 statfs statfs64 statmount
statx symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill time timer_create
timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64
timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime timerfd_settime64 times
tkill truncate truncate64 ugetrlimit umask uname unlink unlinkat uretprobe utime utimensat
utimensat_time64 utimes vfork vmsplice wait4 waitid waitpid write writev
"""

_CLONE_NAMESPACE_FLAGS = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
_AF_ALG = 38
_AF_VSOCK = 40
# PER_LINUX, PER_LINUX32, UNAME26, PER_LINUX32|UNAME26, and 0xffffffff (query only)
_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

_CAP_GATED = (
    ("CAP_DAC_READ_SEARCH", "open_by_handle_at"),
    ("CAP_SYS_ADMIN", "bpf clone clone3 fanotify_init fsconfig fsmount fsopen fspick "
                      "lookup_dcookie lsm_get_self_attr lsm_list_modules lsm_set_self_attr mount "
                      "mount_setattr move_mount open_tree perf_event_open quotactl quotactl_fd "
                      "setdomainname sethostname setns syslog umount umount2 unshare"),
)
_CAP_GATED_AFTER_CLONE = (
    ("CAP_SYS_BOOT", "reboot"),
    ("CAP_SYS_CHROOT", "chroot"),
    ("CAP_SYS_MODULE", "delete_module init_module finit_module"),
    ("CAP_SYS_PACCT", "acct"),
    ("CAP_SYS_PTRACE", "kcmp pidfd_getfd process_madvise process_vm_readv process_vm_writev "
                       "ptrace"),
    ("CAP_SYS_RAWIO", "iopl ioperm"),
    ("CAP_SYS_TIME", "settimeofday stime clock_settime clock_settime64"),
    ("CAP_SYS_TTY_CONFIG", "vhangup"),
    ("CAP_SYS_NICE", "get_mempolicy mbind set_mempolicy set_mempolicy_home_node"),
    ("CAP_SYSLOG", "syslog"),
    ("CAP_BPF", "bpf"),
    ("CAP_PERFMON", "perf_event_open"),
)


def default_profile() -> dict:
    """Docker's default seccomp profile (moby profiles/seccomp/default.json) as Docker JSON.

    Follows moby as released with the AF_ALG fix (CVE-2026-31431): io_uring is not allowed,
    socket() is refused for AF_ALG (38) and AF_VSOCK (40) through three range rules.
    keyctl, add_key and request_key are not on the list, as in Docker.
    """
    def allow(names: str, **extra: Any) -> dict:
        return {"names": names.split(), "action": "SCMP_ACT_ALLOW", **extra}

    def arg0(op: str, value: int) -> list[dict]:
        return [{"index": 0, "value": value, "op": op}]

    def caps(*names: str) -> dict:
        return {"caps": list(names)}

    syscalls = [
        allow(_DEFAULT_ALLOW),
        allow("process_vm_readv process_vm_writev ptrace", includes={"minKernel": "4.8"}),
        allow("socket", args=arg0("SCMP_CMP_LT", _AF_ALG)),
        allow("socket", args=arg0("SCMP_CMP_EQ", _AF_ALG + 1)),
        allow("socket", args=arg0("SCMP_CMP_GT", _AF_VSOCK)),
        *(allow("personality", args=arg0("SCMP_CMP_EQ", p)) for p in _PERSONALITIES),
        allow("sync_file_range2 swapcontext", includes={"arches": ["ppc64le"]}),
        allow("arm_fadvise64_64 arm_sync_file_range sync_file_range2 breakpoint cacheflush "
              "set_tls", includes={"arches": ["arm", "arm64"]}),
        allow("arch_prctl", includes={"arches": ["amd64", "x32"]}),
        allow("modify_ldt", includes={"arches": ["amd64", "x32", "x86"]}),
        allow("s390_pci_mmio_read s390_pci_mmio_write s390_runtime_instr",
              includes={"arches": ["s390", "s390x"]}),
        allow("riscv_flush_icache", includes={"arches": ["riscv64"]}),
        *(allow(names, includes=caps(cap)) for cap, names in _CAP_GATED),
        allow("clone", args=arg0("SCMP_CMP_MASKED_EQ", _CLONE_NAMESPACE_FLAGS),
              excludes={"caps": ["CAP_SYS_ADMIN"], "arches": ["s390", "s390x"]}),
        allow("clone", args=[{"index": 1, "value": _CLONE_NAMESPACE_FLAGS,
                              "op": "SCMP_CMP_MASKED_EQ"}],
              comment="s390 parameter ordering for clone is different",
              includes={"arches": ["s390", "s390x"]}, excludes={"caps": ["CAP_SYS_ADMIN"]}),
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno_codes.ENOSYS,
         "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
        *(allow(names, includes=caps(cap)) for cap, names in _CAP_GATED_AFTER_CLONE),
    ]
    arch_map = [
        ("SCMP_ARCH_X86_64", ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]),
        ("SCMP_ARCH_AARCH64", ["SCMP_ARCH_ARM"]),
        ("SCMP_ARCH_MIPS64", ["SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64N32"]),
        ("SCMP_ARCH_MIPS64N32", ["SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64"]),
        ("SCMP_ARCH_MIPSEL64", ["SCMP_ARCH_MIPSEL", "SCMP_ARCH_MIPSEL64N32"]),
        ("SCMP_ARCH_MIPSEL64N32", ["SCMP_ARCH_MIPSEL", "SCMP_ARCH_MIPSEL64"]),
        ("SCMP_ARCH_S390X", ["SCMP_ARCH_S390"]),
        ("SCMP_ARCH_RISCV64", None),
        ("SCMP_ARCH_LOONGARCH64", None),
    ]
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": errno_codes.EPERM,
        "archMap": [{"architecture": a, "subArchitectures": s} for a, s in arch_map],
        "syscalls": syscalls,
    }


# -- the profile model ---------------------------------------------------------------

@dataclass(frozen=True)
class Action:
    """What the filter returns: a SECCOMP_RET_* value with its 16 data bits."""

    base: int
    data: int = 0

    @property
    def ret(self) -> int:
        return self.base | self.data

    @property
    def lets_through(self) -> bool:
        return self.base in (SECCOMP_RET_ALLOW, SECCOMP_RET_LOG)


@dataclass(frozen=True)
class _Condition:
    index: int
    op: str
    value: int
    value_two: int


@dataclass(frozen=True)
class _Selector:
    caps: tuple[str, ...] = ()
    arches: tuple[str, ...] = ()
    min_kernel: tuple[int, int] | None = None


@dataclass(frozen=True)
class _Rule:
    names: tuple[str, ...]
    action: Action
    conditions: tuple[_Condition, ...]
    includes: _Selector
    excludes: _Selector


@dataclass(frozen=True)
class _Profile:
    default: Action | None
    rules: tuple[_Rule, ...]

    @property
    def disabled(self) -> bool:
        """Docker runs a profile with no defaultAction and no syscalls unconfined."""
        return self.default is None and not self.rules


class _Parser:
    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, message: str) -> SeccompProfileError:
        location = f"{self.source}: {where}" if where else self.source
        return SeccompProfileError(f"seccomp profile {location}: {message}")

    def typed(self, value: Any, kind: type | tuple[type, ...], where: str, what: str) -> Any:
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise self.fail(where, f"{what} must be {_kind_name(kind)}, not {_json_name(value)}")
        return value

    def optional_list(self, obj: dict, key: str, where: str) -> list:
        value = obj.get(key)
        return [] if value is None else self.typed(value, list, where, f'"{key}"')

    def strings(self, obj: dict, key: str, where: str) -> tuple[str, ...]:
        items = self.optional_list(obj, key, where)
        return tuple(self.typed(s, str, where, f'each of "{key}"') for s in items)

    def errno_value(self, value: Any, where: str, key: str) -> int:
        self.typed(value, int, where, f'"{key}"')
        if not 0 <= value <= MAX_ERRNO:
            raise self.fail(where, f'"{key}" {value} is not an errno (0..{MAX_ERRNO})')
        return value

    def action(self, obj: dict, key: str, errno_key: str, where: str) -> Action:
        if obj.get(key) is None:
            raise self.fail(where, f'"{key}" is missing')
        name = self.typed(obj[key], str, where, f'"{key}"')
        if name == "SCMP_ACT_NOTIFY":
            raise self.fail(where, "SCMP_ACT_NOTIFY needs a seccomp agent; kiln has none")
        if name not in _ACTIONS:
            raise self.fail(where, f"unknown action {name!r} (known: {', '.join(_ACTIONS)})")
        base = _ACTIONS[name]
        errno_ret = obj.get(errno_key)
        if base in (SECCOMP_RET_ERRNO, SECCOMP_RET_TRACE):
            data = (errno_codes.EPERM if errno_ret is None
                    else self.errno_value(errno_ret, where, errno_key))
            return Action(base, data)
        if errno_ret is not None:
            raise self.fail(where, f'"{errno_key}" only goes with SCMP_ACT_ERRNO or '
                                   f"SCMP_ACT_TRACE, not {name}")
        return Action(base)

    def condition(self, arg: Any, where: str) -> _Condition:
        self.typed(arg, dict, where, "an args entry")
        index = self.typed(arg.get("index"), int, where, '"index"')
        if not 0 <= index <= 5:
            raise self.fail(where, f'"index" {index} is out of range (a syscall has args 0..5)')
        op = self.typed(arg.get("op"), str, where, '"op"')
        if op not in _OPS:
            raise self.fail(where, f"unknown comparison {op!r} (known: {', '.join(_OPS)})")
        values = []
        for key in ("value", "valueTwo"):
            v = arg.get(key, 0)
            self.typed(v, int, where, f'"{key}"')
            if not 0 <= v <= _U64:
                raise self.fail(where, f'"{key}" {v} does not fit in an unsigned 64-bit word')
            values.append(v)
        if "value" not in arg:
            raise self.fail(where, '"value" is missing')
        return _Condition(index, op, values[0], values[1])

    def selector(self, obj: dict, key: str, where: str) -> _Selector:
        sel = obj.get(key)
        if sel is None:
            return _Selector()
        where = f"{where}.{key}"
        self.typed(sel, dict, where, f'"{key}"')
        min_kernel = None
        if sel.get("minKernel") is not None:
            text = self.typed(sel["minKernel"], str, where, '"minKernel"')
            m = re.fullmatch(r"(\d+)\.(\d+)", text)
            if not m:
                raise self.fail(where, f'"minKernel" {text!r} is not MAJOR.MINOR, e.g. "4.8"')
            min_kernel = (int(m.group(1)), int(m.group(2)))
        caps = tuple(_normalize_cap(c) for c in self.strings(sel, "caps", where))
        return _Selector(caps, self.strings(sel, "arches", where), min_kernel)

    def rule(self, entry: Any, where: str) -> _Rule:
        self.typed(entry, dict, where, "a syscalls entry")
        names = self.strings(entry, "names", where)
        if entry.get("name") is not None:
            if names:
                raise self.fail(where, 'both "name" and "names" are given; use one')
            names = (self.typed(entry["name"], str, where, '"name"'),)
        if not names:
            raise self.fail(where, 'no syscall "names"')
        if any(not n for n in names):
            raise self.fail(where, "an empty syscall name")
        where = f"{where} ({names[0]}{', ...' if len(names) > 1 else ''})"
        action = self.action(entry, "action", "errnoRet", where)
        args = self.optional_list(entry, "args", where)
        conditions = tuple(self.condition(a, f"{where}.args[{i}]") for i, a in enumerate(args))
        return _Rule(names, action, conditions, self.selector(entry, "includes", where),
                     self.selector(entry, "excludes", where))

    def profile(self, doc: Any) -> _Profile:
        self.typed(doc, dict, "", "the profile")
        architectures = self.strings(doc, "architectures", "")
        arch_map = self.optional_list(doc, "archMap", "")
        if architectures and arch_map:
            raise self.fail("", 'both "architectures" and "archMap" are given; use one')
        for i, entry in enumerate(arch_map):
            where = f"archMap[{i}]"
            self.typed(entry, dict, where, "an archMap entry")
            self.typed(entry.get("architecture"), str, where, '"architecture"')
            self.strings(entry, "subArchitectures", where)
        for flag in self.strings(doc, "flags", ""):
            if flag not in _FLAGS:
                raise self.fail("", f"unknown flag {flag!r} (known: {', '.join(_FLAGS)})")
        entries = self.optional_list(doc, "syscalls", "")
        rules = tuple(self.rule(e, f"syscalls[{i}]") for i, e in enumerate(entries))
        if doc.get("defaultAction") in (None, "") and not rules:
            return _Profile(None, ())
        default = self.action(doc, "defaultAction", "defaultErrnoRet", "")
        return _Profile(default, rules)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _json_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "an integer",
            float: "a number with a fraction"}.get(type(value), type(value).__name__)


def _normalize_cap(name: str) -> str:
    upper = name.strip().upper()
    return upper if upper.startswith("CAP_") else "CAP_" + upper


def load_profile(path: str | os.PathLike) -> dict:
    """Read and validate a Docker-format seccomp profile (JSON, at most 1 MiB)."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as e:
        raise SeccompProfileError(f"cannot read seccomp profile {source}: {e.strerror}") from e
    if len(data) > MAX_PROFILE_BYTES:
        raise SeccompProfileError(f"seccomp profile {source} is larger than "
                                  f"{MAX_PROFILE_BYTES >> 20} MiB")
    try:
        doc = json.loads(data)
    except UnicodeDecodeError as e:
        raise SeccompProfileError(f"seccomp profile {source} is not UTF-8 text") from e
    except json.JSONDecodeError as e:
        raise SeccompProfileError(f"seccomp profile {source} is not valid JSON: {e.msg} at "
                                  f"line {e.lineno} column {e.colno}") from e
    _Parser(source).profile(doc)
    return doc


# -- compiling to BPF ----------------------------------------------------------------

def host_arch() -> str:
    machine = platform.machine()
    if machine not in _ARCH_NAMES:
        raise SeccompProfileError(f"seccomp filters are not supported on {machine} "
                                  "(only x86_64 and aarch64)")
    return _ARCH_NAMES[machine]


def _kernel_version(release: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        raise SeccompProfileError(f"cannot parse the kernel version {release!r}")
    return int(m.group(1)), int(m.group(2))


def _applies(rule: _Rule, caps: set[str], arch: str, kernel: tuple[int, int]) -> bool:
    """moby's includes/excludes: every included cap needed, any excluded cap disqualifies."""
    native = _PROFILE_ARCH[arch]
    ex, inc = rule.excludes, rule.includes
    if native in ex.arches or any(c in caps for c in ex.caps):
        return False
    if ex.min_kernel is not None and kernel >= ex.min_kernel:
        return False
    if inc.arches and native not in inc.arches:
        return False
    if not all(c in caps for c in inc.caps):
        return False
    return inc.min_kernel is None or kernel >= inc.min_kernel


@dataclass(frozen=True)
class _Checks:
    """A syscall whose outcome depends on its arguments: first matching rule wins."""

    name: str
    rules: tuple[tuple[tuple[_Condition, ...], Action], ...]
    otherwise: Action


def _split_same_index(rule: _Rule) -> list[tuple[_Condition, ...]]:
    """runc's rule: conditions on distinct args are ANDed; if one arg index repeats, every
    condition becomes a rule of its own (ORed)."""
    indexes = [c.index for c in rule.conditions]
    if len(set(indexes)) == len(indexes):
        return [rule.conditions]
    return [(c,) for c in rule.conditions]


def _decide(name: str, rules: list[_Rule], default: Action) -> Action | _Checks:
    unconditional = []
    conditional: list[tuple[tuple[_Condition, ...], Action]] = []
    for rule in rules:
        if not rule.conditions:
            if rule.action not in unconditional:
                unconditional.append(rule.action)
        else:
            conditional.extend((conds, rule.action) for conds in _split_same_index(rule))
    if len(unconditional) > 1:
        raise SeccompProfileError(f"seccomp profile: syscall {name} has rules without args "
                                  "and with different actions; keep one")
    otherwise = unconditional[0] if unconditional else default
    if all(action == otherwise for _, action in conditional):
        return otherwise
    return _Checks(name, tuple(conditional), otherwise)


class _Label:
    __slots__ = ()


@dataclass
class _Ins:
    code: int
    k: int = 0
    jt: _Label | None = None  # None: fall through to the next instruction
    jf: _Label | None = None

    @property
    def conditional(self) -> bool:
        return self.code in (BPF_JMP_JEQ_K, BPF_JMP_JGT_K, BPF_JMP_JGE_K)


def _ld(offset: int) -> _Ins:
    return _Ins(BPF_LD_W_ABS, offset)


def _ret(action: Action) -> _Ins:
    return _Ins(BPF_RET_K, action.ret)


def _jump(code: int, k: int, jt: _Label | None = None, jf: _Label | None = None) -> _Ins:
    return _Ins(code, k & 0xFFFFFFFF, jt, jf)


def _compare(cond: _Condition, fail: _Label, low_word_only: bool) -> list:
    """Code that falls through when the 64-bit argument satisfies ``cond``, else jumps to
    ``fail``.  Unsigned comparisons, high word first, as libseccomp does."""
    lo_off, hi_off = _arg_offset(cond.index, False), _arg_offset(cond.index, True)
    value = cond.value & 0xFFFFFFFF if low_word_only else cond.value
    v_lo, v_hi = value & 0xFFFFFFFF, value >> 32
    match = _Label()
    op = cond.op
    code: list = []
    if op == "SCMP_CMP_MASKED_EQ":
        mask, datum = cond.value, cond.value_two
        words = [(lo_off, mask & 0xFFFFFFFF, datum & 0xFFFFFFFF)]
        if not low_word_only:
            words.insert(0, (hi_off, mask >> 32, datum >> 32))
        for offset, m, d in words:
            if m == 0:
                if d != 0:
                    code.append(_Ins(BPF_JMP_JA, jt=fail))
                continue
            code += [_ld(offset), _Ins(BPF_ALU_AND_K, m), _jump(BPF_JMP_JEQ_K, d, jf=fail)]
        return code
    if low_word_only:
        code.append(_ld(lo_off))
        code.append({
            "SCMP_CMP_EQ": _jump(BPF_JMP_JEQ_K, v_lo, jf=fail),
            "SCMP_CMP_NE": _jump(BPF_JMP_JEQ_K, v_lo, jt=fail),
            "SCMP_CMP_GT": _jump(BPF_JMP_JGT_K, v_lo, jf=fail),
            "SCMP_CMP_GE": _jump(BPF_JMP_JGE_K, v_lo, jf=fail),
            "SCMP_CMP_LT": _jump(BPF_JMP_JGE_K, v_lo, jt=fail),
            "SCMP_CMP_LE": _jump(BPF_JMP_JGT_K, v_lo, jt=fail),
        }[op])
        return code
    if op == "SCMP_CMP_EQ":
        return [_ld(hi_off), _jump(BPF_JMP_JEQ_K, v_hi, jf=fail),
                _ld(lo_off), _jump(BPF_JMP_JEQ_K, v_lo, jf=fail)]
    if op == "SCMP_CMP_NE":
        return [_ld(hi_off), _jump(BPF_JMP_JEQ_K, v_hi, jf=match),
                _ld(lo_off), _jump(BPF_JMP_JEQ_K, v_lo, jt=fail), match]
    # ordered comparisons: decided by the high word unless it is equal
    if op in ("SCMP_CMP_GT", "SCMP_CMP_GE"):
        low = BPF_JMP_JGT_K if op == "SCMP_CMP_GT" else BPF_JMP_JGE_K
        return [_ld(hi_off), _jump(BPF_JMP_JGT_K, v_hi, jt=match),
                _jump(BPF_JMP_JEQ_K, v_hi, jf=fail),
                _ld(lo_off), _jump(low, v_lo, jf=fail), match]
    # LT is "not GE", LE is "not GT"
    low = BPF_JMP_JGE_K if op == "SCMP_CMP_LT" else BPF_JMP_JGT_K
    return [_ld(hi_off), _jump(BPF_JMP_JGT_K, v_hi, jt=fail),
            _jump(BPF_JMP_JEQ_K, v_hi, jf=match),
            _ld(lo_off), _jump(low, v_lo, jt=fail), match]


def _checks_code(checks: _Checks) -> list:
    low_args = ARGS_32BIT.get(checks.name, ())
    code: list = []
    for conditions, action in checks.rules:
        next_rule = _Label()
        for cond in conditions:
            code += _compare(cond, next_rule, cond.index in low_args)
        code += [_ret(action), next_rule]
    code.append(_ret(checks.otherwise))
    return code


def _dispatch(segments: list[tuple[int, Action | _Checks]]) -> list:
    """Binary search over syscall-number ranges; ``segments`` = (first number, outcome)."""
    if len(segments) == 1:
        outcome = segments[0][1]
        return [_ret(outcome)] if isinstance(outcome, Action) else _checks_code(outcome)
    mid = len(segments) // 2
    upper = _Label()
    return ([_jump(BPF_JMP_JGE_K, segments[mid][0], jt=upper)] + _dispatch(segments[:mid])
            + [upper] + _dispatch(segments[mid:]))


def _segments(outcomes: dict[int, Action | _Checks], default: Action, foreign: Action,
              arch: str) -> list[tuple[int, Action | _Checks]]:
    limit = X32_SYSCALL_BIT if arch == "x86_64" else 1 << 32
    segments: list[tuple[int, Action | _Checks]] = []

    def add(start: int, outcome: Action | _Checks) -> None:
        if segments and isinstance(outcome, Action) and segments[-1][1] == outcome:
            return
        segments.append((start, outcome))

    expected = 0
    for nr in sorted(outcomes):
        if nr > expected:
            add(expected, default)
        add(nr, outcomes[nr])
        expected = nr + 1
    if expected < limit:
        add(expected, default)
    if arch == "x86_64":
        add(X32_SYSCALL_BIT, foreign)
    return segments


def _assemble(items: list) -> bytes:
    """Resolve labels to jump offsets; conditional jumps reach 255 instructions at most, so
    farther targets get an unconditional ``ja`` trampoline right after the jump."""
    resolved: list = []
    for item in items:
        resolved.append(item)
        if isinstance(item, _Ins) and item.conditional and (item.jt is None or item.jf is None):
            after = _Label()
            item.jt = item.jt or after
            item.jf = item.jf or after
            resolved.append(after)
    items = resolved
    while True:
        position: dict[int, int] = {}
        pc = 0
        for item in items:
            if isinstance(item, _Label):
                position[id(item)] = pc
            else:
                pc += 1
        far: dict[int, list[_Label]] = {}
        pc = 0
        for item in items:
            if isinstance(item, _Ins):
                if item.conditional:
                    targets = [t for t in (item.jt, item.jf)
                               if position[id(t)] - pc - 1 > 255]
                    if targets:
                        far[id(item)] = list(dict.fromkeys(targets))
                pc += 1
        if not far:
            break
        expanded: list = []
        for item in items:
            expanded.append(item)
            for target in far.get(id(item), ()):
                hop = _Label()
                expanded += [hop, _Ins(BPF_JMP_JA, jt=target)]
                if item.jt is target:
                    item.jt = hop
                if item.jf is target:
                    item.jf = hop
        items = expanded
    out = bytearray()
    pc = 0
    for item in items:
        if isinstance(item, _Label):
            continue
        jt = jf = 0
        k = item.k
        if item.code == BPF_JMP_JA:
            k = position[id(item.jt)] - pc - 1
        elif item.conditional:
            jt = position[id(item.jt)] - pc - 1
            jf = position[id(item.jf)] - pc - 1
        if min(jt, jf, k if item.code == BPF_JMP_JA else 0) < 0:
            raise AssertionError("backward jump in a seccomp program")
        out += struct.pack("<HBBI", item.code, jt, jf, k)
        pc += 1
    return bytes(out)


def compile_profile(profile: dict, *, capabilities: set[str] | frozenset[str],
                    arch: str | None = None, kernel_release: str | None = None) -> bytes:
    """Compile a Docker-format profile to a seccomp BPF program (packed sock_filter[]).

    ``capabilities`` decide the includes/excludes "caps" (Docker uses the bounding set);
    ``arch`` defaults to this machine; ``kernel_release`` (default: uname) decides
    "minKernel".
    """
    parsed = _Parser("<profile>").profile(profile)
    if parsed.disabled:
        raise SeccompProfileError("seccomp profile has neither a defaultAction nor syscalls, "
                                  "which Docker runs unconfined; there is nothing to compile")
    if parsed.default is None:
        raise SeccompProfileError('seccomp profile has syscalls but no "defaultAction"')
    target = host_arch() if arch is None else _ARCH_NAMES.get(arch)
    if target is None:
        raise SeccompProfileError(f"unsupported seccomp architecture {arch!r} "
                                  f"(known: {', '.join(_ARCH_NAMES)})")
    caps = {_normalize_cap(c) for c in capabilities}
    kernel = _kernel_version(kernel_release or os.uname().release)
    table = SYSCALLS[target]
    default = parsed.default

    by_number: dict[int, list[_Rule]] = {}
    names: dict[int, str] = {}
    for rule in parsed.rules:
        if not _applies(rule, caps, target, kernel):
            continue
        for name in dict.fromkeys(rule.names):
            nr = table.get(name)
            if nr is None:
                continue  # not a syscall of this arch (or unknown): skipped, as Docker does
            by_number.setdefault(nr, []).append(rule)
            names[nr] = name
    outcomes = {nr: _decide(names[nr], rules, default) for nr, rules in by_number.items()}
    foreign = default if not default.lets_through else Action(SECCOMP_RET_ERRNO,
                                                              errno_codes.ENOSYS)
    ok = _Label()
    program = [_ld(_OFF_ARCH), _jump(BPF_JMP_JEQ_K, AUDIT_ARCH[target], jt=ok), _ret(foreign),
               ok, _ld(_OFF_NR)]
    program += _dispatch(_segments(outcomes, default, foreign, target))
    bpf = _assemble(program)
    if len(bpf) // 8 > BPF_MAXINSNS:
        raise SeccompProfileError(f"seccomp profile compiles to {len(bpf) // 8} BPF "
                                  f"instructions, more than the kernel's {BPF_MAXINSNS}")
    return bpf


def profile_for(option: str | None, capabilities: set[str] | frozenset[str]) -> bytes | None:
    """The filter for ``--security-opt seccomp=OPTION``: None means Docker's default profile,
    "unconfined" means no filter, anything else is a profile file."""
    if option is None:
        return compile_profile(default_profile(), capabilities=capabilities)
    if option == "unconfined":
        return None
    if not option:
        raise SeccompProfileError("--security-opt seccomp needs a value: unconfined or the "
                                  "path of a profile")
    profile = load_profile(option)
    if _Parser(option).profile(profile).disabled:
        return None
    return compile_profile(profile, capabilities=capabilities)
