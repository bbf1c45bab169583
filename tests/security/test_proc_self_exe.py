"""Issue 10.2, the CVE-2019-5736 primitive: a `#!/proc/self/exe` program makes the kernel
run whatever /proc/self/exe is for the process exec'ing it, here with the image's dynamic
loader. When kiln's PID 1 exec'd the image's program as the host's Python, that loader ran
with the host's Python binary as its executable (read: yes; write: only ETXTBSY stood in
the way). Nothing the container starts may reach a host binary, read or write."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
LOADER = "lib64/ld-linux-x86-64.so.2"


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory, busybox_rootfs) -> Path:
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("the hostile loader is placed where an x86_64 binary looks for it")
    root = tmp_path_factory.mktemp("hostile") / "rootfs"
    shutil.copytree(busybox_rootfs, root, symlinks=True)
    (root / "lib64").mkdir(exist_ok=True)
    subprocess.run(["gcc", "-nostdlib", "-static-pie", "-fno-stack-protector", "-fno-builtin",
                    "-O1", "-o",
                    str(root / LOADER),
                    str(HERE / "hostile_loader.c")], check=True)
    shutil.copy2(root / LOADER, root / "loader-as-program")
    (root / "evil").write_text("#!/proc/self/exe\n")
    (root / "evil").chmod(0o755)
    (root / "evil-one").write_text("#!/proc/1/exe\n")
    (root / "evil-one").chmod(0o755)
    return root


@pytest.fixture(scope="module")
def hostile(hostile_root, tmp_path_factory):
    from tests.conftest import KilnCLI

    cli = KilnCLI(tmp_path_factory.mktemp("hostilestore") / "root")
    cli("import", str(hostile_root), "hostile")
    return cli


@pytest.mark.parametrize("program", ["/evil", "/evil-one"])
@pytest.mark.parametrize("opts", [(), ("--cap-add", "SYS_PTRACE"), ("--init",),
                                  ("--init", "--cap-add", "SYS_PTRACE")])
def test_proc_self_exe_script_reaches_no_host_binary(hostile, program, opts):
    p = hostile("run", "--rm", *opts, "hostile", program, check=False)
    assert "OPENED" not in p.out, p.out
    assert "LOADER RAN" not in p.out, p.out  # the loader never even starts
    assert p.returncode == 126, (p.returncode, p.out, p.err)
    assert "Traceback" not in p.err


def test_proc_self_exe_is_the_programs_own(hostile):
    # the baseline the hostile loader compares with: run as a program, its exe is its own file
    p = hostile("run", "--rm", "hostile", "/loader-as-program", check=False)
    assert p.returncode == 0, p.err
    assert "LOADER RAN exe=/loader-as-program" in p.out
    assert "LOADER read /proc/self/exe: OPENED" in p.out  # its own file: the control case


def test_build_run_steps_are_covered_too(hostile, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text("FROM hostile\nRUN /evil\n")
    p = hostile("build", "-t", "x", str(ctx), check=False)
    assert "OPENED" not in p.out + p.err and "LOADER RAN" not in p.out + p.err
    assert p.returncode != 0
