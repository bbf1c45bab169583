"""Registry credentials: where they come from and where `kiln login` puts them.

Reading follows podman/skopeo (containers-auth.json(5)) with docker's extras:

1. ``--creds user:pass`` wins outright.
2. The primary file: ``--authfile``, else ``$REGISTRY_AUTH_FILE``, else
   ``$XDG_RUNTIME_DIR/containers/auth.json`` (``/run/containers/<uid>/auth.json``
   without XDG_RUNTIME_DIR).
3. ``$XDG_CONFIG_HOME/containers/auth.json``, ``$DOCKER_CONFIG/config.json`` (or
   ``~/.docker/config.json``), and the legacy ``~/.dockercfg``.

The first file with credentials for the registry wins. Within a file, a
``credHelpers`` entry for the host decides alone; then the most specific ``auths``
key (``host/ns/repo`` > ``host/ns`` > ``host``); then the ``credsStore`` helper.
The installed skopeo 1.9 behaves the same way for files 2-3 (an explicit authfile
replaces only the runtime file; the others still follow).

Writing goes to the primary file only and keeps every key kiln does not own.
No message ever includes a password, a token or a helper's secret.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from store.errors import KilnError
from store.fsutil import atomic_write

HELPER_TIMEOUT = 30.0
"""Seconds a docker-credential-* helper may take before kiln gives up on it."""

DOCKER_HUB = "docker.io"
DOCKER_HUB_HELPER_URL = "https://index.docker.io/v1/"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_HELPER_NOT_FOUND = "credentials not found in native keychain"
_TOKEN_USERNAME = "<token>"


class CredentialsError(KilnError):
    """Credentials cannot be read, parsed or stored."""


class MissingPasswordError(CredentialsError):
    """``--creds`` named a user but no password; the CLI prompts for one."""

    def __init__(self, username: str):
        super().__init__(
            f"--creds {username!r} has no password: use --creds USERNAME:PASSWORD "
            "or enter the password when asked"
        )
        self.username = username


class CredentialHelperError(CredentialsError):
    """A docker-credential-* helper is missing, failed, hung or answered garbage."""

    def __init__(self, message: str, *, helper: str, not_on_path: bool = False):
        super().__init__(message)
        self.helper = helper
        self.not_on_path = not_on_path


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    identity_token: str | None = None
    """An OAuth2 refresh token (docker's ``identitytoken``); use it instead of the password."""
    source: str | None = field(default=None, compare=False)
    """Where they came from, for messages: ``--creds``, a file, or a helper and its file."""

    def __repr__(self) -> str:
        shown = [f"username={self.username!r}"]
        shown.append("password=" + ("'***'" if self.password else "''"))
        if self.identity_token is not None:
            shown.append("identity_token='***'")
        if self.source is not None:
            shown.append(f"source={self.source!r}")
        return "Credentials(" + ", ".join(shown) + ")"

    __str__ = __repr__


# --- --creds ---------------------------------------------------------------------------------


def split_creds(text: str) -> tuple[str, str | None]:
    """``user:pass`` -> (user, pass); ``user`` -> (user, None). Splits at the first ':'."""
    if not text:
        raise CredentialsError("--creds is empty: expected USERNAME[:PASSWORD]")
    username, colon, password = text.partition(":")
    if not username:
        raise CredentialsError("--creds has an empty username: expected USERNAME[:PASSWORD]")
    return username, (password if colon else None)


def creds_need_password(text: str) -> bool:
    """Whether ``--creds`` gave only a username, so the password must be prompted for."""
    return split_creds(text)[1] is None


def parse_creds(text: str) -> Credentials:
    username, password = split_creds(text)
    if password is None:
        raise MissingPasswordError(username)
    return Credentials(username, password, source="--creds")


# --- where the files are ------------------------------------------------------------------


@dataclass(frozen=True)
class _AuthFile:
    path: Path
    legacy: bool = False  # ~/.dockercfg: the top level is the auths map itself
    explicit: bool = False  # named by --authfile: must exist


def _environ(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _home(env: Mapping[str, str] | None) -> Path | None:
    home = _environ(env).get("HOME")
    if home:
        return Path(home)
    if env is None:
        return Path(os.path.expanduser("~"))
    return None


def _runtime_auth_file(env: Mapping[str, str]) -> Path:
    runtime_dir = env.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return Path(runtime_dir) / "containers" / "auth.json"
    uid = os.environ.get("KILN_ROOTLESS_UID") or str(os.getuid())  # the host uid, as podman
    return Path("/run/containers") / uid / "auth.json"


def login_file(env: Mapping[str, str] | None = None, authfile: str | os.PathLike | None = None
               ) -> Path:
    """The file `kiln login`/`logout` write: podman's rule."""
    environ = _environ(env)
    if authfile:
        return Path(authfile)
    if environ.get("REGISTRY_AUTH_FILE"):
        return Path(environ["REGISTRY_AUTH_FILE"])
    return _runtime_auth_file(environ)


def _auth_files(env: Mapping[str, str] | None, authfile: str | os.PathLike | None
                ) -> list[_AuthFile]:
    environ = _environ(env)
    files = [_AuthFile(login_file(env, authfile), explicit=bool(authfile))]
    home = _home(env)
    config_home = environ.get("XDG_CONFIG_HOME")
    if config_home:
        files.append(_AuthFile(Path(config_home) / "containers" / "auth.json"))
    elif home is not None:
        files.append(_AuthFile(home / ".config" / "containers" / "auth.json"))
    if environ.get("DOCKER_CONFIG"):
        files.append(_AuthFile(Path(environ["DOCKER_CONFIG"]) / "config.json"))
    elif home is not None:
        files.append(_AuthFile(home / ".docker" / "config.json"))
    if home is not None:
        files.append(_AuthFile(home / ".dockercfg", legacy=True))
    seen: set[Path] = set()
    unique = []
    for f in files:
        if f.path not in seen:
            seen.add(f.path)
            unique.append(f)
    return unique


def auth_file_candidates(env: Mapping[str, str] | None = None,
                         authfile: str | os.PathLike | None = None) -> list[Path]:
    """The files searched for credentials, in order (whether they exist or not)."""
    return [f.path for f in _auth_files(env, authfile)]


# --- keys ----------------------------------------------------------------------------------


def normalize_registry(host: str) -> str:
    """Compare hosts this way: lower case, and every Docker Hub alias is ``docker.io``."""
    host = host.lower()
    return DOCKER_HUB if host in _HUB_ALIASES else host


@dataclass(frozen=True)
class _Key:
    host: str  # normalised
    namespace: str  # "" for a whole registry
    verbatim: bool  # spelled as plain host[/ns] with the host exactly as asked, not a URL/alias


def _parse_key(key: str, legacy: bool = False, *, asked: str | None = None) -> _Key:
    stripped = key
    is_url = False
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            stripped, is_url = key[len(scheme):], True
            break
    host, _, path = stripped.partition("/")
    # A URL's path is an API version (docker's https://index.docker.io/v1/), not a namespace.
    namespace = "" if (is_url or legacy) else path.strip("/")
    verbatim = not is_url and asked is not None and host in (asked, normalize_registry(asked))
    return _Key(normalize_registry(host), namespace, verbatim)


def _split_target(target: str) -> tuple[str, str]:
    """``host[/namespace]`` as given to store/remove -> (normalised host, namespace)."""
    host, _, namespace = target.partition("/")
    if not host:
        raise CredentialsError(f"invalid registry {target!r}")
    return normalize_registry(host), namespace.strip("/")


def _storage_key(target: str) -> str:
    host, namespace = _split_target(target)
    return f"{host}/{namespace}" if namespace else host


def _helper_server_urls(host: str) -> list[str]:
    """What to hand a helper: docker's Hub URL first, then the bare name podman uses."""
    return [DOCKER_HUB_HELPER_URL, DOCKER_HUB] if host == DOCKER_HUB else [host]


# --- reading files -----------------------------------------------------------------------


def _read_json_file(path: Path, *, explicit: bool = False) -> dict | None:
    """The parsed top-level object, or None when the file does not exist."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise CredentialsError(f"auth file {path} does not exist") from None
        return None
    except IsADirectoryError:
        raise CredentialsError(f"auth file {path} is a directory") from None
    except OSError as e:
        raise CredentialsError(f"cannot read auth file {path}: {e.strerror}") from None
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise CredentialsError(f"auth file {path} is not UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        # JSONDecodeError's own text has a position but never the file's content.
        raise CredentialsError(f"auth file {path} is not valid JSON: {e.msg} "
                               f"(line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise CredentialsError(f"auth file {path} must hold a JSON object")
    return data


@dataclass
class _FileContents:
    path: Path
    auths: dict
    cred_helpers: dict[str, str]
    creds_store: str | None
    legacy: bool


def _load(auth_file: _AuthFile) -> _FileContents | None:
    data = _read_json_file(auth_file.path, explicit=auth_file.explicit)
    if data is None:
        return None
    return _parse_contents(auth_file.path, data, auth_file.legacy)


def _parse_contents(path: Path, data: dict, legacy: bool = False) -> _FileContents:
    if legacy:
        return _FileContents(path, data, {}, None, True)
    auths = data.get("auths") or {}
    if not isinstance(auths, dict):
        raise CredentialsError(f"auth file {path}: \"auths\" must be a JSON object")
    helpers = data.get("credHelpers") or {}
    if not isinstance(helpers, dict) or not all(isinstance(v, str) for v in helpers.values()):
        raise CredentialsError(
            f"auth file {path}: \"credHelpers\" must map registries to helper names")
    store = data.get("credsStore") or None
    if store is not None and not isinstance(store, str):
        raise CredentialsError(f"auth file {path}: \"credsStore\" must be a helper name")
    return _FileContents(path, auths, helpers, store, False)


def _decode_entry(path: Path, key: str, value: object) -> Credentials | None:
    """An ``auths`` value as credentials; None for an empty (helper placeholder) entry."""
    where = f"auth file {path}: auths entry {key!r}"
    if not isinstance(value, dict):
        raise CredentialsError(f"{where} must be a JSON object")
    for name in ("auth", "username", "password", "identitytoken"):
        if value.get(name) is not None and not isinstance(value[name], str):
            raise CredentialsError(f"{where}: {name!r} must be a string")
    auth = (value.get("auth") or "").strip()
    token = value.get("identitytoken") or None
    if auth:
        padded = auth + "=" * (-len(auth) % 4)
        try:
            text = base64.b64decode(padded, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise CredentialsError(f"{where}: \"auth\" is not valid base64 of "
                                   f"\"username:password\"") from None
        username, colon, password = text.partition(":")
        if not colon:
            raise CredentialsError(f"{where}: \"auth\" does not decode to "
                                   f"\"username:password\" (no ':' in it)")
        password = password.strip("\x00")
    elif value.get("username"):
        username, password = value["username"], value.get("password") or ""
    elif token:
        username, password = "", ""
    else:
        return None
    return Credentials(username, password, token, source=str(path))


def _matching_entries(contents: _FileContents, registry: str, repository: str | None
                      ) -> list[str]:
    """Keys of ``auths`` that apply to registry/repository, most specific first."""
    want = normalize_registry(registry)
    repository = (repository or "").strip("/")
    ranked = []
    for key in contents.auths:
        parsed = _parse_key(key, contents.legacy, asked=registry)
        if parsed.host != want:
            continue
        ns = parsed.namespace
        if ns and not (repository == ns or repository.startswith(ns + "/")):
            continue
        depth = ns.count("/") + 1 if ns else 0
        ranked.append(((depth, parsed.verbatim), key))
    ranked.sort(key=lambda item: item[0], reverse=True)
    return [key for _, key in ranked]


def _helper_for(helpers: Mapping[str, str], registry: str) -> tuple[str, str] | None:
    """(key, helper) of the credHelpers entry for this registry's host, exact spelling first."""
    want = normalize_registry(registry)
    found = None
    for key, helper in helpers.items():
        parsed = _parse_key(key, asked=registry)
        if parsed.host == want and not parsed.namespace:
            if parsed.verbatim:
                return key, helper
            found = found or (key, helper)
    return found


# --- credential helpers --------------------------------------------------------------------


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _helper_executable(helper: str, env: Mapping[str, str] | None, configured_in: Path) -> str:
    program = f"docker-credential-{helper}"
    if not helper or "/" in helper or helper != helper.strip():
        raise CredentialHelperError(
            f"auth file {configured_in}: invalid credential helper name {helper!r}", helper=helper)
    path = _environ(env).get("PATH", os.defpath)
    found = shutil.which(program, path=path)
    if found is None:
        raise CredentialHelperError(
            f"credential helper {program} (configured in {configured_in}) is not on PATH",
            helper=helper, not_on_path=True)
    return found


def _run_helper(helper: str, action: str, stdin: str, *, env: Mapping[str, str] | None,
                configured_in: Path, server_url: str, secrets: Iterable[str] = ()
                ) -> str | None:
    """The helper's stdout; None when it says it has no credentials for server_url."""
    program = f"docker-credential-{helper}"
    executable = _helper_executable(helper, env, configured_in)
    try:
        proc = subprocess.run([executable, action], input=stdin.encode(), capture_output=True,
                              timeout=HELPER_TIMEOUT, env=None if env is None else dict(env),
                              check=False)
    except subprocess.TimeoutExpired:
        raise CredentialHelperError(
            f"credential helper {program} {action} for {server_url} did not answer within "
            f"{HELPER_TIMEOUT:g} s (configured in {configured_in})", helper=helper) from None
    except OSError as e:
        raise CredentialHelperError(
            f"credential helper {program} (configured in {configured_in}) could not be run: "
            f"{e.strerror}", helper=helper) from None
    out = proc.stdout.decode("utf-8", "replace").strip()
    err = proc.stderr.decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        if _HELPER_NOT_FOUND in out or _HELPER_NOT_FOUND in err:
            return None
        # Helpers of docker-credential-helpers print their error on stdout.
        detail = _redact("; ".join(t for t in (err, out) if t), secrets) or "no message"
        raise CredentialHelperError(
            f"credential helper {program} {action} for {server_url} failed with exit code "
            f"{proc.returncode} (configured in {configured_in}): {detail}", helper=helper)
    return out


def _helper_get(helper: str, registry: str, *, env: Mapping[str, str] | None,
                configured_in: Path) -> Credentials | None:
    program = f"docker-credential-{helper}"
    for url in _helper_server_urls(normalize_registry(registry)):
        out = _run_helper(helper, "get", url, env=env, configured_in=configured_in,
                          server_url=url)
        if out is None:
            continue
        try:
            answer = json.loads(out)
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or not all(
                isinstance(answer.get(k, ""), str) for k in ("Username", "Secret")):
            # Not echoed: whatever it printed may hold the secret.
            raise CredentialHelperError(
                f"credential helper {program} get for {url} did not print the expected JSON "
                f"(configured in {configured_in})", helper=helper)
        username, secret = answer.get("Username", ""), answer.get("Secret", "")
        if not username and not secret:
            continue
        source = f"{program} (configured in {configured_in})"
        if username == _TOKEN_USERNAME:
            return Credentials("", "", secret, source=source)
        return Credentials(username, secret, source=source)
    return None


def _helper_store(helper: str, host: str, creds: Credentials, *, env: Mapping[str, str] | None,
                  configured_in: Path) -> None:
    url = _helper_server_urls(host)[0]
    if creds.identity_token:
        username, secret = _TOKEN_USERNAME, creds.identity_token
    else:
        username, secret = creds.username, creds.password
    payload = json.dumps({"ServerURL": url, "Username": username, "Secret": secret})
    _run_helper(helper, "store", payload, env=env, configured_in=configured_in, server_url=url,
                secrets=(secret, creds.password, creds.identity_token or ""))


def _helper_erase(helper: str, host: str, *, env: Mapping[str, str] | None,
                  configured_in: Path) -> bool:
    erased = False
    for url in _helper_server_urls(host):
        if _run_helper(helper, "erase", url, env=env, configured_in=configured_in,
                       server_url=url) is not None:
            erased = True
    return erased


# --- lookup --------------------------------------------------------------------------------


def _lookup_in_file(contents: _FileContents, registry: str, repository: str | None,
                    env: Mapping[str, str] | None) -> Credentials | None:
    helper = _helper_for(contents.cred_helpers, registry)
    if helper is not None:
        return _helper_get(helper[1], registry, env=env, configured_in=contents.path)
    keys = _matching_entries(contents, registry, repository)
    for key in keys:
        creds = _decode_entry(contents.path, key, contents.auths[key])
        if creds is not None:
            return creds
    if contents.creds_store:
        try:
            return _helper_get(contents.creds_store, registry, env=env,
                               configured_in=contents.path)
        except CredentialHelperError as e:
            # A config.json copied from another machine ("credsStore": "desktop") must not
            # break anonymous pulls; it matters only when the file says this host is in it.
            if e.not_on_path and not keys:
                return None
            raise
    return None


def find_credentials(registry: str, repository: str | None = None, *, creds: str | None = None,
                     authfile: str | os.PathLike | None = None,
                     env: Mapping[str, str] | None = None) -> Credentials | None:
    """Credentials for ``registry`` (as store.reference normalises it), or None for anonymous.

    ``repository`` is the path inside the registry (``library/busybox``); with it,
    namespace keys such as ``quay.io/team`` apply. ``creds`` is ``--creds`` verbatim.
    """
    if creds is not None:
        return parse_creds(creds)
    for auth_file in _auth_files(env, authfile):
        contents = _load(auth_file)
        if contents is None:
            continue
        found = _lookup_in_file(contents, registry, repository, env)
        if found is not None:
            return found
    return None


# --- login / logout ------------------------------------------------------------------------


def _load_for_update(path: Path) -> tuple[dict, _FileContents]:
    data = _read_json_file(path)
    if data is None:
        data = {}
    return data, _parse_contents(path, data)


def _make_private_dirs(directory: Path) -> None:
    missing = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue
        except OSError as e:
            raise CredentialsError(f"cannot create directory {d}: {e.strerror}") from None
        os.chmod(d, 0o700)


def _write_auth_file(path: Path, data: dict) -> None:
    target = Path(os.path.realpath(path))  # keep a symlinked auth file a symlink
    _make_private_dirs(target.parent)
    text = json.dumps(data, indent="\t", ensure_ascii=False) + "\n"
    try:
        atomic_write(target, text.encode("utf-8"), mode=0o600)
    except OSError as e:
        raise CredentialsError(f"cannot write auth file {path}: {e.strerror}") from None


def _store_helper(contents: _FileContents, host: str) -> str | None:
    helper = _helper_for(contents.cred_helpers, host)
    if helper is not None:
        return helper[1]
    return contents.creds_store


def store_credentials(registry: str, creds: Credentials, *,
                      authfile: str | os.PathLike | None = None,
                      env: Mapping[str, str] | None = None) -> Path:
    """Save creds for ``registry`` (``host``, or ``host/namespace`` as podman allows).

    Goes to the helper the login file configures for the host (credHelpers, then
    credsStore), else into the file's ``auths``. Returns the login file's path.
    """
    path = login_file(env, authfile)
    key = _storage_key(registry)
    host, namespace = _split_target(registry)
    data, contents = _load_for_update(path)
    if namespace and _helper_for(contents.cred_helpers, host) is not None:
        # Lookups for this host go to its helper alone: an inline namespace entry would be dead.
        raise CredentialsError(
            f"auth file {path} sends {host} to a credential helper (credHelpers), "
            f"which cannot hold credentials for the namespace {key!r}")
    helper = None if namespace else _store_helper(contents, host)
    if helper is not None:
        _helper_store(helper, host, creds, env=env, configured_in=path)
        return path
    auths = data.get("auths")
    if not isinstance(auths, dict):
        auths = data["auths"] = {}
    userpass = f"{creds.username}:{creds.password}".encode()
    entry = {"auth": base64.b64encode(userpass).decode("ascii")}
    if creds.identity_token:
        entry["identitytoken"] = creds.identity_token
    auths[key] = entry  # replaces the whole entry: no stale identitytoken survives
    _write_auth_file(path, data)
    return path


def _keys_for_target(auths: Mapping[str, object], host: str, namespace: str) -> list[str]:
    keys = []
    for key in auths:
        parsed = _parse_key(key)
        if parsed.host == host and parsed.namespace == namespace:
            keys.append(key)
    return keys


def remove_credentials(registry: str, *, authfile: str | os.PathLike | None = None,
                       env: Mapping[str, str] | None = None) -> bool:
    """Forget ``registry`` (``host`` or ``host/namespace``) in the login file and its helper.

    A bare host also removes its URL-form and Docker Hub alias keys. Returns whether
    anything was removed.
    """
    path = login_file(env, authfile)
    if not path.exists():
        return False
    host, namespace = _split_target(registry)
    data, contents = _load_for_update(path)
    removed = False
    if not namespace:
        helper = _helper_for(contents.cred_helpers, host)
        if helper is not None:
            removed = _helper_erase(helper[1], host, env=env, configured_in=path)
        elif contents.creds_store:
            try:
                removed = _helper_erase(contents.creds_store, host, env=env, configured_in=path)
            except CredentialHelperError as e:
                if not e.not_on_path:
                    raise
    keys = _keys_for_target(contents.auths, host, namespace)
    if keys:
        for key in keys:
            del data["auths"][key]
        _write_auth_file(path, data)
        removed = True
    return removed


def remove_all_credentials(*, authfile: str | os.PathLike | None = None,
                           env: Mapping[str, str] | None = None) -> None:
    """`logout --all`: empty ``auths`` and erase what its helpers hold; keep every other key."""
    path = login_file(env, authfile)
    if not path.exists():
        return
    data, contents = _load_for_update(path)
    to_erase = [(helper, _parse_key(key).host) for key, helper in contents.cred_helpers.items()]
    if contents.creds_store:
        hosts = {_parse_key(key).host for key in contents.auths}
        to_erase += [(contents.creds_store, host) for host in sorted(hosts)
                     if _helper_for(contents.cred_helpers, host) is None]
    if contents.auths or "auths" in data:
        data["auths"] = {}
        _write_auth_file(path, data)
    failures = []
    for helper, host in to_erase:
        try:
            _helper_erase(helper, host, env=env, configured_in=path)
        except CredentialHelperError as e:
            if not (e.not_on_path and helper == contents.creds_store):
                failures.append(str(e))
    if failures:
        raise CredentialsError("; ".join(failures))
