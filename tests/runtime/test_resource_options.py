"""kiln run's resource options beyond --memory/--cpus: ulimits, /dev/shm, namespaced sysctls,
the OOM score, cpusets, the memory reservation and the cgroup parent (v1 here)."""

from __future__ import annotations

import json
import os

import pytest

from runtime.cgroups import cgroup_dirs_of


def test_ulimits(krun):
    p = krun("sh", "-c", "ulimit -n; ulimit -Hn; ulimit -Sc; ulimit -Hc",
             opts=("--ulimit", "nofile=512:1024", "--ulimit", "core=-1"))
    assert p.out.split() == ["512", "1024", "unlimited", "unlimited"], p.err
    for bad, why in [("nofile", "want NAME=SOFT[:HARD]"), ("nosuch=1", "want NAME=SOFT"),
                     ("nofile=2048:1024", "more than the hard limit"),
                     ("nofile=x", "must be numbers")]:
        p = krun("true", opts=("--ulimit", bad))
        assert p.returncode == 125 and f"invalid --ulimit {bad!r}" in p.err and why in p.err


def test_shm_size(krun):
    p = krun("sh", "-c", "df -k /dev/shm | tail -1", opts=("--shm-size", "16m"))
    assert p.out.split()[1] == "16384", p.out
    p = krun("true", opts=("--shm-size", "lots"))
    assert p.returncode == 125 and "invalid size: 'lots'" in p.err


def test_namespaced_sysctls_and_only_those(krun):
    with open("/proc/sys/kernel/shmmni") as f:
        host_shmmni = f.read()
    p = krun("cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start", "/proc/sys/kernel/shmmni",
             opts=("--sysctl", "net.ipv4.ip_unprivileged_port_start=80",
                   "--sysctl", "kernel.shmmni=1234"))
    assert p.out.split() == ["80", "1234"], p.err
    with open("/proc/sys/kernel/shmmni") as f:
        assert f.read() == host_shmmni  # the host's is untouched
    for opts, why in [(("--sysctl", "kernel.pid_max=5000"), "not a namespaced sysctl"),
                      (("--sysctl", "net.ipv4.ip_forward"), "want KEY=VALUE"),
                      (("--sysctl", "net./../kernel/pid_max=1"), "want KEY=VALUE"),
                      (("--network", "host", "--sysctl", "net.ipv4.ip_forward=0"),
                       "not allowed with --network host")]:
        p = krun("true", opts=opts)
        assert p.returncode == 125 and why in p.err, p.err


def test_oom_score_adj(krun):
    assert krun("cat", "/proc/self/oom_score_adj", opts=("--oom-score-adj", "500")).out == "500\n"
    p = krun("true", opts=("--oom-score-adj", "1001"))
    assert p.returncode == 125 and "-1000 to 1000" in p.err


def test_cpuset(krun):
    last = max(os.sched_getaffinity(0))
    p = krun("grep", "Cpus_allowed_list", "/proc/self/status", opts=("--cpuset-cpus", str(last)))
    assert p.out.split() == ["Cpus_allowed_list:", str(last)], p.err
    p = krun("true", opts=("--cpuset-cpus", "4096"))
    assert p.returncode == 125 and "requested 4096 not available" in p.err
    p = krun("true", opts=("--cpuset-cpus", "1-0"))
    assert p.returncode == 125 and "invalid value '1-0' for --cpuset-cpus" in p.err


@pytest.fixture
def detached_probe(krun):
    made = []

    def run(*opts: str) -> dict:
        cid = krun.cli("run", "-d", *opts, "probe", "sleep", "60", check=True).out.strip()
        made.append(cid)
        return next(c for c in json.loads(krun.cli("ps", "--format", "json").out)
                    if c["id"] == cid)

    yield run
    for cid in made:
        krun.cli("rm", "-f", cid, check=False)


def test_memory_reservation_and_cgroup_parent(krun, detached_probe):
    parent = f"kiln-test-parent-{os.getpid()}"
    rec = detached_probe("--memory-reservation", "32m", "--cgroup-parent", parent)
    memory = next(d for k, d in cgroup_dirs_of(rec["pid"]).items() if "memory" in k.split(","))
    assert memory.endswith(f"/{parent}/kiln-{rec['id'][:12]}")
    with open(os.path.join(memory, "memory.soft_limit_in_bytes")) as f:
        assert int(f.read()) == 32 << 20
    p = krun("true", opts=("--memory", "16m", "--memory-reservation", "32m"))
    assert p.returncode == 125 and "reservation must be the smaller" in p.err
    p = krun("true", opts=("--cgroup-parent", "../escape"))
    assert p.returncode == 125 and "invalid --cgroup-parent" in p.err


def test_device_and_block_io_limits(krun, detached_probe):
    p = krun("sh", "-c", "head -c 3 /dev/myzero | od -An -c; echo x > /dev/myzero && echo wrote",
             opts=("--device", "/dev/zero:/dev/myzero:rwm"))
    assert p.out.split() == ["\\0", "\\0", "\\0", "wrote"], p.err
    # a node the container makes itself stays unusable: every mount is nodev
    p = krun("sh", "-c", "mknod /dev/z2 c 1 5 && head -c 1 /dev/z2")
    assert p.returncode != 0 and "Permission denied" in p.err
    p = krun("sh", "-c", "head -c 2 /dev/roz | od -An -c; echo x > /dev/roz || echo refused",
             opts=("--device", "/dev/zero:/dev/roz:r"))
    assert p.out.split() == ["\\0", "\\0", "refused"], p.err  # the devices cgroup says no
    for bad, why in [("/etc/passwd", "is not a device"), ("/nosuch", "No such file"),
                     ("/dev/zero:rel/path", "must be absolute")]:
        p = krun("true", opts=("--device", bad))
        assert p.returncode == 125 and why in p.err, (bad, p.err)
    disk = next((f"/dev/{n}" for n in sorted(os.listdir("/sys/block"))
                 if not n.startswith(("loop", "ram", "zram", "nbd"))
                 and os.path.exists(f"/dev/{n}")), None)
    if disk is None:
        pytest.skip("no block device here to throttle")
    rdev = os.stat(disk).st_rdev
    rec = detached_probe("--device-read-bps", f"{disk}:1mb", "--device-write-bps",
                         f"{disk}:2mb", "--blkio-weight", "300")
    blkio = next(d for k, d in cgroup_dirs_of(rec["pid"]).items() if "blkio" in k.split(","))
    with open(os.path.join(blkio, "blkio.throttle.read_bps_device")) as f:
        assert f.read().split() == [f"{os.major(rdev)}:{os.minor(rdev)}", str(1 << 20)]
    with open(os.path.join(blkio, "blkio.throttle.write_bps_device")) as f:
        assert f.read().split() == [f"{os.major(rdev)}:{os.minor(rdev)}", str(2 << 20)]
    p = krun("true", opts=("--blkio-weight", "5"))
    assert p.returncode == 125 and "from 10 to 1000" in p.err
    p = krun("true", opts=("--device-read-bps", "/etc/passwd:1mb"))
    assert p.returncode == 125 and "is not a block device" in p.err
