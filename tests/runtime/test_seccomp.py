"""Seccomp: Docker's default profile and Docker-format profiles, compiled to BPF by kiln.

Real filters are installed in forked children (no_new_privs + seccomp) and the children report
the errno each probe got; a small classic-BPF interpreter runs the same programs on
hand-made seccomp_data to cover what a process cannot easily ask for (other ABIs, every
syscall number, every comparison edge), and is itself checked against the kernel.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import platform
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime import seccomp, syscalls
from runtime.capabilities import DOCKER_DEFAULT
from runtime.seccomp import (
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    SeccompProfileError,
    compile_profile,
    default_profile,
    load_profile,
    profile_for,
)
from runtime.syscall_table import SYSCALLS
from store.errors import KilnError

ARCH = {"x86_64": "x86_64", "aarch64": "aarch64"}.get(platform.machine())
pytestmark = pytest.mark.skipif(ARCH is None, reason="seccomp filters: x86_64 and aarch64 only")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the baselines assume root")

NR = SYSCALLS.get(ARCH or "x86_64", {})
EPERM, ENOSYS = errno.EPERM, errno.ENOSYS
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_ARM = 0x40000028
SIGCHLD = int(signal.SIGCHLD)


def default_filter(caps=DOCKER_DEFAULT) -> bytes:
    return compile_profile(default_profile(), capabilities=set(caps))


# -- running probes in a filtered child -------------------------------------------------

@dataclass
class Child:
    value: object
    signal: int | None


def run_child(probe, bpf: bytes | None, timeout: float = 20.0) -> Child:
    """Fork; the child sets no_new_privs, installs ``bpf`` (unless None), runs ``probe()`` and
    sends its JSON result back.  A child killed by a signal reports the signal."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(r)
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGSYS would dump core
            syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
            if bpf is not None:
                syscalls.seccomp_set_filter(bpf)
            out = json.dumps({"value": probe()}).encode()
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
            out = json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
        try:
            while out:
                out = out[os.write(w, out):]
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                pytest.fail("the filtered child hung")
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return Child(None, os.WTERMSIG(status))
    result = json.loads(data)
    if "error" in result:
        pytest.fail(f"the probe failed in the child: {result['error']}")
    return Child(result["value"], None)


def errno_of(fn) -> int:
    try:
        fn()
    except OSError as e:
        return e.errno
    return 0


def sys_errno(name: str, *args: int) -> int:
    return errno_of(lambda: syscalls.syscall(NR[name], *args))


def raw_clone(flags: int) -> int:
    """clone(2) without a new stack, i.e. a bare fork; the new process exits at once."""
    try:
        pid = syscalls.syscall(NR["clone"], flags | SIGCHLD, 0, 0, 0, 0)
    except OSError as e:
        return e.errno
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return 0


def socket_errno(family: int, kind: int = socket.SOCK_STREAM) -> int:
    def make():
        socket.socket(family, kind).close()
    return errno_of(make)


# -- what the default profile refuses, and what the kernel would have said ------------------

DANGEROUS = {  # name: harmless arguments that fail (or succeed) with something other than EPERM
    "keyctl": (0, -3, 0), "add_key": (0, 0, 0, 0, 0), "request_key": (0, 0, 0, 0),
    "bpf": (0x7FFF, 0, 0), "setns": (-1, 0), "reboot": (0, 0, 0, 0),
    "init_module": (0, 0, 0), "finit_module": (-1, 0, 0), "delete_module": (0, 0),
    "swapon": (0, 0), "swapoff": (0,), "kexec_load": (0, 0, 0, 0),
    "kexec_file_load": (-1, -1, 0, 0, 0), "open_by_handle_at": (-1, 0, 0),
    "perf_event_open": (0, 0, -1, -1, 0), "acct": (1,), "settimeofday": (1, 0),
    "clock_settime": (1234, 0), "iopl": (99,), "ioperm": (0x10000, 1, 1), "syslog": (10, 0, 0),
    "sethostname": (1, 5), "setdomainname": (1, 5), "quotactl": (0, 0, 0, 0),
    "userfaultfd": (0,), "pivot_root": (1, 1), "get_mempolicy": (0, 0, 0, 0, 0),
    "mbind": (0, 0, 0, 0, 0, 0), "move_pages": (0, 0, 0, 0, 0, 0), "migrate_pages": (0, 0, 0, 0),
    "fanotify_init": (0xFFFFFFFF, 0), "fsopen": (0, 0), "open_tree": (-1, 1, 0),
    "umount2": (1, 0), "mount": (0, 1, 0, 0, 0), "kcmp": (0x7FFFFFF0, 0x7FFFFFF0, 99, 0, 0),
    "pidfd_getfd": (-1, 0, 0), "process_madvise": (-1, 0, 0, 0, 0), "io_uring_setup": (0, 0),
    "unshare": (syscalls.CLONE_NEWUSER,), "lookup_dcookie": (0, 0, 0), "nfsservctl": (0, 0, 0),
    "uselib": (0,),
}


def probe_dangerous() -> dict:
    return {name: sys_errno(name, *args) for name, args in DANGEROUS.items() if name in NR}


@needs_root
def test_default_profile_refuses_the_dangerous_calls_with_eperm():
    baseline = run_child(probe_dangerous, None).value
    filtered = run_child(probe_dangerous, default_filter()).value
    assert baseline.keys() == filtered.keys() and len(filtered) >= 40
    assert {n: e for n, e in filtered.items() if e != EPERM} == {}
    # without the filter none of these is an EPERM, so the EPERMs above come from seccomp
    assert {n: e for n, e in baseline.items() if e == EPERM} == {}


@needs_root
def test_default_profile_lets_ordinary_programs_work(tmp_path):
    target = tmp_path / "file"

    def probe():
        import mmap

        r, w = os.pipe()
        os.write(w, b"x")
        out = {"pipe": os.read(r, 1).decode(), "getpid": os.getpid() > 0}
        with open(target, "w") as f:
            f.write("data")
        with open(target, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            out["mmap"] = m[:4].decode()
        out["exec_true"] = subprocess.run(["/bin/true"]).returncode
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        seen = []
        t = threading.Thread(target=seen.append, args=(1,))
        t.start()
        t.join()
        out["thread"] = seen
        out["ptrace"] = sys_errno("ptrace", 7, os.getpid(), 0, 0)  # PTRACE_CONT, not traced
        out["chroot"] = errno_of(lambda: os.chroot("/nonexistent-kiln"))
        out["clock_gettime"] = time.clock_gettime(time.CLOCK_MONOTONIC) > 0
        return out

    child = run_child(probe, default_filter())
    assert child.value == {
        "pipe": "x", "getpid": True, "mmap": "data", "exec_true": 0, "fork": 7,
        "thread": [1], "ptrace": errno.ESRCH, "chroot": errno.ENOENT, "clock_gettime": True,
    }


@needs_root
def test_clone_with_namespace_flags_is_refused_but_fork_and_threads_work():
    flags = {"NEWNS": syscalls.CLONE_NEWNS, "NEWUTS": syscalls.CLONE_NEWUTS,
             "NEWIPC": syscalls.CLONE_NEWIPC, "NEWUSER": syscalls.CLONE_NEWUSER,
             "NEWPID": syscalls.CLONE_NEWPID, "NEWNET": syscalls.CLONE_NEWNET,
             "NEWCGROUP": syscalls.CLONE_NEWCGROUP}

    def probe():
        out = {name: raw_clone(flag) for name, flag in flags.items()}
        out["plain"] = raw_clone(0)
        out["clone3"] = sys_errno("clone3", 0, 0)
        return out

    baseline = run_child(probe, None).value
    assert baseline == {**dict.fromkeys(flags, 0), "plain": 0, "clone3": errno.EINVAL}
    filtered = run_child(probe, default_filter()).value
    assert filtered == {**dict.fromkeys(flags, EPERM), "plain": 0, "clone3": ENOSYS}


@needs_root
def test_socket_families_alg_and_vsock_are_refused():
    def probe():
        return {
            "inet": socket_errno(socket.AF_INET), "inet6": socket_errno(socket.AF_INET6),
            "unix": socket_errno(socket.AF_UNIX),
            "netlink": socket_errno(socket.AF_NETLINK, socket.SOCK_RAW),
            "vsock": socket_errno(socket.AF_VSOCK),
            "alg": socket_errno(socket.AF_ALG, socket.SOCK_SEQPACKET),
            # the kernel reads the family as an int: junk in the high word is dropped
            "vsock_high_junk": sys_errno("socket", (1 << 32) | socket.AF_VSOCK,
                                         socket.SOCK_STREAM, 0),
            "inet_high_junk": sys_errno("socket", (7 << 32) | socket.AF_INET,
                                        socket.SOCK_STREAM, 0),
        }

    baseline = run_child(probe, None).value
    filtered = run_child(probe, default_filter()).value
    assert baseline["vsock"] == 0 and baseline["vsock_high_junk"] == 0  # a real bypass target
    assert baseline["alg"] in (0, errno.EAFNOSUPPORT)
    assert filtered == {"inet": 0, "inet6": 0, "unix": 0, "netlink": 0, "vsock": EPERM,
                        "alg": EPERM, "vsock_high_junk": EPERM, "inet_high_junk": 0}


@needs_root
def test_personality_only_with_docker_values():
    allowed = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
    # ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC, ...; the kernel reads an unsigned int, so junk in
    # the high word neither hides a refused value nor spoils an allowed one
    refused = (0x40000, 0x400000, 0x0008000, 0x1, (1 << 32) | 0x40000)
    allowed += ((1 << 32) | 0x8,)

    def probe():
        return {hex(p): sys_errno("personality", p) for p in allowed + refused}

    baseline = run_child(probe, None).value
    assert all(e != EPERM for e in baseline.values())
    filtered = run_child(probe, default_filter()).value
    assert filtered == {**{hex(p): 0 for p in allowed}, **{hex(p): EPERM for p in refused}}


@needs_root
def test_cap_sys_admin_opens_the_gated_calls():
    gated = ("mount", "umount2", "setns", "bpf", "perf_event_open", "fsopen", "open_tree",
             "quotactl", "fanotify_init", "sethostname", "syslog")

    def probe():
        out = {name: sys_errno(name, *DANGEROUS[name]) for name in gated}
        out["unshare_newns"] = sys_errno("unshare", syscalls.CLONE_NEWNS)
        out["unshare_newuser"] = sys_errno("unshare", syscalls.CLONE_NEWUSER)
        out["clone_newns"] = raw_clone(syscalls.CLONE_NEWNS)
        out["clone3"] = sys_errno("clone3", 0, 0)
        out["keyctl"] = sys_errno("keyctl", *DANGEROUS["keyctl"])  # not gated: never allowed
        out["reboot"] = sys_errno("reboot", *DANGEROUS["reboot"])  # CAP_SYS_BOOT, not ADMIN
        return out

    baseline = run_child(probe, None).value
    child = run_child(probe, default_filter(DOCKER_DEFAULT | {"CAP_SYS_ADMIN"})).value
    assert child == {**baseline, "keyctl": EPERM, "reboot": EPERM}
    assert child["unshare_newns"] == 0 and child["clone_newns"] == 0
    assert child["clone3"] == errno.EINVAL  # no longer ENOSYS


@needs_root
@pytest.mark.parametrize("cap, name", [
    ("CAP_SYS_BOOT", "reboot"), ("CAP_SYS_MODULE", "init_module"), ("CAP_SYS_TIME", "settimeofday"),
    ("CAP_SYS_PACCT", "acct"), ("CAP_SYSLOG", "syslog"), ("CAP_SYS_NICE", "get_mempolicy"),
    ("CAP_SYS_RAWIO", "iopl"), ("CAP_SYS_PTRACE", "kcmp"), ("CAP_DAC_READ_SEARCH",
                                                           "open_by_handle_at"),
    ("CAP_BPF", "bpf"), ("CAP_PERFMON", "perf_event_open"),
])
def test_each_capability_opens_its_own_calls(cap, name):
    if name not in NR:
        pytest.skip(f"{name} does not exist on {ARCH}")

    def probe():
        return sys_errno(name, *DANGEROUS[name])

    with_cap = run_child(probe, default_filter(DOCKER_DEFAULT | {cap})).value
    assert with_cap != EPERM and with_cap == run_child(probe, None).value


@needs_root
@pytest.mark.skipif(ARCH != "x86_64", reason="x32 is an x86_64 ABI")
def test_x32_syscall_numbers_are_refused():
    def probe():
        return {"x32_getpid": errno_of(lambda: syscalls.syscall(0x40000000 | NR["getpid"]))}

    assert run_child(probe, None).value == {"x32_getpid": ENOSYS}  # no x32 ABI on this kernel
    assert run_child(probe, default_filter()).value == {"x32_getpid": EPERM}
    allow_all = compile_profile({"defaultAction": "SCMP_ACT_ALLOW"}, capabilities=set())
    assert run_child(probe, allow_all).value == {"x32_getpid": ENOSYS}


def i386_getuid_program(path: Path) -> Path:
    """A 120-byte x86_64 ELF that asks getuid32 through the i386 ABI (int 0x80) and exits
    with -result, i.e. 0 for uid 0 and the errno when seccomp refuses."""
    code = bytes.fromhex(
        "b8c7000000"  # mov eax, 199 (i386 getuid32)
        "cd80"  # int 0x80
        "f7d8"  # neg eax
        "89c7"  # mov edi, eax
        "b83c000000"  # mov eax, 60 (x86_64 exit)
        "0f05"  # syscall
    )
    base, entry_offset = 0x400000, 64 + 56
    size = entry_offset + len(code)
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, base + entry_offset, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    program = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    path.write_bytes(header + program + code)
    path.chmod(0o755)
    return path


@needs_root
@pytest.mark.skipif(ARCH != "x86_64", reason="int 0x80 is an x86 instruction")
def test_i386_int80_syscalls_are_refused(tmp_path):
    program = str(i386_getuid_program(tmp_path / "i386-getuid"))

    def probe():
        return subprocess.run([program]).returncode

    if run_child(probe, None).value != 0:
        pytest.skip("this kernel has no IA32 emulation")
    assert run_child(probe, default_filter()).value == EPERM
    allow_all = compile_profile({"defaultAction": "SCMP_ACT_ALLOW"}, capabilities=set())
    assert run_child(probe, allow_all).value == ENOSYS  # never the allow-all of another ABI


# -- custom profiles -------------------------------------------------------------------

def write_profile(tmp_path: Path, doc, name: str = "profile.json") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_unconfined_means_no_filter(tmp_path):
    assert profile_for("unconfined", set(DOCKER_DEFAULT)) is None
    assert profile_for(str(write_profile(tmp_path, {})), set()) is None  # Docker: unconfined too
    assert profile_for(None, set(DOCKER_DEFAULT)) == default_filter()


@needs_root
def test_custom_profile_does_what_it_says(tmp_path):
    path = write_profile(tmp_path, {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["mkdir", "mkdirat", "no_such_syscall"], "action": "SCMP_ACT_ERRNO",
             "errnoRet": 13},
            {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 0},
            {"names": ["getpgid"], "action": "SCMP_ACT_TRACE"},
            {"names": ["getsid"], "action": "SCMP_ACT_LOG"},
        ],
    })
    bpf = profile_for(str(path), set())
    directory = tmp_path / "newdir"

    def probe():
        return {"mkdir": errno_of(lambda: os.mkdir(directory)),
                "getppid": syscalls.syscall(NR["getppid"]),  # ERRNO 0: "succeeds", does nothing
                "getpgid": sys_errno("getpgid", 0),  # TRACE without a tracer
                "getsid": errno_of(lambda: os.getsid(0)), "keyctl": sys_errno("keyctl", 0, -3, 0)}

    assert run_child(probe, bpf).value == {"mkdir": errno.EACCES, "getppid": 0,
                                           "getpgid": ENOSYS, "getsid": 0, "keyctl": 0}
    assert not directory.exists()


@needs_root
@pytest.mark.parametrize("action, expected_signal", [
    ("SCMP_ACT_KILL", signal.SIGSYS), ("SCMP_ACT_KILL_THREAD", signal.SIGSYS),
    ("SCMP_ACT_KILL_PROCESS", signal.SIGSYS), ("SCMP_ACT_TRAP", signal.SIGSYS),
])
def test_killing_actions_kill(action, expected_signal):
    bpf = compile_profile({"defaultAction": "SCMP_ACT_ALLOW",
                           "syscalls": [{"names": ["getppid"], "action": action}]},
                          capabilities=set())
    child = run_child(lambda: syscalls.syscall(NR["getppid"]), bpf)
    assert child.signal == expected_signal


@pytest.mark.parametrize("doc, message", [
    ("{not json", "is not valid JSON"),
    ([], "the profile must be an object, not a list"),
    ({"defaultAction": "SCMP_ACT_DENY"}, "unknown action 'SCMP_ACT_DENY'"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 70000}, "is not an errno"),
    ({"defaultAction": "SCMP_ACT_NOTIFY"}, "needs a seccomp agent"),
    ({"syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]},
     '"defaultAction" is missing'),
    ({"defaultAction": 1}, '"defaultAction" must be a string, not an integer'),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "ALLOW"}]},
     "syscalls[0] (read): unknown action 'ALLOW'"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"action": "SCMP_ACT_ERRNO"}]},
     'no syscall "names"'),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["read"], "name": "write", "action": "SCMP_ACT_ERRNO"}]}, 'both "name"'),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": "read",
                                                       "action": "SCMP_ACT_ERRNO"}]},
     '"names" must be a list, not a string'),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"],
                                                       "action": "SCMP_ACT_ALLOW",
                                                       "errnoRet": 1}]},
     '"errnoRet" only goes with SCMP_ACT_ERRNO'),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["socket"],
      "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_IN"}]}]},
     "syscalls[0] (socket).args[0]: unknown comparison 'SCMP_CMP_IN'"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["socket"],
      "action": "SCMP_ACT_ERRNO", "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]},
     '"index" 6 is out of range'),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["socket"],
      "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}]}]},
     "does not fit in an unsigned 64-bit word"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["socket"],
      "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "op": "SCMP_CMP_EQ"}]}]},
     '"value" is missing'),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["ptrace"],
      "action": "SCMP_ACT_ERRNO", "includes": {"minKernel": "4"}}]}, "is not MAJOR.MINOR"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
      "archMap": [{"architecture": "SCMP_ARCH_X86_64"}]}, 'both "architectures" and "archMap"'),
    ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_FAST"]},
     "unknown flag"),
])
def test_malformed_profiles_are_refused_clearly(tmp_path, doc, message):
    path = write_profile(tmp_path, doc)
    with pytest.raises(KilnError) as info:
        load_profile(path)
    assert message in str(info.value) and str(path) in str(info.value)
    with pytest.raises(SeccompProfileError):
        profile_for(str(path), set())


def test_unreadable_and_oversized_profiles(tmp_path):
    with pytest.raises(SeccompProfileError, match="cannot read seccomp profile .*No such file"):
        load_profile(tmp_path / "missing.json")
    big = write_profile(tmp_path, '{"defaultAction": "SCMP_ACT_ALLOW", "comment": "'
                        + "x" * (1 << 20) + '"}')
    with pytest.raises(SeccompProfileError, match="larger than 1 MiB"):
        load_profile(big)
    with pytest.raises(SeccompProfileError, match="needs a value"):
        profile_for("", set())


def test_conflicting_unconditional_rules_are_refused():
    doc = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["read"], "action": "SCMP_ACT_KILL"}]}
    with pytest.raises(SeccompProfileError, match="syscall read has rules without args"):
        compile_profile(doc, capabilities=set())


# -- a classic-BPF interpreter ------------------------------------------------------------

def decode(bpf: bytes) -> list[tuple[int, int, int, int]]:
    assert bpf and len(bpf) % 8 == 0
    return [struct.unpack_from("<HBBI", bpf, i) for i in range(0, len(bpf), 8)]


def check_program(bpf: bytes) -> list[tuple[int, int, int, int]]:
    """What the kernel's seccomp checker would insist on, for the opcodes kiln emits."""
    insns = decode(bpf)
    assert len(insns) <= 4096
    for pc, (code, jt, jf, k) in enumerate(insns):
        assert code in (0x20, 0x54, 0x05, 0x15, 0x25, 0x35, 0x06), hex(code)
        if code == 0x20:
            assert k % 4 == 0 and k + 4 <= 64
        if code == 0x05:
            assert pc + 1 + k < len(insns)
        if code in (0x15, 0x25, 0x35):
            assert pc + 1 + max(jt, jf) < len(insns)
    assert insns[-1][0] == 0x06
    return insns


def run_bpf(insns, nr: int, arch: int, args=(0, 0, 0, 0, 0, 0)) -> int:
    data = struct.pack("<IIQ6Q", nr & 0xFFFFFFFF, arch, 0, *(a & (2**64 - 1) for a in args))
    a, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:
            a = int.from_bytes(data[k:k + 4], "little")
        elif code == 0x54:
            a &= k
        elif code == 0x05:
            pc += k
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x25:
            pc += jt if a > k else jf
        elif code == 0x35:
            pc += jt if a >= k else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"opcode {code:#x}")


AUDIT = seccomp.AUDIT_ARCH


def errno_ret(n: int) -> int:
    return SECCOMP_RET_ERRNO | n


# The semantics, written plainly, to check the compiled programs against.
ACTION_BASE = {"SCMP_ACT_ALLOW": SECCOMP_RET_ALLOW, "SCMP_ACT_ERRNO": SECCOMP_RET_ERRNO,
               "SCMP_ACT_KILL": 0, "SCMP_ACT_KILL_PROCESS": 0x80000000,
               "SCMP_ACT_TRAP": 0x30000, "SCMP_ACT_TRACE": 0x7FF00000, "SCMP_ACT_LOG": 0x7FFC0000}
GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def reference_action(profile, caps, arch, nr, args=(0,) * 6, kernel=(6, 1)) -> int:
    def ret(obj, action_key, errno_key):
        base = ACTION_BASE[obj[action_key]]
        if base in (SECCOMP_RET_ERRNO, 0x7FF00000):
            return base | obj.get(errno_key, EPERM)
        return base

    default = ret(profile, "defaultAction", "defaultErrnoRet")
    names = [n for n, v in SYSCALLS[arch].items() if v == nr]
    if not names:
        return default
    name = names[0]
    low = seccomp.ARGS_32BIT.get(name, ())
    matches_conditional, unconditional = [], []
    for rule in profile.get("syscalls", []):
        if name not in rule["names"]:
            continue
        inc, exc = rule.get("includes", {}), rule.get("excludes", {})
        if GOARCH[arch] in exc.get("arches", []) or set(exc.get("caps", [])) & caps:
            continue
        if inc.get("arches") and GOARCH[arch] not in inc["arches"]:
            continue
        if not set(inc.get("caps", [])) <= caps:
            continue
        if "minKernel" in inc and kernel < tuple(map(int, inc["minKernel"].split("."))):
            continue
        action = ret(rule, "action", "errnoRet")
        conds = rule.get("args", [])
        if not conds:
            unconditional.append(action)
            continue
        indexes = [c["index"] for c in conds]
        groups = [conds] if len(set(indexes)) == len(indexes) else [[c] for c in conds]
        for group in groups:
            if all(holds(c, args[c["index"]], c["index"] in low) for c in group):
                matches_conditional.append(action)
    if matches_conditional:
        return matches_conditional[0]
    return unconditional[0] if unconditional else default


def holds(cond, arg, low_word_only) -> bool:
    value, two = cond["value"], cond.get("valueTwo", 0)
    if low_word_only:
        arg, value, two = arg & 0xFFFFFFFF, value & 0xFFFFFFFF, two & 0xFFFFFFFF
    return {"SCMP_CMP_EQ": arg == value, "SCMP_CMP_NE": arg != value, "SCMP_CMP_LT": arg < value,
            "SCMP_CMP_LE": arg <= value, "SCMP_CMP_GT": arg > value, "SCMP_CMP_GE": arg >= value,
            "SCMP_CMP_MASKED_EQ": (arg & value) == two}[cond["op"]]


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
@pytest.mark.parametrize("caps", [set(), set(DOCKER_DEFAULT), set(DOCKER_DEFAULT) | {
    "CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_BPF", "CAP_SYS_BOOT"}])
def test_default_profile_program_matches_the_profile_for_every_syscall_number(arch, caps):
    profile = default_profile()
    insns = check_program(compile_profile(profile, capabilities=caps, arch=arch,
                                          kernel_release="6.1.0"))
    table = SYSCALLS[arch]
    numbers = list(range(max(table.values()) + 64)) + [0x3FFFFFFF, 0x7FFFFFFF, 0xFFFFFFFF]
    for nr in numbers:
        assert run_bpf(insns, nr, AUDIT[arch]) == reference_action(profile, caps, arch, nr), nr
    interesting = [0, 1, 8, 37, 38, 39, 40, 41, 0x20000, 0x20008, 0x40000, 0x7E020000,
                   0x10000000 | SIGCHLD, 0xFFFFFFFF, 1 << 32, (1 << 32) | 38, 2**64 - 1]
    for name in ("socket", "personality", "clone", "clone3", "ptrace", "unshare"):
        for value in interesting:
            args = (value, value, 0, 0, 0, 0)
            expected = reference_action(profile, caps, arch, table[name], args)
            assert run_bpf(insns, table[name], AUDIT[arch], args) == expected, (name, value)


def test_default_profile_spot_checks_in_the_interpreter():
    for arch in ("x86_64", "aarch64"):
        t = SYSCALLS[arch]
        insns = check_program(compile_profile(default_profile(), capabilities=set(DOCKER_DEFAULT),
                                              arch=arch))

        def run(name, *args, insns=insns, t=t, arch=arch):
            return run_bpf(insns, t[name], AUDIT[arch], (*args, 0, 0, 0, 0, 0, 0)[:6])

        assert run("read") == run("openat") == run("execve") == SECCOMP_RET_ALLOW
        for name in ("keyctl", "add_key", "request_key", "mount", "bpf", "userfaultfd"):
            assert run(name) == errno_ret(EPERM), name
        assert run("clone3") == errno_ret(ENOSYS)
        assert run("clone", SIGCHLD) == SECCOMP_RET_ALLOW
        assert run("clone", syscalls.CLONE_NEWUSER | SIGCHLD) == errno_ret(EPERM)
        assert run("socket", 38) == run("socket", 40) == errno_ret(EPERM)
        assert run("socket", 2) == run("socket", 39) == run("socket", 41) == SECCOMP_RET_ALLOW
        # another ABI on the same CPU: the default action, whatever the number
        other = AUDIT_ARCH_I386 if arch == "x86_64" else AUDIT_ARCH_ARM
        for nr in (t["read"], 20, 199, 0):
            assert run_bpf(insns, nr, other) == errno_ret(EPERM)
    x86 = check_program(default_filter())
    if ARCH == "x86_64":
        assert run_bpf(x86, 0x40000000 | 39, AUDIT["x86_64"]) == errno_ret(EPERM)
        assert run_bpf(x86, 0x40000000 | 0, AUDIT["x86_64"]) == errno_ret(EPERM)


def test_min_kernel_gates_ptrace():
    nr = SYSCALLS["x86_64"]["ptrace"]
    old = check_program(compile_profile(default_profile(), capabilities=set(), arch="x86_64",
                                        kernel_release="4.4.0-210-generic"))
    new = check_program(compile_profile(default_profile(), capabilities=set(), arch="x86_64",
                                        kernel_release="4.8.0"))
    assert run_bpf(old, nr, AUDIT["x86_64"]) == errno_ret(EPERM)
    assert run_bpf(new, nr, AUDIT["x86_64"]) == SECCOMP_RET_ALLOW


EDGES = [0, 1, 5, 37, 38, 39, 40, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 1 << 32,
         (1 << 32) | 1, (1 << 32) | 38, (5 << 32) | 7, 0xFFFFFFFF00000000, 1 << 63, 2**64 - 2,
         2**64 - 1]
OPS = ("SCMP_CMP_EQ", "SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_GT",
       "SCMP_CMP_GE", "SCMP_CMP_MASKED_EQ")


@pytest.mark.parametrize("name", ["getppid", "socket"])  # socket's args are 32-bit ints
@pytest.mark.parametrize("op", OPS)
def test_every_comparison_on_64_bit_edges(name, op):
    arch = "x86_64"
    nr = SYSCALLS[arch][name]
    args_to_try = sorted({(v + d) % 2**64 for v in EDGES for d in (-1, 0, 1)})
    for value in EDGES:
        two = value & 0xF0F0F0F0_0F0F0F0F if op == "SCMP_CMP_MASKED_EQ" else 0
        profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": 99,
             "args": [{"index": 2, "value": value, "valueTwo": two, "op": op}]}]}
        insns = check_program(compile_profile(profile, capabilities=set(), arch=arch))
        for arg in args_to_try:
            args = (0, 0, arg, 0, 0, 0)
            want = reference_action(profile, set(), arch, nr, args)
            assert run_bpf(insns, nr, AUDIT[arch], args) == want, (hex(value), hex(arg))


def test_conditions_and_within_a_rule_or_across_rules_and_runc_split_on_repeated_index():
    nr = SYSCALLS["x86_64"]["getppid"]
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,  # AND
         "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
                  {"index": 1, "value": 2, "op": "SCMP_CMP_EQ"}]},
        {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 2,  # runc: OR
         "args": [{"index": 3, "value": 10, "op": "SCMP_CMP_EQ"},
                  {"index": 3, "value": 20, "op": "SCMP_CMP_EQ"}]},
        {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 3,
         "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]},
    ]}
    insns = check_program(compile_profile(profile, capabilities=set(), arch="x86_64"))

    def run(*args):
        return run_bpf(insns, nr, AUDIT["x86_64"], (*args, 0, 0, 0, 0, 0, 0)[:6])

    assert run(1, 2) == errno_ret(1)
    assert run(1, 3) == errno_ret(3)  # first rule fails on arg1, the third matches
    assert run(0, 0, 0, 10) == run(0, 0, 0, 20) == errno_ret(2)
    assert run(0, 0, 0, 30) == SECCOMP_RET_ALLOW


@needs_root
def test_interpreter_agrees_with_the_kernel():
    """The interpreter is the oracle of the other tests: check it against real filtering."""
    name = "getppid"  # ignores its arguments, but the filter sees them
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": 101,
         "args": [{"index": 0, "value": (1 << 32) | 5, "op": "SCMP_CMP_GT"}]},
        {"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": 102,
         "args": [{"index": 1, "value": 0xF000000F_0000000F, "valueTwo": 0x10000000_00000001,
                   "op": "SCMP_CMP_MASKED_EQ"}]},
        {"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": 103,
         "args": [{"index": 0, "value": 3, "op": "SCMP_CMP_LE"},
                  {"index": 2, "value": 0xFFFFFFFF, "op": "SCMP_CMP_NE"}]},
        {"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": 104,
         "args": [{"index": 3, "value": 1 << 40, "op": "SCMP_CMP_GE"},
                  {"index": 3, "value": 7, "op": "SCMP_CMP_LT"}]},
    ]}
    bpf = compile_profile(profile, capabilities=set())
    insns = check_program(bpf)
    cases = [(a, b, c, d) for a in (0, 3, 4, 5, (1 << 32) | 5, (1 << 32) | 6, 2**64 - 1)
             for b in (0, 0x10000000_00000001, 0x1FFFFFF0_FFFFFFF1)
             for c in (0, 0xFFFFFFFF) for d in (6, 7, 1 << 40)]

    def probe():
        def signed(v):
            return v - 2**64 if v >= 2**63 else v
        return [sys_errno(name, *map(signed, case)) for case in cases]

    kernel = run_child(probe, bpf).value
    expected = []
    for case in cases:
        ret = run_bpf(insns, NR[name], AUDIT[ARCH], (*case, 0, 0))
        expected.append(ret & 0xFFFF if ret & 0xFFFF0000 == SECCOMP_RET_ERRNO else 0)
    assert kernel == expected
    assert len(set(expected)) == 5  # every rule and the default were exercised


def test_long_programs_get_trampolines_and_still_decide_right():
    # 300 conditional rules on one syscall, and a block for each of 60 syscalls, so jumps
    # across them exceed the 8-bit jt/jf range
    values = list(range(0, 3000, 10))
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        *({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
           "args": [{"index": 0, "value": v, "op": "SCMP_CMP_EQ"}]} for v in values),
        *({"names": [n], "action": "SCMP_ACT_ERRNO", "errnoRet": 5,
           "args": [{"index": 1, "value": 7, "op": "SCMP_CMP_GT"}]}
          for n in list(SYSCALLS["x86_64"])[:60]),
        {"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"},
    ]}
    insns = check_program(compile_profile(profile, capabilities=set(), arch="x86_64"))
    assert 1200 < len(insns) < 4096
    assert any(code == 0x05 for code, *_ in insns)  # at least one ja trampoline
    table = SYSCALLS["x86_64"]
    for v in range(-1, 3002):
        args = (v % 2**64, 0, 0, 0, 0, 0)
        assert run_bpf(insns, table["personality"], AUDIT["x86_64"], args) == reference_action(
            profile, set(), "x86_64", table["personality"], args)
    for nr in range(max(table.values()) + 2):
        for args in ((0, 0, 0, 0, 0, 0), (0, 8, 0, 0, 0, 0)):
            assert run_bpf(insns, nr, AUDIT["x86_64"], args) == reference_action(
                profile, set(), "x86_64", nr, args), nr


def test_programs_over_the_kernel_limit_are_refused():
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": v, "op": "SCMP_CMP_EQ"}]} for v in range(1500)]}
    with pytest.raises(SeccompProfileError, match="more than the kernel's 4096"):
        compile_profile(profile, capabilities=set())


def test_default_profile_is_small_and_fast_to_compile():
    timings = []
    for _ in range(20):
        start = time.perf_counter()
        bpf = compile_profile(default_profile(), capabilities=set(DOCKER_DEFAULT))
        timings.append(time.perf_counter() - start)
    length = len(check_program(bpf))
    best = min(timings) * 1000
    print(f"\ndefault profile: {length} BPF instructions, compiled in {best:.2f} ms")
    assert length < 4096
    assert best < 50


def test_default_profile_is_dockers_format():
    profile = default_profile()
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO" and profile["defaultErrnoRet"] == 1
    allow = set(profile["syscalls"][0]["names"])
    assert {"read", "execve", "clock_gettime", "fchmodat2"} <= allow
    assert not {"keyctl", "add_key", "request_key", "io_uring_setup", "ptrace", "mount",
                "clone", "socket", "personality"} & allow
    assert json.loads(json.dumps(profile)) == profile  # plain JSON data


# -- the generated syscall table ------------------------------------------------------------

def load_generator():
    path = Path(__file__).resolve().parents[1] / "tools" / "gen_syscall_table.py"
    spec = importlib.util.spec_from_file_location("gen_syscall_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_syscall_table_is_what_the_generator_writes():
    from runtime import syscall_table

    include = Path("/usr/include")
    if not (include / "asm-generic" / "unistd.h").exists():
        pytest.skip("no kernel headers here")
    gen = load_generator()
    if gen.headers_version(include) != syscall_table.HEADERS_VERSION:
        pytest.skip("the installed headers differ from the ones the table was made from")
    assert gen.render(include) == Path(syscall_table.__file__).read_text()


def test_syscall_table_known_numbers():
    x86, arm = SYSCALLS["x86_64"], SYSCALLS["aarch64"]
    assert (x86["read"], x86["getpid"], x86["clone"], x86["clone3"]) == (0, 39, 56, 435)
    assert (arm["read"], arm["getpid"], arm["clone"], arm["openat"]) == (63, 172, 220, 56)
    assert (arm["fstat"], arm["newfstatat"], arm["mmap"], arm["renameat"]) == (80, 79, 222, 38)
    assert "open" not in arm and "stat" not in arm and "mmap2" not in arm
    assert x86["fchmodat2"] == arm["fchmodat2"] == 452  # newer than the headers
    for table in (x86, arm):
        assert len(set(table.values())) == len(table)
