"""kiln build --pull always|missing|never|newer against a real registry (issue 11, point 11):
a newer image is pushed under the same tag between builds, and each policy must build from
the image podman's policy of that name would use."""

from __future__ import annotations

import pytest

from tests.builder.conftest import build_context as _ctx
from tests.conftest import KilnCLI
from tests.registry.conftest import registry  # noqa: F401 - fixture
from tests.registry.servers import free_port


@pytest.fixture
def publish(tmp_path, busybox_rootfs, registry):  # noqa: F811
    """``publish(version)`` pushes an image whose /version says ``version`` as
    <registry>/pull/<test>:1, from a store of its own; returns the image's reference."""
    pusher = KilnCLI(tmp_path / "pusher")
    pusher("import", str(busybox_rootfs), "busybox")
    ref = f"{registry.host}/pull/{tmp_path.name.lower()}:1"

    def push(version: str) -> str:
        ctx = _ctx(tmp_path, f"FROM busybox\nRUN echo {version} > /version\n",
                   name=f"base-{version}")
        pusher("build", "-q", "-t", ref, str(ctx))
        pusher("push", "-q", ref)
        return ref

    return push


def _build(kiln: KilnCLI, tmp_path, base: str, *flags: str, check: bool = True):
    ctx = _ctx(tmp_path, f"FROM {base}\nRUN cat /version > /seen\n", name="app")
    return kiln("build", "-t", "app:1", *flags, str(ctx), check=check)


def _seen(kiln: KilnCLI) -> str:
    return kiln("run", "--rm", "app:1", "cat", "/seen").out.strip()


@pytest.fixture
def builder(tmp_path) -> KilnCLI:
    return KilnCLI(tmp_path / "builder")


def test_missing_is_the_default_and_keeps_the_stored_image(builder, publish, tmp_path):
    base = publish("v1")
    p = _build(builder, tmp_path, base)
    assert f"pulling {base}" in p.err and _seen(builder) == "v1"
    publish("v2")
    for flags in ((), ("--pull=missing",), ("--pull", "missing")):
        p = _build(builder, tmp_path, base, *flags)
        assert "pulling" not in p.err and _seen(builder) == "v1", flags


def test_always_pulls_every_time(builder, publish, tmp_path):
    base = publish("v1")
    _build(builder, tmp_path, base)
    publish("v2")
    # --pull alone is always, as podman's and docker's --pull; the context is not its value
    p = _build(builder, tmp_path, base, "--pull")
    assert f"pulling {base} (--pull=always)" in p.err and _seen(builder) == "v2"
    publish("v3")
    for flags, version in ((("--pull=true",), "v3"), (("--pull=always",), "v3")):
        p = _build(builder, tmp_path, base, *flags)
        assert f"pulling {base}" in p.err and _seen(builder) == version, flags


def test_always_fails_when_the_registry_cannot_be_reached(builder, publish, tmp_path):
    builder("pull", "-q", publish("v1"))
    offline = f"127.0.0.1:{free_port()}/pull/offline:1"
    builder("tag", publish("v1"), offline)
    p = _build(builder, tmp_path, offline, "--pull=always", check=False)
    assert p.returncode == 125 and offline.split("/")[0] in p.err, p.err
    assert f"app/Containerfile:1: FROM {offline}: pulling it: " in p.err
    assert "Traceback" not in p.err


def test_never_uses_the_stored_image_and_refuses_a_missing_one(builder, publish, tmp_path):
    base = publish("v1")
    p = _build(builder, tmp_path, base, "--pull=never", check=False)
    assert p.returncode == 125 and f"pulling {base}" not in p.err
    assert f"app/Containerfile:1: FROM {base}: image {base} is not in the store" in p.err, p.err
    assert "--pull=never" in p.err
    builder("pull", "-q", base)
    publish("v2")
    for flags in (("--pull=never",), ("--pull=false",), ("--pull", "never")):
        p = _build(builder, tmp_path, base, *flags)
        assert "pulling" not in p.err and _seen(builder) == "v1", flags


def test_newer_pulls_only_when_the_registry_digest_differs(builder, publish, tmp_path):
    base = publish("v1")
    builder("pull", "-q", base)
    p = _build(builder, tmp_path, base, "--pull=newer")
    assert "pulling" not in p.err and _seen(builder) == "v1"  # same digest: nothing pulled
    publish("v2")
    p = _build(builder, tmp_path, base, "--pull=newer")
    assert f"pulling {base}: its registry has sha256:" in p.err and _seen(builder) == "v2"
    p = _build(builder, tmp_path, base, "--pull=newer")
    assert "pulling" not in p.err and _seen(builder) == "v2"


def test_newer_uses_the_stored_image_when_the_registry_is_offline(builder, publish, tmp_path):
    builder("pull", "-q", publish("v1"))
    offline = f"127.0.0.1:{free_port()}/pull/offline:1"
    builder("tag", publish("v1"), offline)
    p = _build(builder, tmp_path, offline, "--pull=newer")
    assert f"[Warning] {offline}: cannot check its registry for a newer image" in p.err, p.err
    assert _seen(builder) == "v1"
    # a tag the registry does not have: the stored image too
    builder("tag", offline, f"{publish('v1').rsplit(':', 1)[0]}:not-pushed")
    p = _build(builder, tmp_path, f"{publish('v1').rsplit(':', 1)[0]}:not-pushed",
               "--pull=newer")
    assert "its registry has no such image; using the stored" in p.err, p.err


def test_bad_pull_policy_is_a_usage_error(builder, tmp_path):
    p = _build(builder, tmp_path, "busybox", "--pull=sometimes", check=False)
    assert p.returncode == 125 and "want always, missing, never or newer" in p.err, p.err
