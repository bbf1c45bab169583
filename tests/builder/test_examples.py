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


def test_cache_mounts_example(tmp_path, busybox_rootfs):
    kiln = KilnCLI(tmp_path / "root")
    kiln("import", str(busybox_rootfs), "busybox")
    example = str(PROJECT / "Containerfiles" / "cache-mounts")
    first = kiln("build", "-t", "cm", example)
    assert "fetch cache: miss" in first.err + first.out
    again = kiln("build", "--no-cache", "-t", "cm", example)  # the RUN runs again...
    assert "fetch cache: hit" in again.err + again.out  # ...and finds what it fetched
    lines = int(kiln("run", "--rm", "cm").out)
    assert lines == len((busybox_rootfs / "etc" / "passwd").read_text().splitlines())
    # the cache is not in the image
    assert kiln("run", "--rm", "cm", "ls", "/var/cache/fetch", check=False).out.strip() == ""
