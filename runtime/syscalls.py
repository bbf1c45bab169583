"""Every Linux call kiln makes that Python's os module lacks, through ctypes over libc.

Nothing else in kiln imports ctypes. Each wrapper raises OSError with errno
and the names involved, like the os module does.
"""

from __future__ import annotations

import ctypes
import os


def _load_libc() -> ctypes.CDLL:
    try:  # find_library runs ldconfig, a fork+exec on kiln run's hot path: try the soname first
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        from ctypes.util import find_library  # imports subprocess: only where needed

        return ctypes.CDLL(find_library("c"), use_errno=True)


_libc = _load_libc()

# namespace flags (linux/sched.h)
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount flags (linux/mount.h)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

# fsconfig / fsmount / move_mount / open_tree (linux/mount.h)
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_IDMAP = 0x00100000
MOVE_MOUNT_F_EMPTY_PATH = 4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000

# prctl options (linux/prctl.h)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_SECCOMP = 22
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1

_NR = {
    "x86_64": {"pivot_root": 155, "seccomp": 317, "open_tree": 428, "move_mount": 429,
               "fsopen": 430, "fsconfig": 431, "fsmount": 432, "close_range": 436,
               "mount_setattr": 442, "bpf": 321},
    "aarch64": {"pivot_root": 41, "seccomp": 277, "bpf": 280, "open_tree": 428, "move_mount": 429,
                "fsopen": 430, "fsconfig": 431, "fsmount": 432, "close_range": 436,
                "mount_setattr": 442},
}
_ARCH_NR = _NR.get(os.uname().machine, _NR["x86_64"])

_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


def _b(value: str | bytes | os.PathLike | None) -> bytes | None:
    if value is None:
        return None
    return os.fsencode(value)


def _check(result: int, what: str, *names) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", *[os.fsdecode(n) for n in names[:1]])
    return result


def _syscall(name: str, *args) -> int:
    return _libc.syscall(ctypes.c_long(_ARCH_NR[name]), *args)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mount(source, target, fstype, flags: int = 0, data: str | bytes | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags,
                       ctypes.c_char_p(_b(data)) if data is not None else None),
           "mount", target)


def umount2(target, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), "umount", target)


def pivot_root(new_root, put_old) -> None:
    _check(_syscall("pivot_root", ctypes.c_char_p(_b(new_root)), ctypes.c_char_p(_b(put_old))),
           "pivot_root", new_root)


def sethostname(name: str) -> None:
    data = name.encode()
    _check(_libc.sethostname(data, len(data)), "sethostname")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def socket(family: int, kind: int, protocol: int = 0) -> int:
    """A socket as a bare fd (for an ioctl), without the socket module's import cost."""
    return _check(_libc.socket(family, kind | os.O_CLOEXEC, protocol), "socket")


def close_range(first: int, last: int = 0xFFFFFFFF, flags: int = 0) -> None:
    _check(_syscall("close_range", ctypes.c_uint(first), ctypes.c_uint(last),
                    ctypes.c_uint(flags)), "close_range")


# -- capabilities -------------------------------------------------------------
class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of this thread as 64-bit masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    return tuple(data[0].__getattribute__(f) | (data[1].__getattribute__(f) << 32)
                 for f in ("effective", "permitted", "inheritable"))  # type: ignore[return-value]


def capset(effective: int, permitted: int, inheritable: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(_libc.capset(ctypes.byref(header), data), "capset")


# -- seccomp ------------------------------------------------------------------
class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_set_filter(bpf: bytes, flags: int = 0) -> None:
    """Install a classic-BPF seccomp filter (``bpf`` = packed struct sock_filter array)."""
    if len(bpf) % 8:
        raise ValueError("a BPF program is a whole number of 8-byte instructions")
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(_syscall("seccomp", ctypes.c_uint(SECCOMP_SET_MODE_FILTER), ctypes.c_uint(flags),
                    ctypes.byref(prog)), "seccomp")


# -- eBPF (cgroup v2 device programs) ---------------------------------------------
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2


class _BpfProgLoad(ctypes.Structure):
    """The head of union bpf_attr for BPF_PROG_LOAD (through expected_attach_type)."""
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16),
                ("prog_ifindex", ctypes.c_uint32), ("expected_attach_type", ctypes.c_uint32)]


class _BpfProgAttach(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32)]


def bpf_prog_load(prog_type: int, insns: bytes, *, license: str, name: str = "",
                  expected_attach_type: int = 0) -> int:
    """Load an eBPF program (``insns`` = packed struct bpf_insn array); returns its fd.
    A program the verifier refuses raises OSError whose message ends with the verifier's log."""
    if len(insns) % 8:
        raise ValueError("an eBPF program is a whole number of 8-byte instructions")
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    log = ctypes.create_string_buffer(65536)
    attr = _BpfProgLoad(prog_type=prog_type, insn_cnt=len(insns) // 8,
                        insns=ctypes.addressof(code), license=ctypes.addressof(lic),
                        log_level=1, log_size=len(log), log_buf=ctypes.addressof(log),
                        prog_name=name.encode()[:15], expected_attach_type=expected_attach_type)
    fd = _syscall("bpf", ctypes.c_int(BPF_PROG_LOAD), ctypes.byref(attr),
                  ctypes.c_uint(ctypes.sizeof(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        verifier = log.value.decode(errors="replace").strip()
        raise OSError(err, f"bpf(BPF_PROG_LOAD): {os.strerror(err)}"
                      + (f"; verifier: {verifier[-500:]}" if verifier else ""))
    return fd


def bpf_prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int = 0) -> None:
    attr = _BpfProgAttach(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type,
                          attach_flags=flags)
    _check(_syscall("bpf", ctypes.c_int(BPF_PROG_ATTACH), ctypes.byref(attr),
                    ctypes.c_uint(ctypes.sizeof(attr))), "bpf(BPF_PROG_ATTACH)")


# -- the new mount API ----------------------------------------------------------
def fsopen(fstype: str, flags: int = FSOPEN_CLOEXEC) -> int:
    return _check(_syscall("fsopen", ctypes.c_char_p(fstype.encode()), ctypes.c_uint(flags)),
                  f"fsopen({fstype})")


def fsconfig(fd: int, cmd: int, key: str | None = None, value: str | bytes | None = None,
             aux: int = 0) -> None:
    _check(_syscall("fsconfig", ctypes.c_int(fd), ctypes.c_uint(cmd),
                    ctypes.c_char_p(key.encode()) if key is not None else None,
                    ctypes.c_char_p(_b(value)) if value is not None else None,
                    ctypes.c_int(aux)), f"fsconfig({key})", value or b"")


def fsmount(fd: int, flags: int = FSMOUNT_CLOEXEC, attr_flags: int = 0) -> int:
    return _check(_syscall("fsmount", ctypes.c_int(fd), ctypes.c_uint(flags),
                           ctypes.c_uint(attr_flags)), "fsmount")


def move_mount(from_fd: int, to_path, *, to_dirfd: int = -100, from_path: str = "",
               flags: int = MOVE_MOUNT_F_EMPTY_PATH) -> None:
    _check(_syscall("move_mount", ctypes.c_int(from_fd), ctypes.c_char_p(from_path.encode()),
                    ctypes.c_int(to_dirfd), ctypes.c_char_p(_b(to_path)), ctypes.c_uint(flags)),
           "move_mount", to_path)


def open_tree(path, flags: int = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC, dirfd: int = -100) -> int:
    return _check(_syscall("open_tree", ctypes.c_int(dirfd), ctypes.c_char_p(_b(path)),
                           ctypes.c_uint(flags)), "open_tree", path)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(fd: int, attr_set: int, attr_clr: int = 0, *, path: str = "",
                  flags: int = AT_EMPTY_PATH | AT_RECURSIVE, userns_fd: int = 0) -> None:
    """Set mount attributes (MOUNT_ATTR_*) on the mount at ``fd`` (and below it, recursively);
    MOUNT_ATTR_IDMAP takes the ids of the user namespace ``userns_fd``."""
    attr = _MountAttr(attr_set, attr_clr, 0, userns_fd)
    _check(_syscall("mount_setattr", ctypes.c_int(fd), ctypes.c_char_p(path.encode()),
                    ctypes.c_uint(flags), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))),
           "mount_setattr")


def syscall(number: int, *args: int) -> int:
    """A raw syscall by number with integer arguments (for probes); raises OSError on -1."""
    return _check(_libc.syscall(ctypes.c_long(number), *[ctypes.c_long(a) for a in args]),
                  f"syscall {number}")
