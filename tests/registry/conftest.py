"""Registry fixtures: real CNCF distribution processes on 127.0.0.1.

The module-scoped registries are shared by the tests of one module: give each
test its own repository name. `fresh_registry` is an empty one per test.
`token_registry` resets its token server's knobs (token_key, expires_in,
anonymous_pull, denied_repos, ...) and recorded requests before every test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import container_tools, interop_dir  # noqa: F401 - shared fixtures
from tests.registry.faults import FaultProxy
from tests.registry.servers import REGISTRY_BIN, RegistryServer, start_registry

TOKEN_USERS = {"alice": "wonderland", "bob": "builder"}
TOKEN_DENIED_REPOS = {"denied/app", "library/protected"}


def _require_registry_binary() -> None:
    if not REGISTRY_BIN.exists():
        pytest.skip(f"!!! {REGISTRY_BIN} is missing: registry tests SKIPPED. "
                    "Install it with `apt-get install docker-registry` "
                    "(tests/setup-and-run.sh does) !!!")


def _serve(workdir: Path, **kwargs) -> Iterator[RegistryServer]:
    _require_registry_binary()
    server = start_registry(workdir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[RegistryServer]:
    """Plain http, no auth, deletes enabled."""
    yield from _serve(tmp_path_factory.mktemp("registry"))


@pytest.fixture
def fresh_registry(tmp_path) -> Iterator[RegistryServer]:
    """Like `registry`, but empty and only for this test."""
    yield from _serve(tmp_path / "fresh-registry")


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory) -> Iterator[RegistryServer]:
    """htpasswd Basic auth: alice / wonderland."""
    yield from _serve(tmp_path_factory.mktemp("basic-registry"), auth="basic",
                      users={"alice": "wonderland"})


@pytest.fixture(scope="module")
def _token_registry_module(tmp_path_factory) -> Iterator[RegistryServer]:
    _require_registry_binary()
    server = start_registry(tmp_path_factory.mktemp("token-registry"), auth="token",
                            users=TOKEN_USERS)
    ts = server.token_server
    ts.denied_repos.update(TOKEN_DENIED_REPOS)
    ts.privileged_users.add("alice")
    ts.remember_defaults()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def token_registry(_token_registry_module) -> RegistryServer:
    """Token auth: alice/wonderland may do anything; bob/builder may pull everywhere but
    push only outside token_server.denied_repos ({"denied/app", "library/protected"});
    anonymous requests get no token (set token_server.anonymous_pull = True for
    pull-only tokens). username/password are alice's."""
    _token_registry_module.token_server.reset()
    return _token_registry_module


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory) -> Iterator[RegistryServer]:
    """https with a throwaway trustme CA (ca_pem, certs_d/<host>/ca.crt); no auth."""
    yield from _serve(tmp_path_factory.mktemp("tls-registry"), tls=True)


@pytest.fixture
def fault_proxy(registry) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the module's plain `registry`, no faults yet."""
    with FaultProxy(registry) as proxy:
        yield proxy
