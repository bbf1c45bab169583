"""cgroup drivers: real cgroups and real processes.

v1 runs for real on a host with the v1 memory, pids, cpu and freezer hierarchies (the
development machine). v2 runs for real on the unified hierarchy for what needs no
controller (placement, cgroup.kill, removal, missing-controller errors); its limit files
are checked against a stand-in tree in tmp_path (FakeCgroup2), because on a hybrid host
the memory/cpu/pids controllers are bound to v1 and cannot appear in cgroup2.
"""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runtime import cgroups
from runtime.cgroups import (
    CgroupError,
    Limits,
    V1Cgroup,
    V2Cgroup,
    cfs_quota,
    cpu_weight,
    create_cgroup,
    detect_driver,
    parse_limits,
    parse_size,
)

MiB = 1 << 20
UNIFIED = "/sys/fs/cgroup/unified"
_names = itertools.count()


def unique_name() -> str:
    return f"kiln-test-{os.getpid()}-{next(_names)}"


def _v1_ready() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        found = cgroups.v1_hierarchies()
    except OSError as e:
        return f"cannot read the cgroup mounts: {e}"
    missing = {"memory", "pids", "cpu", "freezer"} - found.keys()
    return f"cgroup v1 hierarchies missing: {sorted(missing)}" if missing else None


def _unified_ready() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if detect_driver(UNIFIED) != "v2":
        return f"no cgroup2 mounted at {UNIFIED}"
    return None


needs_v1 = pytest.mark.skipif(_v1_ready() is not None, reason=str(_v1_ready()))
needs_unified = pytest.mark.skipif(_unified_ready() is not None, reason=str(_unified_ready()))


# ---------------------------------------------------------------------------------------
# fixtures: every cgroup removed and every process killed, whatever the test did


@pytest.fixture
def made():
    """Cgroups a test makes; removed in teardown (their leftover processes killed)."""
    made: list = []
    yield made
    errors = []
    for cg in made:
        try:
            cg.remove()
        except Exception as e:  # report all, remove the rest first
            errors.append(f"{cg!r}: {e}")
    assert not errors, errors


@pytest.fixture
def spawn(made):
    """spawn(cgroup, python_code) -> Popen of a python child that joins the cgroup before exec."""
    children: list[subprocess.Popen] = []

    def go(cg, code: str, **kw) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                             preexec_fn=lambda: cg.add_process(os.getpid()), **kw)
        children.append(p)
        return p

    yield go
    for p in children:
        if p.poll() is None:
            p.kill()
        p.wait()


def new_v1(made, limits: Limits) -> V1Cgroup:
    cg = create_cgroup(unique_name(), limits, driver="v1")
    made.append(cg)
    return cg


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def start_time(pid: int) -> str | None:
    """A process's identity: its start time, or None when no such live process exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def wait_for(predicate, timeout: float = 5.0) -> bool:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# ---------------------------------------------------------------------------------------
# parsing, as docker parses


@pytest.mark.parametrize("text, size", [
    ("4096", 4096), ("1024b", 1024), ("1024B", 1024), ("100k", 100 * 1024), ("100K", 102400),
    ("512m", 512 * MiB), ("512M", 512 * MiB), ("10MB", 10 * MiB), ("1g", 1 << 30),
    ("1GiB", 1 << 30), ("1gib", 1 << 30), ("1 g", 1 << 30), ("1.5g", 3 << 29),
    ("2t", 2 << 40), ("1p", 1 << 50), ("0", 0), ("1.5", 1), ("1 ", 1),
])
def test_parse_size_accepts_dockers_forms(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "m", "abc", "-1", "1x", "1.2.3", "1gg", " 1",
                                  "1  g", "1e3", "1ib", "99999999999p"])
def test_parse_size_refuses_junk_naming_it(text):
    with pytest.raises(CgroupError) as e:
        parse_size(text)
    assert repr(text) in str(e.value)


def test_parse_limits_converts_every_flag():
    limits = parse_limits(memory="512m", memory_swap="1g", cpus="0.5", cpu_shares="512",
                          pids_limit="100")
    assert limits == Limits(memory=512 * MiB, memory_swap=1 << 30, cpus=0.5, cpu_shares=512,
                            pids_limit=100)
    assert limits.warnings == ()
    assert parse_limits() == Limits()


def test_parse_limits_memory_minimum_is_dockers_6mb():
    with pytest.raises(CgroupError, match="minimum memory limit allowed is 6MB"):
        parse_limits(memory="6291455")
    assert parse_limits(memory="6m").memory == 6 * MiB
    assert parse_limits(memory="0").memory is None  # 0 = no limit, as in docker
    with pytest.raises(CgroupError, match="invalid size"):
        parse_limits(memory="-1")


def test_parse_limits_memory_swap_rules():
    assert parse_limits(memory="64m", memory_swap="-1").memory_swap == -1
    assert parse_limits(memory="64m", memory_swap="64m").memory_swap == 64 * MiB
    assert parse_limits(memory="64m").memory_swap is None  # the driver doubles it
    assert parse_limits(memory_swap="-1").memory_swap == -1
    with pytest.raises(CgroupError, match="needs --memory"):
        parse_limits(memory_swap="1g")
    with pytest.raises(CgroupError, match="must be at least --memory"):
        parse_limits(memory="1g", memory_swap="512m")
    with pytest.raises(CgroupError, match="invalid size: 'lots'"):
        parse_limits(memory="1g", memory_swap="lots")


def test_parse_limits_cpus_within_the_cpus_available():
    ncpu = len(os.sched_getaffinity(0))
    assert parse_limits(cpus="0.01").cpus == 0.01
    assert parse_limits(cpus=str(ncpu)).cpus == ncpu
    assert parse_limits(cpus="1/4").cpus == 0.25
    assert parse_limits(cpus="0").cpus is None
    msg = f"range of CPUs is from 0.01 to {ncpu}.00, as there are only {ncpu} CPUs available"
    for bad in (str(ncpu + 1), "0.001", "-1"):
        with pytest.raises(CgroupError) as e:
            parse_limits(cpus=bad)
        assert msg in str(e.value)
    with pytest.raises(CgroupError, match="too precise"):
        parse_limits(cpus="0.0100000001")
    for junk in ("half", "nan", "1..2", ""):
        with pytest.raises(CgroupError, match="not a number"):
            parse_limits(cpus=junk)


def test_parse_limits_cpu_shares_clamped_with_a_warning_like_docker():
    low = parse_limits(cpu_shares="1")
    assert low.cpu_shares == 2
    assert low.warnings == ("changing requested --cpu-shares of 1 to minimum allowed of 2",)
    high = parse_limits(cpu_shares="300000")
    assert high.cpu_shares == 262144 and "maximum allowed of 262144" in high.warnings[0]
    assert parse_limits(cpu_shares="0").cpu_shares is None
    with pytest.raises(CgroupError, match="positive"):
        parse_limits(cpu_shares="-5")
    with pytest.raises(CgroupError, match="not a whole number"):
        parse_limits(cpu_shares="1.5")


def test_parse_limits_pids_limit_zero_or_negative_is_unlimited():
    assert parse_limits(pids_limit="100").pids_limit == 100
    assert parse_limits(pids_limit="0").pids_limit is None
    assert parse_limits(pids_limit="-1").pids_limit is None
    with pytest.raises(CgroupError, match="--pids-limit 'many': not a whole number"):
        parse_limits(pids_limit="many")


def test_conversions():
    assert cfs_quota(0.5) == 50000
    assert cfs_quota(1.5) == 150000
    assert cfs_quota(0.01) == 1000
    assert (cpu_weight(2), cpu_weight(1024), cpu_weight(262144)) == (1, 39, 10000)


def test_names_must_be_one_path_component():
    for bad in ("", "a/b", "..", "."):
        with pytest.raises(CgroupError, match="invalid cgroup name"):
            create_cgroup(bad, Limits(), driver="v1")
    with pytest.raises(CgroupError, match="unknown cgroup driver 'v3'"):
        create_cgroup("x", Limits(), driver="v3")


# ---------------------------------------------------------------------------------------
# v1, for real


def test_detect_driver_tells_the_unified_hierarchy_from_v1():
    on_this_host = "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1"
    assert detect_driver() == on_this_host
    if Path(UNIFIED, "cgroup.controllers").exists():
        assert detect_driver(UNIFIED) == "v2"


@needs_v1
def test_v1_limits_land_in_the_files(made):
    limits = parse_limits(memory="64m", cpus="0.5", cpu_shares="512", pids_limit="20")
    cg = new_v1(made, limits)
    mem, cpu, pids = cg.dirs["memory"], cg.dirs["cpu"], cg.dirs["pids"]
    assert read(f"{mem}/memory.limit_in_bytes") == str(64 * MiB)
    assert read(f"{mem}/memory.memsw.limit_in_bytes") == str(128 * MiB)  # docker: 2 x memory
    assert read(f"{cpu}/cpu.cfs_quota_us") == "50000"
    assert read(f"{cpu}/cpu.cfs_period_us") == "100000"
    assert read(f"{cpu}/cpu.shares") == "512"
    assert read(f"{pids}/pids.max") == "20"
    assert set(cg.dirs) == {"memory", "pids", "cpu"}  # no freezer: each hierarchy costs
    for controller in ("memory", "pids", "cpu"):
        leaf = Path(cg.dirs[controller])
        assert leaf.parent.name == "kiln" and leaf.name.startswith("kiln-test-")
    tracked_only = new_v1(made, parse_limits())
    assert set(tracked_only.dirs) == {"memory"}  # memory alone tracks the processes

    unlimited_swap = new_v1(made, parse_limits(memory="64m", memory_swap="-1"))
    memsw = read(f"{unlimited_swap.dirs['memory']}/memory.memsw.limit_in_bytes")
    assert int(memsw) > 1 << 60
    no_swap = new_v1(made, parse_limits(memory="64m", memory_swap="64m"))
    assert read(f"{no_swap.dirs['memory']}/memory.memsw.limit_in_bytes") == str(64 * MiB)
    assert "cpu" not in no_swap.dirs  # the cpu hierarchy only when a cpu limit asks for it


@needs_v1
def test_v1_kiln_itself_stays_out_of_the_container_cgroup(made, spawn):
    before = Path("/proc/self/cgroup").read_text()
    cg = new_v1(made, parse_limits(memory="64m", pids_limit="50"))
    child = spawn(cg, "import time; time.sleep(30)")
    assert wait_for(lambda: str(child.pid) in read(f"{cg.dirs['pids']}/cgroup.procs"))
    assert Path("/proc/self/cgroup").read_text() == before
    for d in cg.dirs.values():
        assert read(f"{d}/cgroup.procs").split() == [str(child.pid)]


@needs_v1
def test_v1_memory_hog_is_oom_killed_and_reported(made, spawn):
    hog_cg = new_v1(made, parse_limits(memory="64m", memory_swap="64m"))
    hog = spawn(hog_cg, """
        chunks = []
        for _ in range(1024):          # 1 GiB at most, far past the limit
            chunks.append(b"x" * (1 << 20))
    """)
    assert hog.wait(timeout=20) == -9
    assert hog_cg.oom_killed() is True

    calm_cg = new_v1(made, parse_limits(memory="64m", memory_swap="64m"))
    calm = spawn(calm_cg, "data = b'x' * (8 << 20)")
    assert calm.wait(timeout=20) == 0
    assert calm_cg.oom_killed() is False

    hog_cg.remove()
    assert hog_cg.oom_killed() is True  # still known after removal, for the exit message


@needs_v1
def test_v1_fork_bomb_stops_at_pids_limit_and_the_host_is_fine(made, spawn, tmp_path):
    cg = new_v1(made, parse_limits(pids_limit="20"))
    report = tmp_path / "report"
    bomb = spawn(cg, f"""
        import os, time
        children, error = [], None
        for _ in range(200):
            try:
                pid = os.fork()
            except OSError as e:
                error = e.errno
                break
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            children.append(pid)
        with open({str(report)!r}, "w") as f:
            f.write(f"{{error}} {{' '.join(map(str, children))}}")
    """, stdout=subprocess.DEVNULL)
    assert bomb.wait(timeout=20) == 0
    error, *pids = report.read_text().split()
    assert int(error) == errno.EAGAIN
    assert len(pids) == 19  # the limit counts the forking process itself
    events = dict(line.split() for line in read(f"{cg.dirs['pids']}/pids.events").splitlines())
    assert int(events["max"]) >= 1  # the kernel counts the refused forks
    assert subprocess.run(["true"]).returncode == 0  # forking outside the cgroup still works

    # the parent exited; its 19 sleeping children are left in the cgroup: remove kills them
    started = {int(pid): start_time(int(pid)) for pid in pids}
    assert all(started.values())
    assert set(map(int, read(f"{cg.dirs['pids']}/cgroup.procs").split())) == set(started)
    t0 = time.monotonic()
    cg.remove()
    took = time.monotonic() - t0
    assert wait_for(lambda: all(start_time(p) != s for p, s in started.items()))
    assert took < 2.0
    assert not any(os.path.exists(d) for d in cg.dirs.values())


@needs_v1
def test_v1_cpus_half_a_cpu_is_what_the_process_gets(made, spawn):
    cg = new_v1(made, parse_limits(cpus="0.5"))
    spinner = spawn(cg, """
        import time
        start, cpu = time.monotonic(), time.process_time()
        while time.monotonic() - start < 1.0:
            pass
        print(time.process_time() - cpu)
    """, stdout=subprocess.PIPE)
    out, _ = spinner.communicate(timeout=20)
    used = float(out)
    assert 0.1 < used < 0.65, used  # 1 s of wall time at 0.5 CPU
    stat = dict(line.split() for line in read(f"{cg.dirs['cpu']}/cpu.stat").splitlines())
    assert int(stat["nr_throttled"]) > 0


@needs_v1
def test_v1_cpu_shares_split_a_contended_cpu(made, spawn):
    cpu = min(os.sched_getaffinity(0))
    spin = f"""
        import os, time
        os.sched_setaffinity(0, {{{cpu}}})
        start, used = time.monotonic(), time.process_time()
        while time.monotonic() - start < 1.0:
            pass
        print(time.process_time() - used)
    """
    heavy = spawn(new_v1(made, parse_limits(cpu_shares="1024")), spin, stdout=subprocess.PIPE)
    light = spawn(new_v1(made, parse_limits(cpu_shares="256")), spin, stdout=subprocess.PIPE)
    heavy_used = float(heavy.communicate(timeout=20)[0])
    light_used = float(light.communicate(timeout=20)[0])
    assert heavy_used > 2 * light_used, (heavy_used, light_used)  # 4:1 asked


@needs_v1
def test_v1_remove_kills_leftovers_and_leaves_no_directory(made, spawn, tmp_path):
    cg = new_v1(made, parse_limits(memory="64m", cpus="1", pids_limit="50"))
    pidfile = tmp_path / "daemon.pid"
    # a daemonised grandchild: double fork + setsid, its parent exits at once
    starter = spawn(cg, f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                open({str(pidfile)!r}, "w").write(str(os.getpid()))
                time.sleep(60)
            os._exit(0)
        time.sleep(60)
    """)
    assert wait_for(lambda: pidfile.exists() and pidfile.read_text())
    daemon = int(pidfile.read_text())
    identities = {starter.pid: start_time(starter.pid), daemon: start_time(daemon)}
    assert all(identities.values())

    cg.remove()
    assert starter.wait(timeout=5) == -9
    assert wait_for(lambda: start_time(daemon) != identities[daemon])
    for d in set(cg.dirs.values()):
        assert not os.path.exists(d)
    cg.remove()  # idempotent
    assert cg.oom_killed() is False


@needs_v1
def test_v1_failure_partway_removes_what_was_made(made):
    name = unique_name()
    hierarchies = cgroups.v1_hierarchies()
    with pytest.raises(CgroupError) as e:  # the kernel refuses a pids.max past PID_MAX_LIMIT
        create_cgroup(name, Limits(memory=64 * MiB, pids_limit=10**9), driver="v1")
    assert "pids.max" in str(e.value) and "1000000000" in str(e.value)
    for controller in ("memory", "pids", "freezer", "cpu"):
        assert not os.path.exists(os.path.join(hierarchies[controller], "kiln", name))


@needs_v1
def test_v1_driver_refuses_v2_where_there_is_none():
    if detect_driver() == "v2":
        pytest.skip("this host is cgroup v2")
    with pytest.raises(CgroupError, match="cgroup v2 is not mounted at /sys/fs/cgroup"):
        create_cgroup(unique_name(), Limits(), driver="v2")


# ---------------------------------------------------------------------------------------
# v2, for real on the unified hierarchy (no controllers there on a hybrid host)


@needs_unified
def test_v2_real_placement_add_and_remove_with_cgroup_kill(made, spawn, tmp_path):
    cg = V2Cgroup.create(unique_name(), Limits(), root=UNIFIED)
    made.append(cg)
    assert Path(cg.path).parent == Path(UNIFIED, "kiln")
    pidfile = tmp_path / "daemon.pid"
    starter = spawn(cg, f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                open({str(pidfile)!r}, "w").write(str(os.getpid()))
                time.sleep(60)
            os._exit(0)
        time.sleep(60)
    """)
    assert wait_for(lambda: pidfile.exists() and pidfile.read_text())
    daemon = int(pidfile.read_text())
    daemon_start = start_time(daemon)
    assert {starter.pid, daemon} <= set(map(int, read(f"{cg.path}/cgroup.procs").split()))
    assert cg.oom_killed() is False  # no memory controller here: nothing to report

    cg.remove()
    assert starter.wait(timeout=5) == -9
    assert wait_for(lambda: start_time(daemon) != daemon_start)
    assert not os.path.exists(cg.path)
    cg.remove()


@needs_unified
def test_v2_real_read_only_device_is_refused_by_the_bpf_program(made, spawn):
    """The eBPF device program kiln attaches on v2, run by the kernel for a real process:
    the denied access fails with EPERM, the other accesses and other devices still work."""
    cg = V2Cgroup.create(unique_name(), parse_limits(device_deny=("c 1:5 w", "c 1:3 r")),
                         root=UNIFIED)
    made.append(cg)
    probe = spawn(cg, """
        import os
        for path, flags in [("/dev/zero", os.O_RDONLY), ("/dev/zero", os.O_WRONLY),
                            ("/dev/zero", os.O_RDWR), ("/dev/null", os.O_WRONLY),
                            ("/dev/null", os.O_RDONLY), ("/dev/full", os.O_RDWR)]:
            try:
                os.close(os.open(path, flags))
                print(path, flags, "ok")
            except PermissionError:
                print(path, flags, "refused")
    """, stdout=subprocess.PIPE, text=True)
    out, _ = probe.communicate(timeout=30)
    assert out.splitlines() == ["/dev/zero 0 ok", "/dev/zero 1 refused", "/dev/zero 2 refused",
                                "/dev/null 1 ok", "/dev/null 0 refused", "/dev/full 2 ok"]
    with open("/dev/zero", "wb"):  # the host, outside the cgroup, is not affected
        pass
    cg.remove()
    assert not os.path.exists(cg.path)


@needs_unified
def test_v2_real_freeze_and_thaw_for_kiln_pause(made, spawn, tmp_path):
    """kiln pause's v2 path (cgroup.freeze, needing no controller) on the real unified
    hierarchy: a ticking process stops ticking while frozen and ticks again after."""
    from runtime.lifecycle import freeze

    cg = V2Cgroup.create(unique_name(), Limits(), root=UNIFIED)
    made.append(cg)
    tick = tmp_path / "tick"
    spawn(cg, f"""
        import time
        n = 0
        while True:
            n += 1
            open({str(tick)!r}, "w").write(str(n))
            time.sleep(0.01)
    """)
    assert wait_for(lambda: tick.exists() and tick.read_text())
    freeze({"": cg.path}, True, "probe")
    assert "frozen 1" in read(f"{cg.path}/cgroup.events")
    frozen_at = tick.read_text()
    time.sleep(0.3)
    assert tick.read_text() == frozen_at
    freeze({"": cg.path}, False, "probe")
    assert wait_for(lambda: tick.read_text() != frozen_at)


def test_device_program_rules_and_bad_rules():
    from runtime.device_filter import deny_program, parse_rule

    assert parse_rule("b 8:0 rwm") == (1, 8, 0, 7)
    assert parse_rule("c 1:5 w") == (2, 1, 5, 4)
    # six instructions of prologue, seven per rule, two to allow: 8 bytes each
    assert len(deny_program(["c 1:5 w", "b 8:0 r"])) == (6 + 2 * 7 + 2) * 8
    for bad in ("c 1:5", "x 1:5 w", "c a:5 w", "c 1:5 wq"):
        with pytest.raises(ValueError, match="invalid device rule"):
            parse_rule(bad)


@needs_unified
def test_v2_real_missing_controller_is_a_clear_error_and_leaves_nothing():
    if "memory" in read(f"{UNIFIED}/cgroup.controllers").split():
        pytest.skip("the unified hierarchy has the memory controller here")
    name = unique_name()
    with pytest.raises(CgroupError) as e:
        V2Cgroup.create(name, Limits(memory=64 * MiB), root=UNIFIED)
    assert f"{UNIFIED}/cgroup.controllers" in str(e.value) and "memory" in str(e.value)
    assert not os.path.exists(f"{UNIFIED}/kiln/{name}")


# ---------------------------------------------------------------------------------------
# v2 limit files against a stand-in cgroup2 tree (the controllers cannot run here)


INTERFACE = {
    "memory": {"memory.max": "max", "memory.swap.max": "max", "memory.low": "0",
               "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"},
    "cpu": {"cpu.max": "max 100000", "cpu.weight": "100"},
    "pids": {"pids.max": "max"},
    "cpuset": {"cpuset.cpus": "", "cpuset.mems": ""},
    "io": {"io.max": "", "io.weight": "default 100"},
}


class FakeCgroup2:
    """What cgroup2 does to directories: mkdir makes the interface files of the controllers
    the parent enables in cgroup.subtree_control; rmdir takes them away."""

    def __init__(self, root: Path, monkeypatch, controllers="cpuset cpu io memory pids",
                 without=()):
        self.root = root
        self.without = set(without)
        root.mkdir()
        self._populate(root, controllers)
        real_mkdir, real_rmdir = os.mkdir, os.rmdir

        def mkdir(path, mode=0o777, **kw):
            real_mkdir(path, mode, **kw)
            if self._inside(path):
                parent = Path(path).parent / "cgroup.subtree_control"
                enabled = [c.lstrip("+") for c in parent.read_text().split()]
                self._populate(Path(path), " ".join(enabled))

        def rmdir(path, **kw):
            if self._inside(path):
                p = Path(path)
                if any(c.is_dir() for c in p.iterdir()):
                    raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), str(path))
                if (p / "cgroup.procs").read_text().split():
                    raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))
                for f in p.iterdir():
                    f.unlink()
            real_rmdir(path, **kw)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "rmdir", rmdir)

    def _inside(self, path) -> bool:
        return str(path).startswith(str(self.root) + "/")

    def _populate(self, d: Path, controllers: str) -> None:
        files = {"cgroup.controllers": controllers, "cgroup.subtree_control": "",
                 "cgroup.procs": "", "cgroup.events": "populated 0\nfrozen 0\n"}
        if d != self.root:
            files["cgroup.kill"] = ""
        for controller in controllers.split():
            files.update(INTERFACE.get(controller, {}))
        for name, text in files.items():
            if name not in self.without:
                (d / name).write_text(text)


@pytest.fixture
def fake2(tmp_path, monkeypatch):
    return lambda **kw: FakeCgroup2(tmp_path / "cgroup2", monkeypatch, **kw)


def test_v2_files_enable_controllers_and_hold_the_limits(fake2):
    fake = fake2()
    limits = parse_limits(memory="64m", memory_swap="96m", cpus="0.5", cpu_shares="512",
                          pids_limit="20")
    cg = V2Cgroup.create("kiln-c1", limits, root=str(fake.root))
    leaf = Path(cg.path)
    assert leaf == fake.root / "kiln" / "kiln-c1"
    assert (fake.root / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (fake.root / "kiln" / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (leaf / "memory.max").read_text() == str(64 * MiB)
    assert (leaf / "memory.swap.max").read_text() == str(32 * MiB)  # memory_swap - memory
    assert (leaf / "cpu.max").read_text() == "50000 100000"
    assert (leaf / "cpu.weight").read_text() == "20"  # 1 + (510 * 9999) // 262142
    assert (leaf / "pids.max").read_text() == "20"
    assert cg.warnings == []

    cg.add_process(4242)
    assert (leaf / "cgroup.procs").read_text() == "4242"


def test_v2_cpuset_reservation_and_io_files(fake2):
    fake = fake2()
    disk = next((f"/dev/{n}" for n in sorted(os.listdir("/sys/block"))
                 if not n.startswith(("loop", "ram")) and os.path.exists(f"/dev/{n}")), None)
    rates = (f"{disk}:1mb",) if disk else ()
    limits = parse_limits(memory="64m", memory_reservation="32m", cpuset_cpus="0",
                          cpuset_mems="0", blkio_weight="300", device_read_bps=rates)
    cg = V2Cgroup.create("kiln-c2", limits, root=str(fake.root))
    leaf = Path(cg.path)
    assert "+cpuset" in (fake.root / "kiln" / "cgroup.subtree_control").read_text()
    assert "+io" in (fake.root / "kiln" / "cgroup.subtree_control").read_text()
    assert (leaf / "memory.low").read_text() == str(32 * MiB)
    assert (leaf / "cpuset.cpus").read_text() == "0"
    assert (leaf / "cpuset.mems").read_text() == "0"
    assert (leaf / "io.weight").read_text() == "300"
    if disk:
        rdev = os.stat(disk).st_rdev
        assert (leaf / "io.max").read_text() == f"{os.major(rdev)}:{os.minor(rdev)} rbps={MiB}"
    # a device rule is a BPF program, which a directory that is no cgroup cannot take: a
    # clear error, and the cgroup it was made for is removed
    with pytest.raises(CgroupError, match="cannot attach the device program .c 1:5 w"):
        V2Cgroup.create("kiln-c3", parse_limits(device_deny=("c 1:5 w",)),
                        root=str(fake.root))
    assert not (fake.root / "kiln" / "kiln-c3").exists()


def test_v2_swap_defaults_and_unlimited(fake2):
    fake = fake2()
    default = V2Cgroup.create("a", parse_limits(memory="64m"), root=str(fake.root))
    assert Path(default.path, "memory.swap.max").read_text() == str(64 * MiB)  # docker's 2x
    unlimited = V2Cgroup.create("b", parse_limits(memory="64m", memory_swap="-1"),
                                root=str(fake.root))
    assert Path(unlimited.path, "memory.swap.max").read_text() == "max"
    plain = V2Cgroup.create("c", Limits(), root=str(fake.root))
    assert Path(plain.path, "memory.max").read_text() == "max"  # untouched without a limit
    # memory (OOM events) and pids (accounting) always; cpu only when a limit needs it
    assert Path(fake.root, "kiln", "cgroup.subtree_control").read_text() == "+memory +pids"
    assert not Path(plain.path, "cpu.max").exists()


def test_v2_without_swap_accounting_warns_like_docker(fake2):
    fake = fake2(without={"memory.swap.max"})
    cg = V2Cgroup.create("kiln-c1", parse_limits(memory="64m", memory_swap="128m"),
                         root=str(fake.root))
    assert Path(cg.path, "memory.max").read_text() == str(64 * MiB)
    assert len(cg.warnings) == 1 and "--memory-swap was ignored" in cg.warnings[0]


def test_v2_oom_kill_read_from_memory_events(fake2):
    fake = fake2()
    cg = V2Cgroup.create("kiln-c1", parse_limits(memory="64m"), root=str(fake.root))
    events = Path(cg.path, "memory.events")
    assert cg.oom_killed() is False
    events.write_text(events.read_text().replace("oom_kill 0", "oom_kill 2"))
    assert cg.oom_killed() is True
    cg.remove()
    assert cg.oom_killed() is True


def test_v2_remove_writes_cgroup_kill_and_rmdirs_up_to_kiln(fake2, monkeypatch):
    fake = fake2()
    cg = V2Cgroup.create("kiln-c1", Limits(), root=str(fake.root))
    other = V2Cgroup.create("kiln-c2", Limits(), root=str(fake.root))
    kills = []
    real_write = cgroups._write
    monkeypatch.setattr(cgroups, "_write",
                        lambda path, value: (kills.append((path, value)), real_write(path, value)))
    cg.remove()
    assert kills == [(f"{cg.path}/cgroup.kill", 1)]
    assert not Path(cg.path).exists()
    assert Path(fake.root, "kiln").is_dir()  # another container still uses kiln/
    other.remove()
    assert not Path(fake.root, "kiln").exists()
    assert Path(fake.root, "cgroup.procs").exists()
    other.remove()


def test_v2_missing_controller_names_the_file_and_leaves_nothing(fake2):
    fake = fake2(controllers="memory pids")
    with pytest.raises(CgroupError) as e:
        V2Cgroup.create("kiln-c1", parse_limits(cpus="0.5"), root=str(fake.root))
    assert f"{fake.root}/cgroup.controllers" in str(e.value) and "cpu" in str(e.value)
    assert not Path(fake.root, "kiln").exists()


def test_v2_failure_writing_a_limit_removes_the_cgroup(fake2):
    fake = fake2(without={"pids.max"})
    with pytest.raises(CgroupError) as e:
        V2Cgroup.create("kiln-c1", parse_limits(memory="64m", pids_limit="20"),
                        root=str(fake.root))
    assert f"{fake.root}/kiln/kiln-c1/pids.max" in str(e.value) and "20" in str(e.value)
    assert not Path(fake.root, "kiln").exists()


def test_v2_existing_name_is_refused(fake2):
    fake = fake2()
    first = V2Cgroup.create("kiln-c1", Limits(), root=str(fake.root))
    with pytest.raises(CgroupError, match="already exists"):
        V2Cgroup.create("kiln-c1", Limits(), root=str(fake.root))
    assert Path(first.path).is_dir()
