"""Credential lookup and login/logout storage, on real files and real helper programs.

Every test passes its own environment mapping: nothing here reads or writes the real
~/.docker, ~/.config or /run/containers.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from registry_client import credentials as credmod
from registry_client.credentials import (
    CredentialHelperError,
    Credentials,
    CredentialsError,
    MissingPasswordError,
    auth_file_candidates,
    creds_need_password,
    find_credentials,
    login_file,
    parse_creds,
    remove_all_credentials,
    remove_credentials,
    store_credentials,
)
from store.errors import KilnError

SECRET = "hunter2-s3cr3t:with:colons"

HELPER_SCRIPT = """\
#!{python}
import json, os, sys
store = os.environ["KILNTEST_STORE"]
action = sys.argv[1]
data = json.load(open(store)) if os.path.exists(store) else {{}}
raw = sys.stdin.read()
with open(os.environ["KILNTEST_LOG"], "a") as log:
    url = json.loads(raw)["ServerURL"] if action == "store" else raw.strip()
    log.write(action + " " + url + "\\n")
def missing():
    print("credentials not found in native keychain")
    sys.exit(1)
if action == "get":
    if raw.strip() not in data:
        missing()
    user, secret = data[raw.strip()]
    print(json.dumps({{"ServerURL": raw.strip(), "Username": user, "Secret": secret}}))
elif action == "store":
    req = json.loads(raw)
    data[req["ServerURL"]] = [req["Username"], req["Secret"]]
    json.dump(data, open(store, "w"))
elif action == "erase":
    if raw.strip() not in data:
        missing()
    del data[raw.strip()]
    json.dump(data, open(store, "w"))
else:
    sys.exit(2)
"""


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def entry(user: str, password: str = "pw") -> dict:
    return {"auth": b64(f"{user}:{password}")}


class Home:
    """A fake user: HOME, XDG_RUNTIME_DIR, a PATH with our helpers, and the helper's store."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.run = root / "run"
        self.bin = root / "bin"
        for d in (self.home, self.run, self.bin):
            d.mkdir(parents=True)
        self.helper_store = root / "helper-store.json"
        self.helper_log = root / "helper.log"
        self.env = {
            "HOME": str(self.home),
            "XDG_RUNTIME_DIR": str(self.run),
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "KILNTEST_STORE": str(self.helper_store),
            "KILNTEST_LOG": str(self.helper_log),
        }

    @property
    def runtime_file(self) -> Path:
        return self.run / "containers" / "auth.json"

    @property
    def config_file(self) -> Path:
        return self.home / ".config" / "containers" / "auth.json"

    @property
    def docker_file(self) -> Path:
        return self.home / ".docker" / "config.json"

    def add_helper(self, name: str, body: str) -> None:
        script = self.bin / f"docker-credential-{name}"
        script.write_text(body)
        script.chmod(0o755)

    def add_store_helper(self, name: str = "kilntest", contents: dict | None = None) -> None:
        self.add_helper(name, HELPER_SCRIPT.format(python=sys.executable))
        if contents is not None:
            self.helper_store.write_text(json.dumps(contents))

    def helper_calls(self) -> list[str]:
        if not self.helper_log.exists():
            return []
        return self.helper_log.read_text().splitlines()

    def helper_contents(self) -> dict:
        return json.loads(self.helper_store.read_text()) if self.helper_store.exists() else {}


@pytest.fixture
def user(tmp_path) -> Home:
    return Home(tmp_path)


def lookup(user: Home, registry: str, repository: str | None = None, **kw):
    return find_credentials(registry, repository, env=user.env, **kw)


# --- --creds -------------------------------------------------------------------------------


def test_creds_split_at_first_colon():
    creds = parse_creds("alice:pa:ss:word")
    assert (creds.username, creds.password, creds.identity_token) == ("alice", "pa:ss:word", None)
    assert parse_creds("alice:").password == ""


def test_creds_without_password_asks_for_one():
    assert creds_need_password("alice")
    assert not creds_need_password("alice:x")
    with pytest.raises(MissingPasswordError) as err:
        parse_creds("alice")
    assert err.value.username == "alice"
    assert "password" in str(err.value)
    assert isinstance(err.value, KilnError)


@pytest.mark.parametrize("text", ["", ":" + SECRET])
def test_creds_without_username_is_an_error_that_hides_the_password(text):
    with pytest.raises(CredentialsError) as err:
        parse_creds(text)
    assert SECRET not in str(err.value)


def test_creds_option_wins_over_every_file(user):
    write_json(user.runtime_file, {"auths": {"localhost:5000": entry("fromfile")}})
    creds = lookup(user, "localhost:5000", creds="cli:" + SECRET)
    assert (creds.username, creds.password, creds.source) == ("cli", SECRET, "--creds")


def test_repr_and_str_never_show_secrets():
    creds = Credentials("alice", SECRET, identity_token="refresh-" + SECRET)
    for text in (repr(creds), str(creds), f"{creds}", repr([creds])):
        assert "alice" in text
        assert SECRET not in text


# --- which files, in which order -----------------------------------------------------------


def test_default_candidates_follow_podman(user):
    assert auth_file_candidates(env=user.env) == [
        user.runtime_file, user.config_file, user.docker_file, user.home / ".dockercfg"]


def test_authfile_and_registry_auth_file_replace_only_the_runtime_file(user, tmp_path):
    explicit = tmp_path / "explicit.json"
    env = dict(user.env, REGISTRY_AUTH_FILE=str(tmp_path / "fromenv.json"))
    assert auth_file_candidates(env=env)[0] == tmp_path / "fromenv.json"
    assert auth_file_candidates(env=env, authfile=str(explicit))[0] == explicit
    assert user.runtime_file not in auth_file_candidates(env=env)
    assert auth_file_candidates(env=env)[1:] == auth_file_candidates(env=user.env)[1:]


def test_docker_config_and_xdg_config_home_are_honoured(user, tmp_path):
    env = dict(user.env, DOCKER_CONFIG=str(tmp_path / "dc"), XDG_CONFIG_HOME=str(tmp_path / "xc"))
    files = auth_file_candidates(env=env)
    assert tmp_path / "dc" / "config.json" in files
    assert tmp_path / "xc" / "containers" / "auth.json" in files
    assert user.docker_file not in files


def test_without_xdg_runtime_dir_the_file_is_under_run_containers_uid(user):
    env = {k: v for k, v in user.env.items() if k != "XDG_RUNTIME_DIR"}
    assert login_file(env) == Path(f"/run/containers/{os.getuid()}/auth.json")


def test_first_file_with_an_entry_wins(user):
    write_json(user.runtime_file, {"auths": {"quay.io": entry("runtime")}})
    write_json(user.config_file, {"auths": {"quay.io": entry("config"),
                                            "ghcr.io": entry("config")}})
    write_json(user.docker_file, {"auths": {"quay.io": entry("docker"),
                                            "ghcr.io": entry("docker"),
                                            "localhost:5000": entry("docker")}})
    write_json(user.home / ".dockercfg", {"https://legacy.example:8443/v1/": entry("legacy")})
    assert lookup(user, "quay.io").username == "runtime"
    assert lookup(user, "ghcr.io").username == "config"
    found = lookup(user, "localhost:5000")
    assert found.username == "docker"
    assert found.source == str(user.docker_file)
    assert lookup(user, "legacy.example:8443").username == "legacy"
    assert lookup(user, "elsewhere.example") is None


def test_docker_config_env_points_at_another_dir(user, tmp_path):
    write_json(user.docker_file, {"auths": {"quay.io": entry("home-docker")}})
    write_json(tmp_path / "dc" / "config.json", {"auths": {"quay.io": entry("docker-config")}})
    env = dict(user.env, DOCKER_CONFIG=str(tmp_path / "dc"))
    assert find_credentials("quay.io", env=env).username == "docker-config"


def test_authfile_is_read_first_and_the_docker_config_still_follows(user, tmp_path):
    authfile = write_json(tmp_path / "mine.json", {"auths": {"quay.io": entry("mine")}})
    write_json(user.runtime_file, {"auths": {"quay.io": entry("runtime"),
                                             "ghcr.io": entry("runtime")}})
    write_json(user.docker_file, {"auths": {"ghcr.io": entry("docker")}})
    assert lookup(user, "quay.io", authfile=str(authfile)).username == "mine"
    # The runtime file is replaced by --authfile, docker's config is not (as skopeo does).
    assert lookup(user, "ghcr.io", authfile=str(authfile)).username == "docker"
    env = dict(user.env, REGISTRY_AUTH_FILE=str(authfile))
    assert find_credentials("quay.io", env=env).username == "mine"


def test_missing_explicit_authfile_is_an_error(user, tmp_path):
    with pytest.raises(CredentialsError, match="nothere.json"):
        lookup(user, "quay.io", authfile=str(tmp_path / "nothere.json"))


def test_no_files_at_all_means_anonymous(user):
    assert lookup(user, "docker.io", "library/busybox") is None


def test_empty_placeholder_entry_falls_through_to_the_next_file(user):
    write_json(user.runtime_file, {"auths": {"quay.io": {}}})
    write_json(user.docker_file, {"auths": {"quay.io": entry("docker")}})
    assert lookup(user, "quay.io").username == "docker"


# --- keys and entries ----------------------------------------------------------------------


def test_most_specific_namespace_wins(user):
    write_json(user.runtime_file, {"auths": {
        "quay.io": entry("host"),
        "quay.io/team": entry("team"),
        "quay.io/team/app": entry("app"),
    }})
    assert lookup(user, "quay.io", "team/app").username == "app"
    assert lookup(user, "quay.io", "team/app/sub").username == "app"
    assert lookup(user, "quay.io", "team/other").username == "team"
    assert lookup(user, "quay.io", "teamster/app").username == "host"
    assert lookup(user, "quay.io", "someone/app").username == "host"
    assert lookup(user, "quay.io").username == "host"


def test_namespace_only_file_gives_nothing_for_other_repositories(user):
    write_json(user.runtime_file, {"auths": {"quay.io/team": entry("team")}})
    write_json(user.docker_file, {"auths": {"quay.io": entry("docker")}})
    assert lookup(user, "quay.io", "team/app").username == "team"
    assert lookup(user, "quay.io", "other/app").username == "docker"


@pytest.mark.parametrize("key", ["https://index.docker.io/v1/", "index.docker.io", "docker.io",
                                 "registry-1.docker.io", "https://registry-1.docker.io"])
def test_docker_hub_aliases(user, key):
    write_json(user.docker_file, {"auths": {key: entry("hubuser")}})
    assert lookup(user, "docker.io", "library/busybox").username == "hubuser"
    assert lookup(user, "index.docker.io").username == "hubuser"


def test_docker_hub_namespace_key(user):
    write_json(user.runtime_file, {"auths": {"docker.io": entry("hub"),
                                             "docker.io/library": entry("library")}})
    assert lookup(user, "docker.io", "library/busybox").username == "library"
    assert lookup(user, "docker.io", "someone/app").username == "hub"


@pytest.mark.parametrize("key", ["https://localhost:5000", "http://localhost:5000",
                                 "https://localhost:5000/v2/", "http://localhost:5000/v1/"])
def test_url_form_keys(user, key):
    write_json(user.docker_file, {"auths": {key: entry("urluser")}})
    assert lookup(user, "localhost:5000", "a/b").username == "urluser"
    assert lookup(user, "localhost:5001") is None


def test_plain_key_beats_url_form_in_the_same_file(user):
    write_json(user.docker_file, {"auths": {"https://localhost:5000/v1/": entry("url"),
                                            "localhost:5000": entry("plain"),
                                            "http://localhost:5000": entry("url2")}})
    assert lookup(user, "localhost:5000").username == "plain"


def test_password_with_colons_and_username_password_fields(user):
    write_json(user.runtime_file, {"auths": {
        "a.example": {"auth": b64("alice:" + SECRET)},
        "b.example": {"username": "bob", "password": SECRET},
    }})
    assert lookup(user, "a.example").password == SECRET
    bob = lookup(user, "b.example")
    assert (bob.username, bob.password) == ("bob", SECRET)


def test_identity_token_is_kept(user):
    write_json(user.docker_file, {"auths": {
        "a.example": {"auth": b64("alice:"), "identitytoken": "refresh-abc"},
        "b.example": {"identitytoken": "refresh-def"},
    }})
    a = lookup(user, "a.example")
    assert (a.username, a.password, a.identity_token) == ("alice", "", "refresh-abc")
    assert lookup(user, "b.example").identity_token == "refresh-def"


# --- malformed files -----------------------------------------------------------------------


@pytest.mark.parametrize("content, words", [
    ('{"auths": {"quay.io": {"auth": "' + b64("u:" + SECRET) + '"}', ["not valid JSON"]),
    ("[1, 2]", ["JSON object"]),
    ('{"auths": ["quay.io"]}', ["auths"]),
    ('{"auths": {"quay.io": "' + SECRET + '"}}', ["'quay.io'", "JSON object"]),
    ('{"auths": {"quay.io": {"auth": "!!' + SECRET + '"}}}', ["'quay.io'", "base64"]),
    ('{"auths": {"quay.io": {"auth": "' + b64("nocolon" + SECRET.replace(":", "")) + '"}}}',
     ["'quay.io'", "':'"]),
    ('{"auths": {"quay.io": {"auth": "' + base64.b64encode(b"\xff\xfe:x").decode() + '"}}}',
     ["'quay.io'"]),
    ('{"auths": {"quay.io": {"auth": 12}}}', ["'quay.io'", "'auth'"]),
    ('{"auths": {}, "credHelpers": {"quay.io": 1}}', ["credHelpers"]),
])
def test_malformed_file_names_the_file_and_key_and_hides_the_secret(user, content, words):
    user.runtime_file.parent.mkdir(parents=True)
    user.runtime_file.write_text(content)
    with pytest.raises(CredentialsError) as err:
        lookup(user, "quay.io")
    message = str(err.value)
    assert str(user.runtime_file) in message
    for word in words:
        assert word in message
    assert SECRET not in message
    assert SECRET.replace(":", "") not in message


def test_broken_entry_for_another_registry_does_not_matter(user):
    write_json(user.runtime_file, {"auths": {"quay.io": {"auth": "%%%"},
                                             "ghcr.io": entry("fine")}})
    assert lookup(user, "ghcr.io").username == "fine"


def test_auth_file_that_is_a_directory(user):
    user.runtime_file.mkdir(parents=True)
    with pytest.raises(CredentialsError, match="is a directory"):
        lookup(user, "quay.io")


# --- credential helpers ---------------------------------------------------------------------


def test_cred_helper_for_a_host(user):
    user.add_store_helper(contents={"localhost:5000": ["helperuser", SECRET]})
    write_json(user.runtime_file, {"auths": {"localhost:5000": entry("inline")},
                                   "credHelpers": {"localhost:5000": "kilntest"}})
    found = lookup(user, "localhost:5000", "x/y")
    assert (found.username, found.password) == ("helperuser", SECRET)
    assert "docker-credential-kilntest" in found.source
    assert user.helper_calls() == ["get localhost:5000"]
    assert SECRET not in repr(found)


def test_cred_helper_gets_docker_hub_as_the_v1_url_then_as_docker_io(user):
    user.add_store_helper(contents={"https://index.docker.io/v1/": ["hub", "pw"]})
    write_json(user.docker_file, {"credHelpers": {"docker.io": "kilntest"}})
    assert lookup(user, "docker.io", "library/busybox").username == "hub"
    assert user.helper_calls() == ["get https://index.docker.io/v1/"]
    # A helper filled by podman holds the entry under docker.io.
    user.helper_store.write_text(json.dumps({"docker.io": ["podmanhub", "pw"]}))
    assert lookup(user, "docker.io", "library/busybox").username == "podmanhub"


def test_cred_helper_token_username_means_identity_token(user):
    user.add_store_helper(contents={"ghcr.io": ["<token>", "refresh-xyz"]})
    write_json(user.docker_file, {"credHelpers": {"ghcr.io": "kilntest"}})
    found = lookup(user, "ghcr.io")
    assert (found.username, found.password, found.identity_token) == ("", "", "refresh-xyz")


def test_cred_helper_without_the_entry_falls_through_to_the_next_file(user):
    user.add_store_helper(contents={})
    write_json(user.runtime_file, {"credHelpers": {"quay.io": "kilntest"}})
    write_json(user.docker_file, {"auths": {"quay.io": entry("docker")}})
    assert lookup(user, "quay.io").username == "docker"
    assert user.helper_calls() == ["get quay.io"]


def test_cred_helper_not_on_path_is_named(user):
    write_json(user.runtime_file, {"credHelpers": {"quay.io": "nosuchhelper"}})
    with pytest.raises(CredentialHelperError) as err:
        lookup(user, "quay.io")
    assert "docker-credential-nosuchhelper" in str(err.value)
    assert "PATH" in str(err.value)
    assert str(user.runtime_file) in str(err.value)


def test_failing_cred_helper_reports_its_stderr(user):
    user.add_helper("broken", "#!/bin/sh\necho 'the keyring is locked' >&2\nexit 3\n")
    write_json(user.runtime_file, {"credHelpers": {"quay.io": "broken"}})
    with pytest.raises(CredentialHelperError) as err:
        lookup(user, "quay.io")
    message = str(err.value)
    assert "docker-credential-broken" in message
    assert "the keyring is locked" in message
    assert "exit code 3" in message
    assert err.value.helper == "broken"


def test_cred_helper_printing_garbage_does_not_leak_it(user):
    user.add_helper("garbage", f"#!/bin/sh\necho 'Username=me Secret={SECRET}'\n")
    write_json(user.runtime_file, {"credHelpers": {"quay.io": "garbage"}})
    with pytest.raises(CredentialHelperError) as err:
        lookup(user, "quay.io")
    assert "docker-credential-garbage" in str(err.value)
    assert SECRET not in str(err.value)


def test_hanging_cred_helper_times_out(user, monkeypatch):
    monkeypatch.setattr(credmod, "HELPER_TIMEOUT", 0.5)
    user.add_helper("slow", "#!/bin/sh\nexec sleep 30\n")
    write_json(user.runtime_file, {"credHelpers": {"quay.io": "slow"}})
    started = time.monotonic()
    with pytest.raises(CredentialHelperError, match="did not answer within 0.5 s"):
        lookup(user, "quay.io")
    assert time.monotonic() - started < 5


def test_creds_store_is_the_default_helper(user):
    user.add_store_helper(contents={"quay.io": ["stored", "pw"]})
    write_json(user.docker_file, {"auths": {"quay.io": {}, "ghcr.io": entry("inline")},
                                  "credsStore": "kilntest"})
    assert lookup(user, "quay.io").username == "stored"
    # An inline entry (as podman writes even next to a credsStore) is used as it is.
    assert lookup(user, "ghcr.io").username == "inline"
    assert lookup(user, "elsewhere.example") is None


def test_creds_store_missing_from_path_only_matters_for_hosts_it_holds(user):
    write_json(user.docker_file, {"auths": {"quay.io": {}}, "credsStore": "desktop"})
    assert lookup(user, "docker.io", "library/busybox") is None
    with pytest.raises(CredentialHelperError, match="docker-credential-desktop"):
        lookup(user, "quay.io")


# --- login: storing -------------------------------------------------------------------------


def test_store_creates_a_private_file_in_a_private_dir(user):
    path = store_credentials("localhost:5000", Credentials("alice", SECRET), env=user.env)
    assert path == user.runtime_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    data = json.loads(path.read_text())
    assert data == {"auths": {"localhost:5000": {"auth": b64("alice:" + SECRET)}}}
    assert sorted(os.listdir(path.parent)) == ["auth.json"]
    found = lookup(user, "localhost:5000")
    assert (found.username, found.password) == ("alice", SECRET)


def test_store_makes_the_dir_private_whatever_the_umask(user):
    old = os.umask(0o277)
    try:
        path = store_credentials("quay.io", Credentials("a", "b"), env=user.env)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_store_keeps_everything_else_in_the_file(user):
    original = {
        "auths": {"quay.io": entry("quay"), "localhost:5000": {"auth": b64("old:old"),
                                                               "identitytoken": "stale"}},
        "credHelpers": {"gcr.io": "gcloud"},
        "HttpHeaders": {"User-Agent": "x"},
        "psFormat": "table {{.ID}}",
    }
    write_json(user.runtime_file, original)
    user.runtime_file.chmod(0o644)
    store_credentials("localhost:5000", Credentials("alice", "new"), env=user.env)
    data = json.loads(user.runtime_file.read_text())
    assert data["auths"]["quay.io"] == original["auths"]["quay.io"]
    assert data["auths"]["localhost:5000"] == {"auth": b64("alice:new")}  # no stale token
    for key in ("credHelpers", "HttpHeaders", "psFormat"):
        assert data[key] == original[key]
    assert stat.S_IMODE(user.runtime_file.stat().st_mode) == 0o600
    assert sorted(os.listdir(user.runtime_file.parent)) == ["auth.json"]


def test_store_identity_token_and_docker_hub_key(user):
    store_credentials("index.docker.io", Credentials("alice", "", identity_token="refresh-1"),
                      env=user.env)
    data = json.loads(user.runtime_file.read_text())
    assert data["auths"] == {"docker.io": {"auth": b64("alice:"), "identitytoken": "refresh-1"}}
    assert lookup(user, "docker.io", "library/busybox").identity_token == "refresh-1"


def test_store_namespace_key(user):
    store_credentials("quay.io/team", Credentials("team", "pw"), env=user.env)
    store_credentials("quay.io", Credentials("host", "pw"), env=user.env)
    assert lookup(user, "quay.io", "team/app").username == "team"
    assert lookup(user, "quay.io", "other/app").username == "host"


def test_store_goes_to_registry_auth_file_or_authfile(user, tmp_path):
    env = dict(user.env, REGISTRY_AUTH_FILE=str(tmp_path / "env" / "auth.json"))
    assert store_credentials("quay.io", Credentials("a", "b"), env=env) == \
        tmp_path / "env" / "auth.json"
    explicit = tmp_path / "explicit" / "deeper" / "auth.json"
    assert store_credentials("quay.io", Credentials("a", "b"), env=env, authfile=explicit) == \
        explicit
    assert stat.S_IMODE(explicit.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(explicit.parent.parent.stat().st_mode) == 0o700
    assert not user.runtime_file.exists()


def test_store_through_a_symlink_keeps_the_symlink(user, tmp_path):
    real = write_json(tmp_path / "dotfiles" / "auth.json", {"auths": {}})
    user.runtime_file.parent.mkdir(parents=True)
    user.runtime_file.symlink_to(real)
    store_credentials("quay.io", Credentials("a", "b"), env=user.env)
    assert user.runtime_file.is_symlink()
    assert "quay.io" in json.loads(real.read_text())["auths"]


def test_store_into_a_malformed_file_changes_nothing(user):
    user.runtime_file.parent.mkdir(parents=True)
    user.runtime_file.write_text('{"auths": ')
    with pytest.raises(CredentialsError, match=str(user.runtime_file)):
        store_credentials("quay.io", Credentials("a", SECRET), env=user.env)
    assert user.runtime_file.read_text() == '{"auths": '
    assert os.listdir(user.runtime_file.parent) == ["auth.json"]


def test_store_with_a_cred_helper_leaves_the_file_alone(user):
    user.add_store_helper(contents={})
    write_json(user.runtime_file, {"auths": {}, "credHelpers": {"docker.io": "kilntest",
                                                                "quay.io": "kilntest"}})
    before = user.runtime_file.read_bytes()
    store_credentials("docker.io", Credentials("alice", SECRET), env=user.env)
    store_credentials("quay.io", Credentials("", "", identity_token="refresh-q"), env=user.env)
    assert user.runtime_file.read_bytes() == before
    assert user.helper_contents() == {"https://index.docker.io/v1/": ["alice", SECRET],
                                      "quay.io": ["<token>", "refresh-q"]}
    assert lookup(user, "docker.io", "library/busybox").password == SECRET
    with pytest.raises(CredentialsError, match="namespace"):
        store_credentials("quay.io/team", Credentials("a", "b"), env=user.env)


def test_store_with_a_failing_helper_names_it_and_hides_the_secret(user):
    user.add_helper("echoer", "#!/bin/sh\ncat >&2\nexit 1\n")
    write_json(user.runtime_file, {"credHelpers": {"quay.io": "echoer"}})
    with pytest.raises(CredentialHelperError) as err:
        store_credentials("quay.io", Credentials("alice", SECRET), env=user.env)
    assert "docker-credential-echoer" in str(err.value)
    assert "alice" in str(err.value)  # the helper's stderr is shown ...
    assert SECRET not in str(err.value)  # ... with the secret blanked


# --- logout ----------------------------------------------------------------------------------


def test_logout_one_registry(user):
    write_json(user.runtime_file, {
        "auths": {"quay.io": entry("q"), "https://quay.io/v1/": entry("q2"),
                  "quay.io/team": entry("team"), "ghcr.io": entry("g")},
        "other": [1, 2],
    })
    assert remove_credentials("quay.io", env=user.env) is True
    data = json.loads(user.runtime_file.read_text())
    assert data == {"auths": {"quay.io/team": entry("team"), "ghcr.io": entry("g")},
                    "other": [1, 2]}
    assert remove_credentials("quay.io", env=user.env) is False
    assert remove_credentials("quay.io/team", env=user.env) is True
    assert lookup(user, "quay.io", "team/app") is None
    assert lookup(user, "ghcr.io").username == "g"
    assert stat.S_IMODE(user.runtime_file.stat().st_mode) == 0o600


def test_logout_without_a_file(user):
    assert remove_credentials("quay.io", env=user.env) is False
    remove_all_credentials(env=user.env)
    assert not user.runtime_file.exists()


def test_logout_docker_hub_by_any_alias(user, tmp_path):
    authfile = write_json(tmp_path / "a.json", {"auths": {
        "https://index.docker.io/v1/": entry("a"), "docker.io": entry("b")}})
    assert remove_credentials("docker.io", authfile=authfile, env=user.env)
    assert json.loads(authfile.read_text())["auths"] == {}


def test_logout_erases_from_the_helper(user):
    user.add_store_helper(contents={"quay.io": ["q", "pw"], "ghcr.io": ["g", "pw"]})
    write_json(user.runtime_file, {"credHelpers": {"quay.io": "kilntest",
                                                   "ghcr.io": "kilntest"}})
    assert remove_credentials("quay.io", env=user.env) is True
    assert user.helper_contents() == {"ghcr.io": ["g", "pw"]}
    assert remove_credentials("quay.io", env=user.env) is False


def test_logout_all_empties_auths_and_keeps_the_rest(user):
    user.add_store_helper(contents={"gcr.io": ["g", "pw"], "other.example": ["o", "pw"]})
    write_json(user.runtime_file, {
        "auths": {"quay.io": entry("q"), "docker.io": entry("d")},
        "credHelpers": {"gcr.io": "kilntest"},
        "HttpHeaders": {"X": "y"},
    })
    remove_all_credentials(env=user.env)
    data = json.loads(user.runtime_file.read_text())
    assert data == {"auths": {}, "credHelpers": {"gcr.io": "kilntest"},
                    "HttpHeaders": {"X": "y"}}
    assert user.helper_contents() == {"other.example": ["o", "pw"]}
    assert lookup(user, "quay.io") is None
    assert sorted(os.listdir(user.runtime_file.parent)) == ["auth.json"]


# --- the same answers as skopeo ----------------------------------------------------------------


def _skopeo_login_name(user: Home, registry: str) -> str | None:
    proc = subprocess.run(["skopeo", "login", "--get-login", registry], env=user.env,
                          capture_output=True, text=True, timeout=60)
    return proc.stdout.strip() if proc.returncode == 0 else None


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_lookup_agrees_with_skopeo(user):
    user.add_store_helper(contents={"helped.example": ["helped", "pw"]})
    write_json(user.runtime_file, {"auths": {"quay.io": {}}})
    write_json(user.config_file, {"auths": {"ghcr.io": entry("config")}})
    write_json(user.docker_file, {
        "auths": {"https://index.docker.io/v1/": entry("hub"), "quay.io": entry("dq"),
                  "https://localhost:5000/v2/": entry("url"), "ghcr.io": entry("late"),
                  "quay.io/team/app": entry("app")},
        "credHelpers": {"helped.example": "kilntest"},
    })
    # Written by kiln, read by skopeo.
    store_credentials("written.example:5000", Credentials("kiln", "pw"), env=user.env)
    cases = ["docker.io", "quay.io", "localhost:5000", "ghcr.io", "helped.example",
             "written.example:5000", "quay.io/team/app", "quay.io/team", "nowhere.example"]
    for case in cases:
        registry, _, repository = case.partition("/")
        ours = find_credentials(registry, repository or None, env=user.env)
        assert (ours.username if ours else None) == _skopeo_login_name(user, case), case
