"""The examples in Containerfiles/ build offline from the busybox base and do their job."""

from __future__ import annotations

from tests.conftest import PROJECT, KilnCLI


def test_web_example_serves_its_page(tmp_path, busybox_rootfs):
    kiln = KilnCLI(tmp_path / "root")
    kiln("import", str(busybox_rootfs), "busybox")
    kiln("build", "-t", "kiln-example/web", str(PROJECT / "Containerfiles" / "web"))
    p = kiln("run", "--rm", "kiln-example/web", "selftest")
    assert "Hello from a kiln-built image" in p.out
    assert kiln("run", "--rm", "kiln-example/web", "id", "-u").out == "1000\n"


def test_multistage_example(tmp_path, busybox_rootfs):
    kiln = KilnCLI(tmp_path / "root")
    kiln("import", str(busybox_rootfs), "busybox")
    kiln("build", "-t", "ms", str(PROJECT / "Containerfiles" / "multistage"))
    assert kiln("run", "--rm", "ms").out == "4\nbuild\nimage\nkiln\nlayer\n"
