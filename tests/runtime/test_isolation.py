"""Probes from inside a default container: each must fail, and the host must not change."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


def test_capabilities_are_dockers_default(krun):
    status = krun("cat", "/proc/self/status").out
    caps = dict(line.split(":\t") for line in status.splitlines() if line.startswith("Cap"))
    assert caps["CapEff"] == "00000000a80425fb"
    assert caps["CapPrm"] == "00000000a80425fb"
    assert caps["CapBnd"] == "00000000a80425fb"
    assert caps["CapInh"] == caps["CapAmb"] == "0000000000000000"
    nobody = krun("cat", "/proc/self/status", opts=("-u", "nobody")).out
    assert "CapEff:\t0000000000000000" in nobody


def test_cap_add_drop(krun):
    out = krun("grep", "CapEff", "/proc/self/status",
               opts=("--cap-drop", "ALL", "--cap-add", "NET_ADMIN")).out
    assert out.split()[1] == f"{1 << 12:016x}"


@pytest.mark.parametrize("probe", [
    ["mount", "-t", "tmpfs", "none", "/mnt"],
    ["unshare", "-U", "true"],
    ["unshare", "-m", "true"],
    ["/probe", "keyctl"],
    ["/probe", "add_key"],
    ["/probe", "bpf"],
    ["/probe", "clone_newuser"],
    ["/probe", "unshare_user"],
    ["/probe", "vsock"],
    ["/probe", "alg"],
    ["/probe", "personality", "0x400000"],
    ["/probe", "write", "/proc/sysrq-trigger", "h"],
    ["/probe", "write", "/proc/sys/kernel/core_pattern", "|/tmp/x"],
    ["sh", "-c", "mknod /tmp/sda b 8 0 && /probe open_rw /tmp/sda"],
])
def test_blocked_by_default(krun, probe):
    p = krun(*probe)
    assert p.returncode != 0 and "ALLOWED" not in p.out, (p.out, p.err)


def test_allowed_things_still_work(krun):
    assert krun("/probe", "inet").out == "ALLOWED\n"
    assert krun("/probe", "personality", "0x0").out == "ALLOWED\n"


def test_masked_proc_files_are_empty(krun):
    from runtime.spec import MASKED_PATHS

    present = [p for p in MASKED_PATHS if os.path.exists(p)]
    assert "/proc/keys" in present and "/sys/firmware" in present
    script = "; ".join(f"echo {p} $(cat {p} 2>/dev/null | wc -c) $(ls -A {p} | wc -l)"
                       for p in present)
    p = krun("sh", "-c", script)
    for line in p.out.splitlines():
        path, nbytes, entries = line.split()
        assert nbytes == "0", line
        assert entries in ("0", "1"), line  # an empty dir, or the file itself


def test_network_none_sees_only_loopback(krun):
    p = krun("sh", "-c", "ls /sys/class/net; ip link show lo", opts=("--network", "none"))
    names = p.out.split("\n")[0].split()
    assert "lo" in p.out and "UP" in p.out and "eth0" not in p.out, p.out
    assert names == ["lo"] or p.out.splitlines()[0] == "lo"


def test_host_processes_are_invisible_and_unkillable(krun):
    victim = subprocess.Popen(["sleep", "60"])
    try:
        p = krun("sh", "-c", f"ps -o pid | wc -l; kill -9 {victim.pid}; echo rc=$?")
        assert int(p.out.split()[0]) <= 5  # header + sh + ps + wc
        assert "rc=0" not in p.out
        p = krun("/probe", "ptrace", str(victim.pid))
        assert "ALLOWED" not in p.out
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_no_new_privileges_keeps_setuid_from_raising_euid(krun):
    assert krun("/suid-probe", "euid", opts=("-u", "nobody")).out == "0\n"
    p = krun("/suid-probe", "euid", opts=("-u", "nobody", "--security-opt",
                                          "no-new-privileges"))
    assert p.out == "65534\n"


def test_only_stdio_descriptors_are_inherited(krun):
    # "; true" keeps sh from exec'ing ls: $$ is then the shell kiln started, not ls
    assert krun("sh", "-c", "ls /proc/$$/fd; true").out.split() == ["0", "1", "2"]


@pytest.mark.parametrize("opts", [(), ("--cap-add", "SYS_PTRACE")])
def test_kiln_init_is_no_host_file(krun, opts):
    """--init's PID 1 is kiln's init stub from a sealed memfd: no host file behind
    /proc/1/exe (as docker-init or a Python interpreter would be), and it cannot be changed."""
    p = krun("sh", "-c", "readlink /proc/1/exe; /probe open_rw /proc/1/exe",
             opts=("--init", *opts))
    lines = p.out.splitlines()
    assert lines[0] == "/memfd:kiln-exec (deleted)", p.out + p.err
    assert "ALLOWED" not in p.out, p.out + p.err


def test_mounts_inside_do_not_reach_the_host(krun):
    before = Path("/proc/self/mountinfo").read_text()
    p = krun("sh", "-c", "mount -t tmpfs none /tmp && touch /tmp/x && echo mounted",
             opts=("--cap-add", "SYS_ADMIN", "--security-opt", "seccomp=unconfined"))
    assert p.out == "mounted\n", p.err
    after = Path("/proc/self/mountinfo").read_text()
    assert after == before


def test_refuses_images_whose_proc_is_a_symlink(krun, tmp_path, busybox_rootfs):
    import shutil

    root = tmp_path / "rootfs"
    shutil.copytree(busybox_rootfs, root, symlinks=True)
    (root / "proc").rmdir()
    (root / "proc").symlink_to("/tmp")
    krun.cli("import", str(root), "badproc")
    p = krun.cli("run", "--rm", "badproc", "true", check=False)
    assert p.returncode == 125 and "/proc is a symbolic link" in p.err


@pytest.mark.parametrize("make_bad", ["dev", "dev/null"])
def test_refuses_images_whose_dev_or_dev_null_is_a_symlink(krun, tmp_path, busybox_rootfs,
                                                          make_bad):
    import shutil

    root = tmp_path / "rootfs"
    shutil.copytree(busybox_rootfs, root, symlinks=True)
    target = root / make_bad
    if target.is_dir():
        target.rmdir()
    target.symlink_to("/etc")
    name = "bad" + make_bad.replace("/", "")
    krun.cli("import", str(root), name)
    p = krun.cli("run", "--rm", name, "true", check=False)
    assert p.returncode == 125 and f"/{make_bad} is a symbolic link" in p.err


def test_sys_is_read_only(krun):
    p = krun("sh", "-c", "echo 1 > /sys/kernel/profiling")
    assert p.returncode != 0 and "Read-only file system" in p.err


@pytest.mark.parametrize("opts", [(), ("--init",)])
def test_the_program_starts_with_default_signal_dispositions(krun, opts):
    """Python ignores SIGPIPE and SIGXFSZ; a program kiln starts must not inherit that
    (under docker `yes | head -1` ends because yes dies of SIGPIPE)."""
    p = krun("sh", "-c", "grep -E '^Sig(Ign|Blk)' /proc/self/status; yes | head -1",
             opts=opts)
    assert p.out.split() == ["SigBlk:", "0" * 16, "SigIgn:", "0" * 16, "y"], p.out + p.err
