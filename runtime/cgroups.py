"""Resource limits for containers through cgroups: one interface, a v1 and a v2 driver.

Where kiln puts its cgroups, and why:

- v2 (the unified hierarchy, what most users have): ``<root>/kiln/<name>``, the
  placement of docker's cgroupfs driver. kiln's own cgroup cannot be the parent: it
  holds the kiln process, and v2's no-internal-process rule forbids enabling
  controllers for the children of a cgroup that holds processes. ``kiln/`` itself never
  holds a process, so memory, pids (and cpu when asked) are enabled in the
  ``cgroup.subtree_control`` of the root and of ``kiln/``.
- v1: ``<kiln's own cgroup in that hierarchy>/kiln/<name>``, the placement runc uses
  for a relative cgroups path. v1 has no no-internal-process rule, and nesting keeps
  containers inside whatever limits and accounting kiln itself runs under (a CI job, a
  systemd unit, a sandbox) instead of escaping to the hierarchy's root.
  Hierarchies used: memory always (limits, and OOM-kill accounting and process
  tracking even without a limit; pids or freezer stand in when memory is not mounted),
  and pids and cpu only when their limits are asked for: each hierarchy costs an RCU
  sync when the container's process moves in.

A cgroup's ``kiln/`` parent is removed with its last container.
"""

from __future__ import annotations

# signal.py only adds enums to _signal, at a cost on every kiln run (see runtime/process.py)
import _signal as signal
import errno
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator

from runtime.spec import FrozenRecord
from store.errors import KilnError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object  # typing costs kiln run's start-up more than the whole cgroup setup

CGROUP_ROOT = "/sys/fs/cgroup"
KILN_PARENT = "kiln"
CPU_PERIOD_US = 100_000
MIN_MEMORY = 6 * 1024 * 1024  # docker's linuxMinMemory ("6MB")
MIN_CPU_SHARES = 2
MAX_CPU_SHARES = 262_144
MIN_CPUS = "0.01"  # a cfs quota under 1 ms is refused by the kernel
REMOVE_TIMEOUT = 5.0
MAKE_ATTEMPTS = 10

SWAP_ACCOUNTING_OFF = (
    "swap accounting is off in this kernel or cgroup ({file} is missing): memory is "
    "limited, swap is not; --memory-swap was ignored"
)


BLKIO_WEIGHT_OFF = ("this kernel or cgroup has no block I/O weight (no BFQ scheduler on the "
                    "disks?): --blkio-weight was discarded")


class CgroupError(KilnError):
    """A cgroup cannot be created, limited or removed."""


class _Vanished(CgroupError):
    """The cgroup directory went away under us (ENOENT, ENODEV)."""


# ---------------------------------------------------------------------------------------
# limits from the command line


class Limits(FrozenRecord):
    memory: int | None  # bytes
    memory_swap: int | None  # memory+swap in bytes, as docker means it; -1 = unlimited
    cpus: float | None  # -> cfs quota / period (period CPU_PERIOD_US)
    cpu_shares: int | None  # v1 cpu.shares; v2 cpu.weight via runc's conversion
    pids_limit: int | None  # <= 0 or None = unlimited
    memory_reservation: int | None  # v1 memory.soft_limit_in_bytes, v2 memory.low
    cpuset_cpus: str | None  # "0-1,3": v1 cpuset.cpus, v2 cpuset.cpus
    cpuset_mems: str | None
    blkio_weight: int | None  # 10-1000: v1 blkio(.bfq).weight, v2 io(.bfq).weight
    device_read_bps: tuple[tuple[int, int, int], ...]  # (major, minor, bytes per second)
    device_write_bps: tuple[tuple[int, int, int], ...]
    device_deny: tuple[str, ...]  # "c 1:5 w" (v1 devices.deny; a BPF program on v2)
    # what parse_limits adjusted on the way, as docker warns about it (the CLI prints these)
    warnings: tuple[str, ...]

    def __init__(self, memory: int | None = None, memory_swap: int | None = None,
                 cpus: float | None = None, cpu_shares: int | None = None,
                 pids_limit: int | None = None, warnings: tuple[str, ...] = (),
                 memory_reservation: int | None = None, cpuset_cpus: str | None = None,
                 cpuset_mems: str | None = None, blkio_weight: int | None = None,
                 device_read_bps: tuple = (), device_write_bps: tuple = (),
                 device_deny: tuple = ()):
        self._set(memory=memory, memory_swap=memory_swap, cpus=cpus, cpu_shares=cpu_shares,
                  pids_limit=pids_limit, warnings=warnings,
                  memory_reservation=memory_reservation, cpuset_cpus=cpuset_cpus,
                  cpuset_mems=cpuset_mems, blkio_weight=blkio_weight,
                  device_read_bps=tuple(device_read_bps),
                  device_write_bps=tuple(device_write_bps), device_deny=tuple(device_deny))

    def _compared(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "warnings"}

    def controllers(self) -> set[str]:
        """The controllers these limits need."""
        needed = set()
        if (self.memory is not None or (self.memory_swap not in (None, -1))
                or self.memory_reservation is not None):
            needed.add("memory")
        if self.cpuset_cpus is not None or self.cpuset_mems is not None:
            needed.add("cpuset")
        if self.blkio_weight is not None or self.device_read_bps or self.device_write_bps:
            needed.add("blkio")  # "io" on v2
        if self.device_deny:
            needed.add("devices")
        if self.cpus is not None or self.cpu_shares is not None:
            needed.add("cpu")
        if self.pids_limit is not None and self.pids_limit > 0:
            needed.add("pids")
        return needed


_SIZE = r"(\d+(?:\.\d+)?) ?(?:([kmgtp])(i)?)?(b)?"  # compiled on first use (re caches it)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    """Bytes from a docker memory size: "512m", "1g", "1.5GiB", "100k", "1024b", "4096".

    Units are binary (k = 1024) as in docker's RAMInBytes; a fraction of a byte is dropped.
    """
    from fractions import Fraction  # with decimal: only when a size is given

    match = re.fullmatch(_SIZE, text, re.IGNORECASE) if isinstance(text, str) else None
    if not match:
        raise CgroupError(f"invalid size: {text!r} (expected a number with an optional "
                          "unit b, k, m, g, t or p, such as 512m or 1g)")
    number, unit, _, _ = match.groups()
    size = int(Fraction(number) * _UNITS[(unit or "").lower()])
    if size >= 1 << 63:
        raise CgroupError(f"invalid size: {text!r} is too large")
    return size


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def parse_cpuset(flag: str, text: str, available: set[int] | None) -> str:
    """A cpu or node list ("0-1,3") checked as docker checks it: the IDs must exist here."""
    try:
        wanted = _cpu_ids(text)
    except ValueError:
        raise CgroupError(f"invalid value {text!r} for {flag}: want a list such as "
                          "0-2,4") from None
    if available is not None and not wanted <= available:
        missing = ",".join(str(i) for i in sorted(wanted - available))
        raise CgroupError(f"{flag} {text}: requested {missing} not available here (have "
                          f"{_ranges(available)})")
    return text.replace(" ", "")


def _ranges(ids: set[int]) -> str:
    out, ordered = [], sorted(ids)
    start = prev = ordered[0] if ordered else 0
    for i in ordered[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def _online_nodes() -> set[int] | None:
    try:
        with open("/sys/devices/system/node/online") as f:
            return _cpu_ids(f.read().strip())
    except (OSError, ValueError):
        return None


def _cpu_ids(text: str) -> set[int]:
    """The IDs of a cpu or node list ("0-2,4", the kernel's format); ValueError if bad."""
    ids: set[int] = set()
    for part in text.split(",") if text else ():
        lo, dash, hi = part.strip().partition("-")
        first, last = int(lo), int(hi) if dash else int(lo)
        if first < 0 or last < first:
            raise ValueError(part)
        ids |= set(range(first, last + 1))
    return ids


def parse_device_rate(flag: str, text: str) -> tuple[int, int, int]:
    """/dev/sda:10mb -> (8, 0, 10485760): a block device of the host and bytes per second."""
    import stat

    path, sep, rate = text.rpartition(":")
    if not sep or not path:
        raise CgroupError(f"invalid {flag} {text!r}: want DEVICE:RATE, e.g. /dev/sda:10mb")
    try:
        st = os.stat(path)
    except OSError as e:
        raise CgroupError(f"invalid {flag} {text!r}: {path}: {e.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise CgroupError(f"invalid {flag} {text!r}: {path} is not a block device")
    return os.major(st.st_rdev), os.minor(st.st_rdev), parse_size(rate)


def parse_limits(memory: str | None = None, memory_swap: str | None = None,
                 cpus: str | None = None, cpu_shares: str | None = None,
                 pids_limit: str | None = None, memory_reservation: str | None = None,
                 cpuset_cpus: str | None = None, cpuset_mems: str | None = None,
                 blkio_weight: str | None = None, device_read_bps=(),
                 device_write_bps=(), device_deny: tuple[str, ...] = ()) -> Limits:
    """Limits from the strings of ``--memory --memory-swap --cpus --cpu-shares --pids-limit``.

    Checked as docker checks them. A value of 0 means "not set", as in docker.
    """
    warnings: list[str] = []
    mem = parse_size(str(memory)) if memory is not None else None
    if mem == 0:
        mem = None
    if mem is not None and mem < MIN_MEMORY:
        raise CgroupError(f"--memory {memory}: minimum memory limit allowed is 6MB "
                          f"({MIN_MEMORY} bytes)")

    swap = None
    if memory_swap is not None:
        swap = -1 if str(memory_swap).strip() == "-1" else parse_size(str(memory_swap))
        if swap == 0:
            swap = None
    if swap is not None and swap != -1:
        if mem is None:
            raise CgroupError(f"--memory-swap {memory_swap} needs --memory as well: "
                              "--memory-swap is the limit of memory and swap together")
        if swap < mem:
            raise CgroupError(f"--memory-swap {memory_swap} is smaller than --memory {memory}: "
                              "--memory-swap is the limit of memory and swap together, so it "
                              "must be at least --memory (or -1 for unlimited swap)")

    ncpus = None
    if cpus is not None:
        ncpus = _parse_cpus(str(cpus))

    shares = None
    if cpu_shares is not None:
        shares = _parse_int("--cpu-shares", cpu_shares)
        if shares < 0:
            raise CgroupError(f"--cpu-shares {cpu_shares}: must be a positive number "
                              "(1024 is the default weight)")
        if shares == 0:
            shares = None
        elif shares < MIN_CPU_SHARES:
            warnings.append(f"changing requested --cpu-shares of {shares} to minimum allowed "
                            f"of {MIN_CPU_SHARES}")
            shares = MIN_CPU_SHARES
        elif shares > MAX_CPU_SHARES:
            warnings.append(f"changing requested --cpu-shares of {shares} to maximum allowed "
                            f"of {MAX_CPU_SHARES}")
            shares = MAX_CPU_SHARES

    pids = None
    if pids_limit is not None:
        pids = _parse_int("--pids-limit", pids_limit)
        if pids <= 0:
            pids = None
    reservation = None
    if memory_reservation is not None:
        reservation = parse_size(str(memory_reservation)) or None
        if reservation is not None and mem is not None and reservation > mem:
            raise CgroupError(f"--memory-reservation {memory_reservation} is larger than "
                              f"--memory {memory}: the reservation must be the smaller")
    cpu_list = mem_list = None
    if cpuset_cpus:
        cpu_list = parse_cpuset("--cpuset-cpus", cpuset_cpus, set(os.sched_getaffinity(0)))
    if cpuset_mems:
        mem_list = parse_cpuset("--cpuset-mems", cpuset_mems, _online_nodes())
    weight = None
    if blkio_weight is not None:
        weight = _parse_int("--blkio-weight", blkio_weight)
        if weight == 0:
            weight = None
        elif not 10 <= weight <= 1000:
            raise CgroupError(f"--blkio-weight {blkio_weight}: range of blkio weight is from "
                              "10 to 1000")
    return Limits(memory=mem, memory_swap=swap, cpus=ncpus, cpu_shares=shares,
                  pids_limit=pids, warnings=tuple(warnings), memory_reservation=reservation,
                  cpuset_cpus=cpu_list, cpuset_mems=mem_list, blkio_weight=weight,
                  device_read_bps=tuple(parse_device_rate("--device-read-bps", t)
                                        for t in device_read_bps),
                  device_write_bps=tuple(parse_device_rate("--device-write-bps", t)
                                         for t in device_write_bps),
                  device_deny=tuple(device_deny))


def _parse_int(flag: str, text: str | int) -> int:
    try:
        return int(str(text).strip(), 10)
    except ValueError:
        raise CgroupError(f"{flag} {text!r}: not a whole number") from None


def _parse_cpus(text: str) -> float | None:
    from fractions import Fraction

    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise CgroupError(f"--cpus {text!r}: not a number (such as 0.5 or 2)") from None
    if value == 0:
        return None
    if (value * 10**9).denominator != 1:
        raise CgroupError(f"--cpus {text}: value is too precise (at most 9 decimals)")
    available = _cpu_count()
    if value < Fraction(MIN_CPUS) or value > available:
        raise CgroupError(f"--cpus {text}: range of CPUs is from 0.01 to {available}.00, as "
                          f"there are only {available} CPUs available")
    return float(value)


def cfs_quota(cpus: float) -> int:
    """The cfs quota in microseconds per CPU_PERIOD_US for ``cpus`` CPUs (docker's rounding)."""
    return round(cpus * 10**9) * CPU_PERIOD_US // 10**9


def cpu_weight(shares: int) -> int:
    """cgroup v2 cpu.weight for v1 cpu.shares: runc's linear map of [2, 262144] to [1, 10000]."""
    return 1 + ((shares - 2) * 9999) // 262142


def _swap_limit(limits: Limits) -> int | None:
    """memory+swap in bytes, -1 unlimited, None when there is no memory limit at all."""
    if limits.memory is None:
        return None
    if limits.memory_swap is None:
        return 2 * limits.memory  # docker's default: as much swap as memory
    return limits.memory_swap


# ---------------------------------------------------------------------------------------
# the interface


class Cgroup(Protocol):
    path: str
    warnings: list[str]

    def add_process(self, pid: int) -> None: ...

    def oom_killed(self) -> bool: ...

    def remove(self) -> None: ...


def detect_driver(root: str = CGROUP_ROOT) -> str:
    """"v2" when ``root`` is a cgroup2 mount (the unified hierarchy), else "v1"."""
    return "v2" if _fstype(root) == "cgroup2" else "v1"


def create_cgroup(name: str, limits: Limits, *, driver: str | None = None,
                  also: tuple[str, ...] = (), parent: str = KILN_PARENT) -> Cgroup:
    """Make the cgroup ``kiln/<name>`` with ``limits``; the caller then adds the container.
    ``also``: v1 controllers to join besides those the limits need, where mounted (a
    detached container's freezer and pids, for kiln pause and stats).

    Raises CgroupError naming the file and the value on failure, having removed what it made.
    """
    driver = driver or detect_driver()
    from store.fsutil import is_host_root

    if not is_host_root():
        return _rootless_cgroup(name, limits, driver, parent)
    if driver == "v2":
        return V2Cgroup.create(name, limits, parent=parent)
    if driver == "v1":
        return V1Cgroup.create(name, limits, also=also, parent=parent)
    raise CgroupError(f"unknown cgroup driver {driver!r} (expected v1 or v2)")


class NoCgroup:
    """Rootless kiln without a cgroup it may write to: the container runs in kiln's own."""

    path = ""

    def __init__(self, warnings: list[str]):
        self.warnings = warnings

    def add_process(self, pid: int) -> None:
        pass

    def oom_killed(self) -> bool:
        return False

    def remove(self) -> None:
        pass


def _rootless_cgroup(name: str, limits: Limits, driver: str, parent: str) -> Cgroup:
    """A cgroup beside kiln's own where v2 delegation lets the user make one (systemd's
    user@UID.service), as rootless podman's; else none, and a warning if limits were asked."""
    asked = sorted(limits.controllers())
    if driver == "v2":
        own = _own_cgroup_dir("v2")
        base = os.path.dirname(own) if own else None
        if base and base.startswith(CGROUP_ROOT + "/") and os.access(base, os.W_OK):
            where = os.path.join(os.path.relpath(base, CGROUP_ROOT), parent)
            try:
                return V2Cgroup.create(name, limits, parent=where)
            except (CgroupError, OSError):
                if asked:
                    raise
                return NoCgroup([])
    if not asked:
        return NoCgroup([])
    return NoCgroup([f"rootless kiln has no delegated cgroup v2 here: the container's "
                     f"{', '.join(asked)} limits are not applied"])


def warm_up_migration(*, driver: str | None = None) -> None:
    """Start, in a background thread, what makes the container's move into its cgroup slow.

    Moving a process between cgroups takes the kernel's global cgroup threadgroup lock for
    writing, and the first writer after a quiet spell waits for an RCU grace period (on the
    test host 5 to 15 ms, the largest single cost of ``kiln run``); writers that follow
    within about a grace period do not wait. So while kiln prepares the container, a thread
    moves kiln into the cgroup it already is in (a move the kernel skips: nothing changes)
    to pay that wait early, and the container's real move moments later is quick. Returns
    once the thread is in its write. Errors are ignored: the real move does not depend on it.
    """
    try:
        own = _own_cgroup_dir(driver or detect_driver())
        fd = os.open(os.path.join(own, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC) \
            if own else -1
    except (OSError, ValueError):
        return
    if fd < 0:
        return
    import _thread  # threading's import costs more than this whole warm-up saves

    writing = _thread.allocate_lock()
    writing.acquire()

    def move_self() -> None:
        try:
            writing.release()
            os.write(fd, str(os.getpid()).encode())
        except OSError:
            pass
        finally:
            os.close(fd)

    try:
        _thread.start_new_thread(move_self, ())
    except RuntimeError:
        os.close(fd)
        return
    writing.acquire(timeout=1.0)  # hands the GIL over: the thread starts at once


def _own_cgroup_dir(driver: str) -> str | None:
    """kiln's own cgroup: in the v1 hierarchy a container would be tracked in, or in v2."""
    if driver == "v1":
        hierarchies = v1_hierarchies()
        return next((hierarchies[c] for c in V1Cgroup.TRACKING if c in hierarchies), None)
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return os.path.join(CGROUP_ROOT, line[3:].strip().lstrip("/"))
    return None


# ---------------------------------------------------------------------------------------
# files


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _read_keyed(path: str) -> dict[str, str]:
    """A "key value" per line file (memory.events, memory.oom_control, cgroup.events)."""
    pairs = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        pairs[key] = value.strip()
    return pairs


def _write(path: str, value: str | int) -> None:
    """Write one value the way the kernel wants it: one write(2), no file creation."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _Vanished(f"cannot write {value} to {path}: the file does not exist "
                        "(controller not enabled for this cgroup?)") from None
    except OSError as e:
        raise CgroupError(f"cannot write {value} to {path}: {e.strerror}") from None
    try:
        os.write(fd, str(value).encode())
    except OSError as e:
        error = _Vanished if e.errno == errno.ENODEV else CgroupError
        raise error(f"cannot write {value} to {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _validate_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise CgroupError(f"invalid cgroup name {name!r}: must be one path component")


def _make_leaf(base: str, parent: str, name: str,
               prepare: Callable[[str], None] | None = None) -> str:
    """mkdir base/parent/name, the parents as needed; a leaf that exists is an error.

    ``prepare`` is called on base and on each parent level before the level below is made.
    """
    leaf = os.path.join(base, parent, name)
    for attempt in range(MAKE_ATTEMPTS):
        here = base
        try:
            if prepare:
                prepare(here)
            for part in parent.split("/"):
                here = os.path.join(here, part)
                try:
                    os.mkdir(here)
                except FileExistsError:
                    pass
                if prepare:
                    prepare(here)
            os.mkdir(leaf)
            return leaf
        except FileExistsError:
            raise CgroupError(f"cgroup {leaf} already exists (another container with the "
                              f"name {name}?)") from None
        except (FileNotFoundError, _Vanished) as e:
            # another kiln removed the emptied parent as we went: make it again
            if attempt == MAKE_ATTEMPTS - 1:
                raise CgroupError(f"cannot create cgroup {leaf}: {e}") from None
        except OSError as e:
            raise CgroupError(f"cannot create cgroup {leaf}: {e.strerror}") from None
    raise AssertionError("unreachable")


def _tree(top: str) -> Iterator[str]:
    """top and every cgroup below it, children before their parent."""
    for dirpath, _dirs, _files in os.walk(top, topdown=False):
        yield dirpath


def _procs(dirs: Iterable[str]) -> set[int]:
    """Every process in these cgroups and their descendants."""
    pids: set[int] = set()
    for top in dirs:
        for d in _tree(top):
            try:
                pids.update(int(p) for p in _read(os.path.join(d, "cgroup.procs")).split())
            except OSError:  # removed meanwhile
                pass
    return pids


def _kill(dirs: list[str]) -> None:
    """SIGKILL every process in ``dirs``, never one that left or a pid reused outside.

    A pidfd pins the process first; the cgroup is read again after that, so a pid
    listed then is the pinned process if it is still alive, and signalling a dead
    pinned process fails harmlessly.
    """
    pidfds = {}
    try:
        for pid in _procs(dirs) - {os.getpid()}:
            try:
                pidfds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                pass
        still_inside = _procs(dirs)
        for pid, fd in pidfds.items():
            if pid in still_inside:
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    finally:
        for fd in pidfds.values():
            os.close(fd)


def _rmdir_tree(top: str, deadline: float) -> None:
    for d in _tree(top):
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                # EBUSY for a moment after the last process exits
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove cgroup {d}: {e.strerror}") from None
                time.sleep(0.01)


def _rmdir_empty_parents(leaf: str, stop: str) -> None:
    """Remove kiln's parent dirs between leaf and stop while no other container uses them."""
    here = os.path.dirname(leaf)
    while len(here) > len(stop) and here.startswith(stop + "/"):
        try:
            os.rmdir(here)
        except OSError:
            return
        here = os.path.dirname(here)


def _wait_empty(dirs: list[str], deadline: float, between: Callable[[], None]) -> None:
    while True:
        left = _procs(dirs) - {os.getpid()}
        if not left:
            return
        if time.monotonic() > deadline:
            raise CgroupError(f"cgroup {dirs[0]} still has processes {sorted(left)} after "
                              f"{REMOVE_TIMEOUT:.0f} s of SIGKILL; left in place")
        between()
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------
# cgroup v2


class V2Cgroup:
    """A cgroup in the unified hierarchy mounted at ``root``."""

    def __init__(self, path: str, *, root: str = CGROUP_ROOT):
        self.path = path
        self.root = root
        self.warnings: list[str] = []
        self._oom_seen = False

    @classmethod
    def create(cls, name: str, limits: Limits, *, root: str = CGROUP_ROOT,
               parent: str = KILN_PARENT) -> V2Cgroup:
        _validate_name(name)
        if not os.path.exists(os.path.join(root, "cgroup.controllers")):
            raise CgroupError(f"cgroup v2 is not mounted at {root} (no cgroup.controllers): "
                              "use the v1 driver on this host")
        # v2 has no devices controller: device rules are an eBPF program (_apply)
        required = {"io" if c == "blkio" else c for c in limits.controllers() - {"devices"}}
        wanted = required | {"memory", "pids"}  # OOM-kill events, process accounting

        def enable(level: str) -> None:
            _enable_controllers(level, wanted, required)

        try:
            leaf = _make_leaf(root, parent, name, prepare=enable)
        except CgroupError:
            _rmdir_empty_parents(os.path.join(root, parent, name), root)
            raise
        cgroup = cls(leaf, root=root)
        try:
            cgroup._apply(limits)
        except BaseException:
            cgroup.remove()
            raise
        return cgroup

    def _apply(self, limits: Limits) -> None:
        if limits.memory is not None:
            _write(self._file("memory.max"), limits.memory)
            swap_file = self._file("memory.swap.max")
            memsw = _swap_limit(limits)
            if not os.path.exists(swap_file):
                if memsw != -1:
                    self.warnings.append(SWAP_ACCOUNTING_OFF.format(file=swap_file))
            else:
                _write(swap_file, "max" if memsw == -1 else memsw - limits.memory)
        if limits.cpus is not None:
            _write(self._file("cpu.max"), f"{cfs_quota(limits.cpus)} {CPU_PERIOD_US}")
        if limits.cpu_shares is not None:
            _write(self._file("cpu.weight"), cpu_weight(limits.cpu_shares))
        if limits.pids_limit is not None and limits.pids_limit > 0:
            _write(self._file("pids.max"), limits.pids_limit)
        if limits.memory_reservation is not None:
            _write(self._file("memory.low"), limits.memory_reservation)
        if limits.cpuset_cpus is not None:
            _write(self._file("cpuset.cpus"), limits.cpuset_cpus)
        if limits.cpuset_mems is not None:
            _write(self._file("cpuset.mems"), limits.cpuset_mems)
        if limits.blkio_weight is not None:
            _write_weight(self.path, ("io.bfq.weight", "io.weight"), limits.blkio_weight,
                          self.warnings)
        for major, minor, rate in limits.device_read_bps:
            _write(self._file("io.max"), f"{major}:{minor} rbps={rate}")
        for major, minor, rate in limits.device_write_bps:
            _write(self._file("io.max"), f"{major}:{minor} wbps={rate}")
        if limits.device_deny:
            from runtime.device_filter import attach_deny_rules

            try:
                attach_deny_rules(self.path, limits.device_deny)
            except OSError as e:
                rules = ", ".join(limits.device_deny)
                raise CgroupError(f"cannot attach the device program ({rules}: read-only "
                                  f"--device) to {self.path}: {e.strerror}") from None

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def add_process(self, pid: int) -> None:
        _write(self._file("cgroup.procs"), pid)

    def oom_killed(self) -> bool:
        try:
            events = _read_keyed(self._file("memory.events"))
        except FileNotFoundError:  # gone (answer from before removal) or no memory controller
            return self._oom_seen
        self._oom_seen = int(events.get("oom_kill", "0")) > 0
        return self._oom_seen

    def remove(self) -> None:
        """Kill what is left (cgroup.kill, else SIGKILL each), wait until empty, rmdir."""
        deadline = time.monotonic() + REMOVE_TIMEOUT
        if os.path.isdir(self.path):
            self.oom_killed()
            kill_file = self._file("cgroup.kill")
            dirs = [self.path]

            def kill() -> None:
                if os.path.exists(kill_file):
                    try:
                        _write(kill_file, 1)
                        return
                    except CgroupError:
                        if not os.path.isdir(self.path):
                            return
                _kill(dirs)

            kill()
            _wait_empty(dirs, deadline, kill)
            _rmdir_tree(self.path, deadline)
        _rmdir_empty_parents(self.path, self.root)

    def __repr__(self) -> str:
        return f"V2Cgroup({self.path!r})"


def _enable_controllers(cgroup_dir: str, wanted: set[str], required: set[str]) -> None:
    """Enable ``wanted`` (those available) for the children of ``cgroup_dir``."""
    controllers_file = os.path.join(cgroup_dir, "cgroup.controllers")
    subtree_file = os.path.join(cgroup_dir, "cgroup.subtree_control")
    try:
        available = set(_read(controllers_file).split())
        enabled = set(_read(subtree_file).split())
    except OSError as e:
        error = _Vanished if e.errno in (errno.ENOENT, errno.ENODEV) else CgroupError
        raise error(f"cannot read {controllers_file} and {subtree_file}: "
                    f"{e.strerror}") from None
    missing = required - available
    if missing:
        raise CgroupError(
            f"cgroup v2 controller(s) {', '.join(sorted(missing))} not available in "
            f"{controllers_file} (it has: {' '.join(sorted(available)) or 'none'}); "
            "they are needed for the limits asked for (on a hybrid host they may be bound to "
            "cgroup v1: use the v1 driver)")
    to_enable = sorted((wanted & available) - enabled)
    if not to_enable:
        return
    value = " ".join("+" + c for c in to_enable)
    try:
        _write(subtree_file, value)
    except CgroupError as e:
        if "Device or resource busy" in str(e):
            raise CgroupError(
                f"cannot write {value} to {subtree_file}: {cgroup_dir} holds processes, and "
                "cgroup v2 enables controllers only for children of a cgroup without its own "
                "processes (the no-internal-process rule); move them to a child cgroup") from None
        raise


# ---------------------------------------------------------------------------------------
# cgroup v1


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _parse_mountinfo() -> list[tuple[str, str, str, list[str]]]:
    """(mount root, mount point, fstype, super options) for every mount."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), fields[4])  # \040 = space
            mounts.append((fields[3], point, fields[sep + 1], fields[sep + 3].split(",")))
    return mounts


def _fstype(path: str) -> str | None:
    path = os.path.realpath(path)
    found = None
    try:
        for _root, point, fstype, _opts in _parse_mountinfo():
            if point == path:
                found = fstype  # the last mount on a point is the visible one
    except OSError:
        return None
    return found


def v1_hierarchies() -> dict[str, str]:
    """controller -> the directory of kiln's own cgroup in that v1 hierarchy."""
    own: dict[frozenset[str], str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _id, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers:
                own[frozenset(controllers.split(","))] = path
    with open("/proc/cgroups") as f:
        known = {line.split()[0] for line in f if not line.startswith("#")}
    found: dict[str, str] = {}
    for mount_root, point, fstype, opts in _parse_mountinfo():
        if fstype != "cgroup":
            continue
        controllers = frozenset(opts) & known
        if not controllers:
            continue  # a named hierarchy (name=systemd) has no controller
        own_path = own.get(controllers, "/")
        if mount_root != "/" and (own_path + "/").startswith(mount_root.rstrip("/") + "/"):
            own_path = own_path[len(mount_root.rstrip("/")):] or "/"
        d = os.path.normpath(os.path.join(point, own_path.lstrip("/")))
        if not os.path.isdir(d):
            d = point
        for c in controllers:
            found.setdefault(c, d)
    return found


def cgroup_dirs_of(pid: int) -> dict[str, str]:
    """The directories of ``pid``'s cgroups in every hierarchy mounted here, by the
    hierarchy's controllers ("memory", "cpu,cpuacct"; "" for v2): where writing a pid to
    cgroup.procs puts it beside ``pid`` (kiln exec), where its freezer and stats are."""
    with open(f"/proc/{pid}/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    mounts = [m for m in _parse_mountinfo() if m[2] in ("cgroup", "cgroup2")]
    out = {}
    for _id, controllers, path in lines:
        wanted = set(controllers.split(",")) if controllers else None
        for mount_root, point, fstype, opts in mounts:
            if wanted is None and fstype != "cgroup2":
                continue
            if wanted is not None and (fstype != "cgroup" or not wanted <= set(opts)):
                continue
            root = mount_root.rstrip("/")
            if root and not (path + "/").startswith(root + "/"):
                continue  # this mount shows another part of the hierarchy
            d = os.path.join(point, path[len(root):].lstrip("/"))
            if os.path.isdir(d):
                out[controllers] = d
                break
    return out


def _write_weight(cgroup_dir: str, names: tuple[str, ...], weight: int,
                  warnings: list[str]) -> None:
    """The block I/O weight into the first of ``names`` the cgroup has (BFQ's, else the
    generic one); a warning when it has none."""
    for name in names:
        path = os.path.join(cgroup_dir, name)
        if os.path.exists(path):
            _write(path, weight)
            return
    warnings.append(BLKIO_WEIGHT_OFF)


def _fill_cpuset(level: str) -> None:
    """A v1 cpuset cgroup starts with no CPUs and no memory nodes: kiln's own levels get
    their parent's, or no container could be put below them."""
    parent = os.path.dirname(level)
    for name in ("cpuset.cpus", "cpuset.mems"):
        path = os.path.join(level, name)
        if os.path.exists(path) and not _read(path).strip():
            _write(path, _read(os.path.join(parent, name)).strip())


class V1Cgroup:
    """A cgroup made of one directory in each v1 hierarchy it uses."""

    TRACKING = ("memory", "pids", "freezer")

    def __init__(self, dirs: dict[str, str], bases: dict[str, str]):
        self.dirs = dirs  # controller -> cgroup dir
        self._bases = bases  # cgroup dir -> the dir kiln's parent was made in
        self.path = dirs.get("memory") or next(iter(dirs.values()), "")
        self.warnings: list[str] = []
        self._oom_seen = False

    @classmethod
    def create(cls, name: str, limits: Limits, *, hierarchies: dict[str, str] | None = None,
               parent: str = KILN_PARENT, also: tuple[str, ...] = ()) -> V1Cgroup:
        _validate_name(name)
        if hierarchies is None:
            hierarchies = v1_hierarchies()
        required = limits.controllers()
        missing = required - hierarchies.keys()
        if missing:
            raise CgroupError(f"cgroup v1 controller(s) {', '.join(sorted(missing))} not "
                              "mounted (see /proc/self/mountinfo); they are needed for the "
                              "limits asked for")
        # Moving a process into a v1 cgroup costs several ms per hierarchy (an RCU sync
        # each), so besides what the limits need only one tracking hierarchy is used.
        tracker = next((c for c in cls.TRACKING if c in hierarchies), None)
        wanted = [c for c in (*cls.TRACKING, "cpu", "cpuset", "blkio", "devices")
                  if c in required or c == tracker]
        wanted += [c for c in also if c in hierarchies and c not in wanted]
        if not wanted:
            raise CgroupError("no cgroup v1 hierarchy of memory, pids or freezer is mounted: "
                              "kiln cannot track a container's processes")
        cgroup = cls({}, {})
        try:
            made: dict[str, str] = {}  # base -> leaf, one per hierarchy (cpu,cpuacct share one)
            for c in wanted:
                base = hierarchies[c]
                if base not in made:
                    made[base] = _make_leaf(base, parent, name,
                                            prepare=_fill_cpuset if c == "cpuset" else None)
                    cgroup._bases[made[base]] = base
                cgroup.dirs[c] = made[base]
            cgroup.path = cgroup.dirs.get("memory") or next(iter(cgroup.dirs.values()))
            cgroup._apply(limits)
        except BaseException:
            cgroup.remove()
            raise
        return cgroup

    def _file(self, controller: str, name: str) -> str:
        return os.path.join(self.dirs[controller], name)

    def _apply(self, limits: Limits) -> None:
        if limits.memory is not None:
            _write(self._file("memory", "memory.limit_in_bytes"), limits.memory)
            memsw_file = self._file("memory", "memory.memsw.limit_in_bytes")
            memsw = _swap_limit(limits)
            if not os.path.exists(memsw_file):
                if memsw != -1:
                    self.warnings.append(SWAP_ACCOUNTING_OFF.format(file=memsw_file))
            else:
                _write(memsw_file, memsw)
        if limits.cpus is not None:
            _write(self._file("cpu", "cpu.cfs_period_us"), CPU_PERIOD_US)
            _write(self._file("cpu", "cpu.cfs_quota_us"), cfs_quota(limits.cpus))
        if limits.cpu_shares is not None:
            _write(self._file("cpu", "cpu.shares"), limits.cpu_shares)
        if limits.pids_limit is not None and limits.pids_limit > 0:
            _write(self._file("pids", "pids.max"), limits.pids_limit)
        if limits.memory_reservation is not None:
            _write(self._file("memory", "memory.soft_limit_in_bytes"),
                   limits.memory_reservation)
        if "cpuset" in self.dirs:
            _fill_cpuset(self.dirs["cpuset"])  # else nothing could run in it
            for name, value in (("cpuset.cpus", limits.cpuset_cpus),
                                ("cpuset.mems", limits.cpuset_mems)):
                if value is not None:
                    _write(self._file("cpuset", name), value)
        if limits.blkio_weight is not None:
            _write_weight(self.dirs["blkio"], ("blkio.bfq.weight", "blkio.weight"),
                          limits.blkio_weight, self.warnings)
        for rule in limits.device_deny:
            _write(self._file("devices", "devices.deny"), rule)
        for name, rates in (("blkio.throttle.read_bps_device", limits.device_read_bps),
                            ("blkio.throttle.write_bps_device", limits.device_write_bps)):
            for major, minor, rate in rates:
                _write(self._file("blkio", name), f"{major}:{minor} {rate}")

    def _unique_dirs(self) -> list[str]:
        return list(dict.fromkeys(self.dirs.values()))

    def add_process(self, pid: int) -> None:
        for d in self._unique_dirs():
            _write(os.path.join(d, "cgroup.procs"), pid)

    def oom_killed(self) -> bool:
        """memory.oom_control's oom_kill count (kernel >= 4.13); under_oom before that."""
        if "memory" not in self.dirs:
            return False
        try:
            control = _read_keyed(self._file("memory", "memory.oom_control"))
        except FileNotFoundError:  # removed: the answer read before removal
            return self._oom_seen
        if "oom_kill" in control:
            self._oom_seen = int(control["oom_kill"]) > 0
        else:
            self._oom_seen = self._oom_seen or control.get("under_oom") == "1"
        return self._oom_seen

    def remove(self) -> None:
        """Freeze, SIGKILL everything, thaw, wait until empty, rmdir in every hierarchy."""
        deadline = time.monotonic() + REMOVE_TIMEOUT
        dirs = [d for d in self._unique_dirs() if os.path.isdir(d)]
        if dirs:
            self.oom_killed()
            freezer = self.dirs.get("freezer")
            state_file = os.path.join(freezer, "freezer.state") if freezer else None
            if state_file and os.path.exists(state_file) and _procs(dirs):
                self._freeze(state_file)
                try:
                    _kill(dirs)
                finally:
                    _write_quietly(state_file, "THAWED")
            _kill(dirs)
            _wait_empty(dirs, deadline, lambda: _kill(dirs))
            for d in dirs:
                _rmdir_tree(d, deadline)
        for leaf, base in self._bases.items():
            _rmdir_empty_parents(leaf, base)

    @staticmethod
    def _freeze(state_file: str) -> None:
        """Stop every process so none forks while they are killed (bounded: 1 s)."""
        if not _write_quietly(state_file, "FROZEN"):
            return
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            try:
                if _read(state_file).strip() == "FROZEN":
                    return
            except OSError:
                return
            time.sleep(0.005)

    def __repr__(self) -> str:
        return f"V1Cgroup({self.dirs!r})"


def _write_quietly(path: str, value: str) -> bool:
    try:
        _write(path, value)
        return True
    except CgroupError:
        return False
