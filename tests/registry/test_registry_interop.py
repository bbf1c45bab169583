"""kiln and the containers tools through one real registry: what kiln pushes podman pulls
and runs and skopeo reads; what buildah builds and pushes (one image or a multi-arch
index) kiln pulls and runs; ``kiln copy`` to ``oci:`` is read by umoci."""

from __future__ import annotations

import json
import platform as host

import pytest

from tests.conftest import KilnCLI
from tests.interop.conftest import require_tool, run_tool

pytestmark = pytest.mark.interop

HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(host.machine(), host.machine())
OTHER_ARCH = "arm64" if HOST_ARCH != "arm64" else "amd64"


@pytest.fixture
def kiln_with_busybox(tmp_path, busybox_rootfs) -> KilnCLI:
    kiln = KilnCLI(tmp_path / "kiln-root")
    kiln("import", str(busybox_rootfs), "busybox:latest")
    return kiln


def test_podman_pulls_and_runs_what_kiln_pushes(kiln_with_busybox, registry, container_tools):
    kiln = kiln_with_busybox
    ref = f"{registry.host}/interop/kiln-pushed:1"
    digest = kiln("push", "-q", "busybox:latest", ref).out.strip()
    assert digest.startswith("sha256:")
    tools = container_tools
    raw = tools.skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{ref}").stdout
    cfg_digest = json.loads(raw)["config"]["digest"]
    assert kiln_config_digest(kiln, "busybox:latest") == cfg_digest
    tools.podman("pull", "--tls-verify=false", ref)
    p = tools.podman("run", "--rm", "--network", "none", ref, "/bin/busybox", "echo", "hello")
    assert p.stdout == "hello\n"
    podman_digest = json.loads(tools.podman("image", "inspect", ref).stdout)[0]["Digest"]
    assert podman_digest == digest


def kiln_config_digest(kiln: KilnCLI, name: str) -> str:
    from store.store import Store

    return Store(kiln.root).image(name).config_descriptor().digest


def test_kiln_pulls_and_runs_what_buildah_builds_and_pushes(kiln_with_busybox, registry,
                                                             container_tools, tmp_path):
    kiln = kiln_with_busybox
    base = f"{registry.host}/interop/base:1"
    kiln("push", "-q", "busybox:latest", base)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(f"FROM {base}\nRUN echo from-buildah > /made-by\n")
    tools = container_tools
    built = f"{registry.host}/interop/buildah-built:1"
    tools.buildah("bud", "--runtime", "/usr/sbin/runc", "--tls-verify=false", "--pull=always",
                  "-t", built, str(ctx))
    tools.buildah("push", "--tls-verify=false", built, f"docker://{built}")
    other = KilnCLI(tmp_path / "other-root")
    other("pull", "-q", built)
    assert other("run", "--rm", built, "cat", "/made-by").out == "from-buildah\n"


def test_kiln_pulls_the_host_platform_from_a_buildah_manifest_list(kiln_with_busybox, registry,
                                                                   container_tools, tmp_path):
    kiln = kiln_with_busybox
    one = f"{registry.host}/interop/plat:host"
    kiln("push", "-q", "busybox:latest", one)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(f"FROM {one}\nRUN echo other > /which\n")
    tools = container_tools
    two = f"{registry.host}/interop/plat:other"
    tools.buildah("bud", "--runtime", "/usr/sbin/runc", "--tls-verify=false", "-t", two,
                  str(ctx))
    tools.buildah("push", "--tls-verify=false", two, f"docker://{two}")
    index = f"{registry.host}/interop/plat:multi"
    tools.buildah("manifest", "create", "kiln-test-list")
    try:
        tools.buildah("manifest", "add", "--tls-verify=false", "kiln-test-list",
                      f"docker://{one}")
        tools.buildah("manifest", "add", "--tls-verify=false", "--arch", OTHER_ARCH,
                      "kiln-test-list", f"docker://{two}")
        tools.buildah("manifest", "push", "--all", "--tls-verify=false", "kiln-test-list",
                      f"docker://{index}")
    finally:
        tools.buildah("manifest", "rm", "kiln-test-list", check=False)
    pulled = KilnCLI(tmp_path / "pulled")
    pulled("pull", "-q", index)
    assert pulled("run", "--rm", index, "cat", "/which", check=False).returncode != 0
    want_other = KilnCLI(tmp_path / "pulled-other")
    want_other("pull", "-q", "--platform", f"linux/{OTHER_ARCH}", index)
    from store.store import Store

    image = Store(want_other.root).image(index)
    assert image.config()["architecture"] in (HOST_ARCH, OTHER_ARCH)
    assert image.digest != Store(pulled.root).image(index).digest


def test_kiln_copy_to_an_oci_layout_is_read_by_umoci(kiln_with_busybox, registry, tmp_path):
    umoci = require_tool("umoci")
    kiln = kiln_with_busybox
    ref = f"{registry.host}/interop/to-oci:1"
    kiln("push", "-q", "busybox:latest", ref)
    layout = tmp_path / "layout"
    kiln("copy", "-q", "--compression-format", "gzip", f"docker://{ref}", f"oci:{layout}:v1")
    assert "v1" in run_tool([umoci, "ls", "--layout", str(layout)]).stdout.split()
    bundle = tmp_path / "bundle"
    run_tool([umoci, "unpack", "--image", f"{layout}:v1", str(bundle)])
    assert (bundle / "rootfs" / "bin" / "busybox").exists()


def test_cli_login_push_pull_logout(kiln_with_busybox, basic_registry, tmp_path):
    kiln = kiln_with_busybox
    authfile = tmp_path / "auth" / "auth.json"
    env = {"REGISTRY_AUTH_FILE": str(authfile)}
    host = basic_registry.host
    bad = kiln("login", "-u", "alice", "--password-stdin", host, input=b"nope\n", env=env,
               check=False)
    assert bad.returncode == 125 and "refused" in bad.err and not authfile.exists()
    assert "nope" not in bad.err
    kiln("login", "-u", "alice", "--password-stdin", host, input=b"wonderland\n", env=env)
    assert authfile.stat().st_mode & 0o777 == 0o600
    assert host in json.loads(authfile.read_text())["auths"]
    assert kiln("login", "--get-login", host, env=env).out.strip() == "alice"
    kiln("push", "-q", "busybox:latest", f"{host}/cli/bb:1", env=env)
    other = KilnCLI(tmp_path / "other")
    other("pull", "-q", f"{host}/cli/bb:1", env=env)
    kiln("logout", host, env=env)
    denied = other("pull", "-q", f"{host}/cli/bb:2", env=env, check=False)
    assert denied.returncode == 125 and "authentication required" in denied.err
    assert kiln("logout", host, env=env, check=False).returncode == 125


def test_cli_errors_exit_125_and_name_the_url(tmp_path, registry):
    kiln = KilnCLI(tmp_path / "root")
    p = kiln("pull", f"{registry.host}/nothing/here:1", check=False)
    assert p.returncode == 125
    assert p.err.startswith("kiln: error: ") and f"{registry.host}/v2/nothing/here" in p.err
    p = kiln("copy", "nowhere", "oci:/tmp/x", check=False)
    assert p.returncode == 125 and "transport" in p.err
    assert "Traceback" not in p.err


def test_build_pulls_a_missing_base_image(kiln_with_busybox, registry, tmp_path):
    ref = f"{registry.host}/interop/from-base:1"
    kiln_with_busybox("push", "-q", "busybox:latest", ref)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(f"FROM {ref}\nRUN echo built > /f\n")
    fresh = KilnCLI(tmp_path / "fresh")
    fresh("build", "-q", "-t", "pulled-base", str(ctx))
    assert fresh("run", "--rm", "pulled-base", "cat", "/f").out == "built\n"
    never = KilnCLI(tmp_path / "never")
    p = never("build", "--pull", "never", "-t", "x", str(ctx), check=False)
    assert p.returncode == 125 and "not in the store" in p.err


def test_run_pulls_a_missing_image(kiln_with_busybox, registry, tmp_path):
    ref = f"{registry.host}/interop/run-me:1"
    kiln_with_busybox("push", "-q", "busybox:latest", ref)
    fresh = KilnCLI(tmp_path / "fresh")
    p = fresh("run", "--rm", ref, "echo", "pulled")
    assert p.out == "pulled\n" and f"pulling {ref}" in p.err
    p = fresh("run", "--rm", f"{registry.host}/interop/absent:1", "true", check=False)
    assert p.returncode == 125 and "manifest" in p.err
