"""Issue 10, point 8: a registry that cannot be reached.

A refused connection, a host that does not resolve, a certificate that is not trusted:
asking again changes nothing, so kiln says so at once, in one line, without urllib3's
dump. Timeouts, resets and 5xx/429/408 can heal and are still retried.
"""

from __future__ import annotations

import time

import pytest

from registry_client.errors import RegistryError
from registry_client.pull import pull
from registry_client.transport import RegistryOptions
from store.store import Store
from tests.conftest import KilnCLI
from tests.registry.conftest import fault_proxy, registry, tls_registry  # noqa: F401
from tests.registry.faults import reset, status
from tests.registry.servers import free_port

NOISE = ("urllib3", "Traceback", "HTTPConnectionPool", "HTTPSConnectionPool", "Max retries",
         "NewConnectionError", "object at 0x")


def one_line_error(p, expected: str) -> None:
    assert p.returncode == 125, p.err
    assert p.err.splitlines() == [expected], p.err
    for noise in NOISE:
        assert noise not in p.err


def timed(kiln: KilnCLI, *args: str, stdin: bytes | None = None):
    started = time.monotonic()
    p = kiln(*args, check=False, input=stdin)
    return p, time.monotonic() - started


@pytest.fixture
def closed_port() -> str:
    """127.0.0.1:PORT where nothing listens."""
    return f"127.0.0.1:{free_port()}"


def test_pull_from_a_closed_port_fails_at_once(kiln, closed_port):
    p, elapsed = timed(kiln, "pull", f"{closed_port}/x:1")
    one_line_error(p, f"kiln: error: cannot connect to {closed_port}: connection refused")
    assert elapsed < 2, f"{elapsed:.1f} s"


def test_push_to_a_closed_port_fails_at_once(busybox_store, closed_port, tmp_path):
    kiln = KilnCLI(busybox_store.root)
    p, elapsed = timed(kiln, "push", "busybox:latest", f"{closed_port}/x:1")
    one_line_error(p, f"kiln: error: cannot connect to {closed_port}: connection refused")
    assert elapsed < 2, f"{elapsed:.1f} s"


def test_login_to_a_closed_port_fails_at_once(kiln, closed_port):
    p, elapsed = timed(kiln, "login", "-u", "alice", "--password-stdin", closed_port,
                       stdin=b"wonderland\n")
    one_line_error(p, f"kiln: error: cannot connect to {closed_port}: connection refused")
    assert elapsed < 2, f"{elapsed:.1f} s"


def test_a_host_that_does_not_resolve_fails_at_once(kiln):
    p, elapsed = timed(kiln, "pull", "no-such-registry.invalid/x:1")
    assert p.returncode == 125, p.err
    assert len(p.err.splitlines()) == 1, p.err
    assert p.err.startswith("kiln: error: cannot connect to no-such-registry.invalid:443: "
                            "DNS lookup failed"), p.err
    for noise in NOISE:
        assert noise not in p.err
    assert elapsed < 10, f"{elapsed:.1f} s"


def test_an_untrusted_certificate_fails_at_once_with_a_hint(kiln, tls_registry):  # noqa: F811
    p, elapsed = timed(kiln, "pull", f"{tls_registry.host}/x:1")
    assert p.returncode == 125, p.err
    assert len(p.err.splitlines()) == 1, p.err
    assert p.err.startswith(f"kiln: error: cannot connect to {tls_registry.host}: TLS "
                            "certificate verification failed: "), p.err
    assert "--cert-dir" in p.err
    for noise in NOISE:
        assert noise not in p.err
    assert elapsed < 2, f"{elapsed:.1f} s"


# ------------------------------------------------------------------ what can heal is retried


def _options(tmp_path, **kw) -> RegistryOptions:
    return RegistryOptions(env={"HOME": str(tmp_path / "home")}, retry_budget=20.0, **kw)


def test_a_reset_then_a_working_server_still_pulls(busybox_store, registry,  # noqa: F811
                                                   fault_proxy, tmp_path):  # noqa: F811
    from registry_client.push import push

    push(busybox_store, "busybox:latest", f"{registry.host}/heal/bb:1", _options(tmp_path))
    fault_proxy.add(reset(path="/manifests/", times=1))
    other = Store(tmp_path / "other")
    pull(other, f"{fault_proxy.host}/heal/bb:1", _options(tmp_path))
    manifest_gets = [r for r in fault_proxy.requests if "/manifests/" in r["path"]]
    assert [r["fault"] for r in manifest_gets] == ["reset", None]
    assert other.tags()


def test_408_is_retried_and_other_4xx_are_not(busybox_store, registry,  # noqa: F811
                                              fault_proxy, tmp_path):  # noqa: F811
    from registry_client.push import push

    push(busybox_store, "busybox:latest", f"{registry.host}/heal/bb408:1", _options(tmp_path))
    fault_proxy.add(status(408, path="/manifests/", times=1))
    pull(Store(tmp_path / "a"), f"{fault_proxy.host}/heal/bb408:1", _options(tmp_path))

    fault_proxy.add(status(403, path="/manifests/", times=None))
    started = time.monotonic()
    with pytest.raises(RegistryError, match="403"):
        pull(Store(tmp_path / "b"), f"{fault_proxy.host}/heal/bb408:1", _options(tmp_path))
    assert time.monotonic() - started < 2
    forbidden = [r for r in fault_proxy.requests if r["fault"] == "status"
                 and "/manifests/" in r["path"]]
    assert len(forbidden) == 2  # the 408 once, the 403 once: never asked again
