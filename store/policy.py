"""Signature policy in containers-policy.json(5) format, for kiln's verify-on-pull.

The file podman, buildah and skopeo read: a global ``default`` list of requirements and,
per transport, lists keyed by scope. kiln pulls only over the ``docker`` transport, so only
``transports.docker`` scopes (and its ``""`` transport default) are ever looked up; other
transports are parsed and validated, never used.

kiln does NOT enforce ``$HOME/.config/containers/policy.json`` or
``/etc/containers/policy.json`` on its own: a policy applies only when the user asks for one
(``default_policy_path`` finds the file containers/image would use, for that case).

Parsing is as strict as containers/image's: unknown or duplicated fields, wrong types and
empty requirement lists refuse the whole file, naming the file and the JSON path.
Requirements kiln cannot check (GPG ``signedBy``, ``signedBaseLayer``, ``sigstoreSigned``
with Fulcio, PKI or Rekor) are validated too, but only refused when a pull actually lands in
their scope, so a system policy that pins Red Hat registries to GPG keys does not stop a pull
from elsewhere. Key files are read at that point as well (containers/image also reads them at
verification time), relative ``keyPath`` values against the current directory, as
containers/image does (it passes them to os.ReadFile unchanged).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from store.errors import KilnError, ReferenceError_
from store.reference import _DOMAIN, _PATH, Reference, parse_reference

USER_POLICY_PATH = Path(".config/containers/policy.json")  # under $HOME
SYSTEM_POLICY_PATH = Path("/etc/containers/policy.json")
DOCKER_TRANSPORT = "docker"
KEY_BASED_ONLY = "kiln verifies key-based sigstore signatures only"


class PolicyError(KilnError):
    """A policy file is invalid, or asks for a check kiln cannot do; names file and JSON path."""


@dataclass(frozen=True)
class AcceptAnything:
    """``insecureAcceptAnything``: no signature needed (other requirements still apply)."""


@dataclass(frozen=True)
class Reject:
    """``reject``: refuse every image in the scope."""


_IDENTITY_FIELDS = {
    "matchExact": (),
    "matchRepoDigestOrExact": (),
    "matchRepository": (),
    "exactReference": ("dockerReference",),
    "exactRepository": ("dockerRepository",),
    "remapIdentity": ("prefix", "signedPrefix"),
}
_IDENTITY_ATTRS = {
    "dockerReference": "docker_reference",
    "dockerRepository": "docker_repository",
    "prefix": "prefix",
    "signedPrefix": "signed_prefix",
}


@dataclass(frozen=True)
class SignedIdentity:
    """``signedIdentity``: which identity a signature's payload may claim for an image.

    ``payload_reference`` is the ``docker-reference`` a signature signs;
    ``image_reference`` is what the user pulls (a missing tag means ``latest``, as in the
    docker transport). Unparsable references never match.
    """

    type: str = "matchRepoDigestOrExact"
    docker_reference: str | None = None
    docker_repository: str | None = None
    prefix: str | None = None
    signed_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.type not in _IDENTITY_FIELDS:
            raise ValueError(f"unknown signedIdentity type {self.type!r}")
        for json_name in _IDENTITY_FIELDS[self.type]:
            if getattr(self, _IDENTITY_ATTRS[json_name]) is None:
                raise ValueError(f"signedIdentity {self.type!r} needs {json_name!r}")

    def matches(self, payload_reference: str, image_reference: str) -> bool:
        signed = _parse_or_none(payload_reference, default_tag=False)
        if signed is None:
            return False
        if self.type == "exactReference":
            wanted = _parse_or_none(self.docker_reference, default_tag=False)
            return (wanted is not None and not _name_only(wanted) and not _name_only(signed)
                    and str(signed) == str(wanted))
        if self.type == "exactRepository":
            wanted = _parse_or_none(self.docker_repository, default_tag=False)
            return wanted is not None and signed.name == wanted.name
        intended = _parse_or_none(image_reference, default_tag=True)
        if intended is None:
            return False
        if self.type == "matchExact":
            return not _name_only(signed) and str(signed) == str(intended)
        if self.type == "matchRepository":
            return signed.name == intended.name
        if self.type == "remapIdentity":
            intended = self._remapped(intended)
            if intended is None:
                return False
        return match_repo_digest_or_exact(signed, intended)

    def _remapped(self, intended: Reference) -> Reference | None:
        """``intended`` with ``prefix`` swapped for ``signed_prefix``; None if that is invalid."""
        assert self.prefix is not None and self.signed_prefix is not None
        name = intended.name
        if not (name == self.prefix or name.startswith(self.prefix + "/")):
            return intended
        rewritten = self.signed_prefix + str(intended)[len(self.prefix):]
        remapped = _parse_or_none(rewritten, default_tag=False)
        # containers/image re-parses without normalising: "docker.io/busybox" is not a name.
        if remapped is None or str(remapped) != rewritten:
            return None
        return remapped


def match_repo_digest_or_exact(signed: Reference, intended: Reference) -> bool:
    """containers/image's default rule: a tagged image needs exactly its reference signed;
    an image pulled by digest needs any tagged or digested reference of its repository
    (the digest itself is checked against the manifest, not here)."""
    from store.signing import match_repo_digest_or_exact as by_text

    return by_text(str(signed), str(intended))


@dataclass(frozen=True)
class SigstoreSigned:
    """``sigstoreSigned`` with public keys: one signature by any of ``keys`` (PEM) whose
    payload identity ``identity`` accepts must exist. ``origin`` says where in which policy
    file it came from, for messages."""

    keys: tuple[bytes, ...]
    identity: SignedIdentity = SignedIdentity()
    origin: str = field(default="", compare=False)


Requirement = AcceptAnything | Reject | SigstoreSigned


@dataclass(frozen=True)
class _SigstoreKeys:
    """A key-based ``sigstoreSigned`` whose key files are read when its scope is used."""

    key_paths: tuple[tuple[str, str], ...]  # (JSON path, file path)
    key_datas: tuple[bytes, ...]
    identity: SignedIdentity
    json_path: str


@dataclass(frozen=True)
class _Unsupported:
    what: str
    json_path: str


_Entry = AcceptAnything | Reject | _SigstoreKeys | _Unsupported


@dataclass(frozen=True, eq=False)
class Policy:
    """A parsed policy file. ``where`` names it in messages."""

    where: str
    default: tuple[_Entry, ...]
    docker_scopes: Mapping[str, tuple[_Entry, ...]]
    transports: frozenset[str] = frozenset()

    def scope_for(self, reference: str) -> str:
        """The JSON path of the section that governs ``reference``, e.g.
        ``transports.docker["quay.io/team"]`` or ``default``."""
        return self._section_for(reference)[0]

    def requirements_for(self, reference: str) -> list[Requirement]:
        """The requirements an image pulled as ``reference`` must all satisfy.

        The most specific ``docker`` scope wins: ``name:tag`` or ``name@digest``, then the
        repository, each parent namespace, the registry host (with its port, if any), then
        ``*.domain`` wildcards from the longest; then the docker transport's ``""`` scope;
        then ``default``. Every returned requirement must hold: Reject refuses, AcceptAnything
        passes, SigstoreSigned needs one valid signature by one of its keys whose payload
        identity it accepts. Raises PolicyError when the section holds a requirement kiln
        cannot check, or a key file cannot be read.
        """
        return [self._materialise(entry, reference) for entry in self._section_for(reference)[1]]

    def _section_for(self, reference: str) -> tuple[str, tuple[_Entry, ...]]:
        try:
            ref = parse_reference(reference)
        except ReferenceError_ as e:
            raise PolicyError(f"{self.where}: cannot look up policy: {e}") from None
        for scope in docker_scope_candidates(ref):
            if scope in self.docker_scopes:
                return _docker_label(scope), self.docker_scopes[scope]
        if "" in self.docker_scopes:
            return _docker_label(""), self.docker_scopes[""]
        return "default", self.default

    def _materialise(self, entry: _Entry, reference: str) -> Requirement:
        if isinstance(entry, AcceptAnything | Reject):
            return entry
        if isinstance(entry, _Unsupported):
            raise PolicyError(
                f"{self.where}: {entry.json_path}: {entry.what} is not supported "
                f"({KEY_BASED_ONLY}); this policy section applies to {reference}"
            )
        keys = list(entry.key_datas)
        keys += [_read_key_file(key_path, self.where, json_path)
                 for json_path, key_path in entry.key_paths]
        return SigstoreSigned(tuple(keys), entry.identity,
                              origin=f"{self.where}: {entry.json_path}")


def docker_scope_candidates(ref: Reference) -> list[str]:
    """Scopes that can govern ``ref``, most specific first (containers/image's order).

    A reference with both a tag and a digest is looked up by its digest: containers/image
    refuses such references, kiln pulls them by digest.
    """
    name = ref.name
    identity = f"{name}@{ref.digest}" if ref.digest else f"{name}:{ref.tag}"
    scopes = [identity]
    while True:
        scopes.append(name)
        cut = name.rfind("/")
        if cut < 0:
            break
        name = name[:cut]
    host = name.partition(":")[0]
    while "." in host:
        host = host.partition(".")[2]
        scopes.append("*." + host)
    return scopes


def default_policy_path(
    env: Mapping[str, str] | None = None, *, system_path: Path = SYSTEM_POLICY_PATH
) -> Path | None:
    """The policy file containers/image would use: ``$HOME/.config/containers/policy.json``
    if it exists, else ``/etc/containers/policy.json`` if it exists, else None.

    Only for when the user asks for policy checks: kiln never enforces it by default.
    """
    env = os.environ if env is None else env
    home = env.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir
    user_path = Path(home) / USER_POLICY_PATH
    if user_path.exists():
        return user_path
    if system_path.exists():
        return system_path
    return None


def load_policy(path: str | os.PathLike) -> Policy:
    where = os.fspath(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise PolicyError(f"{where}: cannot read policy file: {e.strerror}") from None
    return parse_policy(raw, where=where)


def parse_policy(raw: bytes, *, where: str) -> Policy:
    return _Parser(where).policy(_decode(raw, where))


# --- parsing -------------------------------------------------------------------------------


class _Object(list):
    """A JSON object as its (key, value) pairs in file order, duplicates kept for the parser."""


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _decode(raw: bytes, where: str) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(f"{where}: policy is not UTF-8 text: {e}") from None
    try:
        return json.loads(text, object_pairs_hook=_Object, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise PolicyError(
            f"{where}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except ValueError as e:
        raise PolicyError(f"{where}: invalid JSON: {e}") from None


def _docker_label(scope: str) -> str:
    return "transports." + DOCKER_TRANSPORT + _member("", scope)


def _member(path: str, key: str) -> str:
    if key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, _Object):
        return "an object"
    return "an array"


_REQUIREMENT_TYPES = ("insecureAcceptAnything", "reject", "signedBy", "signedBaseLayer",
                      "sigstoreSigned")
_SIGNED_BY_KEY_TYPES = ("GPGKeys", "signedByGPGKeys", "X509Certificates", "signedByX509CAs")
_SIGSTORE_FIELDS = {
    "type", "keyPath", "keyPaths", "keyData", "keyDatas", "fulcio", "pki",
    "rekorPublicKeyPath", "rekorPublicKeyPaths", "rekorPublicKeyData", "rekorPublicKeyDatas",
    "signedIdentity",
}
_FULCIO_FIELDS = {"caPath": str, "caData": bytes, "oidcIssuer": str, "subjectEmail": str}
_PKI_FIELDS = {"caRootsPath": str, "caRootsData": bytes, "caIntermediatesPath": str,
               "caIntermediatesData": bytes, "subjectEmail": str, "subjectHostname": str}


class _Parser:
    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, message: str) -> NoReturn:
        raise PolicyError(f"{self.where}: {path or 'top level'}: {message}")

    def object(self, value: Any, path: str, allowed: set[str] | None = None,
               required: tuple[str, ...] = ()) -> dict[str, Any]:
        if not isinstance(value, _Object):
            self.fail(path, f"expected an object, found {_kind(value)}")
        fields: dict[str, Any] = {}
        for key, item in value:
            if key in fields:
                self.fail(path, f"duplicate field {key!r}")
            if allowed is not None and key not in allowed:
                self.fail(path, f"unknown field {key!r}")
            fields[key] = item
        for key in required:
            if key not in fields:
                self.fail(path, f"missing field {key!r}")
        return fields

    def string(self, value: Any, path: str, *, nonempty: bool = False) -> str:
        if not isinstance(value, str):
            self.fail(path, f"expected a string, found {_kind(value)}")
        if nonempty and not value:
            self.fail(path, "must not be empty")
        return value

    def strings(self, value: Any, path: str, *, allow_empty: bool = False) -> list[str]:
        if not isinstance(value, list) or isinstance(value, _Object):
            self.fail(path, f"expected an array of strings, found {_kind(value)}")
        if not value and not allow_empty:
            self.fail(path, "contains no entries")
        return [self.string(item, f"{path}[{i}]", nonempty=True) for i, item in enumerate(value)]

    def base64(self, value: Any, path: str) -> bytes:
        text = self.string(value, path)
        # Go's encoding/json decodes []byte with StdEncoding, which skips CR and LF.
        try:
            return base64.b64decode(text.replace("\r", "").replace("\n", ""), validate=True)
        except (binascii.Error, ValueError):
            self.fail(path, "is not valid base64")

    def public_key(self, value: Any, path: str) -> bytes:
        data = self.base64(value, path)
        problem = _pem_public_key_problem(data)
        if problem:
            self.fail(path, problem)
        return data

    # -- structure --

    def policy(self, top: Any) -> Policy:
        fields = self.object(top, "", {"default", "transports"}, ("default",))
        default = self.requirements(fields["default"], "default")
        docker_scopes: dict[str, tuple[_Entry, ...]] = {}
        names: set[str] = set()
        if "transports" in fields:
            transports = self.object(fields["transports"], "transports")
            for name, scopes_value in transports.items():
                names.add(name)
                tpath = _member("transports", name)
                scopes = self.object(scopes_value, tpath)
                parsed = {scope: self.requirements(reqs, _member(tpath, scope))
                          for scope, reqs in scopes.items()}
                if name == DOCKER_TRANSPORT:
                    docker_scopes = parsed
        return Policy(self.where, default, docker_scopes, frozenset(names))

    def requirements(self, value: Any, path: str) -> tuple[_Entry, ...]:
        if not isinstance(value, list) or isinstance(value, _Object):
            self.fail(path, f"expected an array of policy requirements, found {_kind(value)}")
        if not value:
            self.fail(path, "the list of policy requirements must not be empty "
                            '(use [{"type": "insecureAcceptAnything"}] to require nothing)')
        return tuple(self.requirement(item, f"{path}[{i}]") for i, item in enumerate(value))

    def requirement(self, value: Any, path: str) -> _Entry:
        fields = self.object(value, path)
        kind = fields.get("type")
        if kind not in _REQUIREMENT_TYPES:
            shown = repr(kind) if isinstance(kind, str) else f"missing or {_kind(kind)}"
            self.fail(path, f"unknown policy requirement type {shown}")
        if kind == "insecureAcceptAnything":
            self.object(value, path, {"type"})
            return AcceptAnything()
        if kind == "reject":
            self.object(value, path, {"type"})
            return Reject()
        if kind == "signedBy":
            return self.signed_by(value, path)
        if kind == "signedBaseLayer":
            fields = self.object(value, path, {"type", "baseLayerIdentity"},
                                 ("baseLayerIdentity",))
            self.identity(fields["baseLayerIdentity"], f"{path}.baseLayerIdentity")
            return _Unsupported("signedBaseLayer", path)
        return self.sigstore_signed(value, path)

    def signed_by(self, value: Any, path: str) -> _Entry:
        fields = self.object(value, path, {"type", "keyType", "keyPath", "keyPaths", "keyData",
                                           "signedIdentity"}, ("keyType",))
        key_type = self.string(fields["keyType"], f"{path}.keyType")
        if key_type not in _SIGNED_BY_KEY_TYPES:
            self.fail(f"{path}.keyType", f"unrecognized keyType {key_type!r}")
        sources = [k for k in ("keyPath", "keyPaths", "keyData") if k in fields]
        if len(sources) != 1:
            self.fail(path, "exactly one of keyPath, keyPaths and keyData must be specified")
        if "keyPath" in fields:
            self.string(fields["keyPath"], f"{path}.keyPath", nonempty=True)
        if "keyPaths" in fields:
            # containers/image accepts an empty keyPaths here (and then verifies nothing).
            self.strings(fields["keyPaths"], f"{path}.keyPaths", allow_empty=True)
        if "keyData" in fields:
            self.base64(fields["keyData"], f"{path}.keyData")
        if "signedIdentity" in fields:
            self.identity(fields["signedIdentity"], f"{path}.signedIdentity")
        return _Unsupported("signedBy (GPG simple signing)", path)

    def sigstore_signed(self, value: Any, path: str) -> _Entry:
        fields = self.object(value, path, _SIGSTORE_FIELDS)
        sources = [k for k in ("keyPath", "keyPaths", "keyData", "keyDatas", "fulcio", "pki")
                   if k in fields]
        if len(sources) != 1:
            self.fail(path, "exactly one of keyPath, keyPaths, keyData, keyDatas, fulcio and "
                            f"pki must be specified, found {', '.join(sources) or 'none'}")
        rekor = [k for k in fields if k.startswith("rekorPublicKey")]
        if len(rekor) > 1:
            self.fail(path, f"at most one of {', '.join(sorted(rekor))} can be specified")
        if "fulcio" in fields and not rekor:
            self.fail(path, "fulcio needs one of rekorPublicKeyPath, rekorPublicKeyPaths, "
                            "rekorPublicKeyData and rekorPublicKeyDatas")
        identity = (self.identity(fields["signedIdentity"], f"{path}.signedIdentity")
                    if "signedIdentity" in fields else SignedIdentity())
        for name in rekor:
            if name.endswith("s"):
                each = (self.strings if name.endswith("Paths") else self.base64_list)
                each(fields[name], f"{path}.{name}")
            elif name.endswith("Path"):
                self.string(fields[name], f"{path}.{name}", nonempty=True)
            else:
                self.base64(fields[name], f"{path}.{name}")
        if "fulcio" in fields:
            self.sub_object(fields["fulcio"], f"{path}.fulcio", _FULCIO_FIELDS)
            return _Unsupported("sigstoreSigned with fulcio (keyless)", path)
        if "pki" in fields:
            self.sub_object(fields["pki"], f"{path}.pki", _PKI_FIELDS)
            return _Unsupported("sigstoreSigned with pki (certificate-based)", path)
        if rekor:
            return _Unsupported(f"sigstoreSigned with {rekor[0]} (Rekor transparency log)", path)
        key_paths: tuple[tuple[str, str], ...] = ()
        key_datas: tuple[bytes, ...] = ()
        if "keyPath" in fields:
            key_paths = ((f"{path}.keyPath",
                          self.string(fields["keyPath"], f"{path}.keyPath", nonempty=True)),)
        elif "keyPaths" in fields:
            key_paths = tuple((f"{path}.keyPaths[{i}]", item) for i, item in
                              enumerate(self.strings(fields["keyPaths"], f"{path}.keyPaths")))
        elif "keyData" in fields:
            key_datas = (self.public_key(fields["keyData"], f"{path}.keyData"),)
        else:
            items = fields["keyDatas"]
            self.base64_list(items, f"{path}.keyDatas")
            key_datas = tuple(self.public_key(item, f"{path}.keyDatas[{i}]")
                              for i, item in enumerate(items))
        return _SigstoreKeys(key_paths, key_datas, identity, path)

    def base64_list(self, value: Any, path: str) -> list[bytes]:
        if not isinstance(value, list) or isinstance(value, _Object):
            self.fail(path, f"expected an array of base64 strings, found {_kind(value)}")
        if not value:
            self.fail(path, "contains no entries")
        return [self.base64(item, f"{path}[{i}]") for i, item in enumerate(value)]

    def sub_object(self, value: Any, path: str, spec: dict[str, type]) -> None:
        fields = self.object(value, path, set(spec))
        for key, item in fields.items():
            if spec[key] is bytes:
                self.base64(item, f"{path}.{key}")
            else:
                self.string(item, f"{path}.{key}", nonempty=True)

    def identity(self, value: Any, path: str) -> SignedIdentity:
        fields = self.object(value, path)
        kind = fields.get("type")
        if kind not in _IDENTITY_FIELDS:
            shown = repr(kind) if isinstance(kind, str) else f"missing or {_kind(kind)}"
            self.fail(path, f"unknown signedIdentity type {shown}")
        needed = _IDENTITY_FIELDS[kind]
        fields = self.object(value, path, {"type", *needed}, needed)
        args = {_IDENTITY_ATTRS[k]: self.string(fields[k], f"{path}.{k}") for k in needed}
        if kind == "exactReference":
            ref = self.reference(args["docker_reference"], f"{path}.dockerReference")
            if _name_only(ref):
                self.fail(f"{path}.dockerReference",
                          f"{args['docker_reference']!r} contains neither a tag nor a digest")
        elif kind == "exactRepository":
            self.reference(args["docker_repository"], f"{path}.dockerRepository")
        elif kind == "remapIdentity":
            for key in ("prefix", "signedPrefix"):
                if not _valid_remap_prefix(fields[key]):
                    self.fail(f"{path}.{key}", f"prefix {fields[key]!r} is not valid: use "
                                               "host[:port], a namespace or a repository, "
                                               "without tag or digest")
        return SignedIdentity(kind, **args)

    def reference(self, text: str, path: str) -> Reference:
        try:
            return parse_reference(text, default_tag=False)
        except ReferenceError_ as e:
            self.fail(path, str(e))


# --- helpers -------------------------------------------------------------------------------


def _parse_or_none(text: str | None, *, default_tag: bool) -> Reference | None:
    if text is None:
        return None
    try:
        return parse_reference(text, default_tag=default_tag)
    except ReferenceError_:
        return None


def _name_only(ref: Reference) -> bool:
    return ref.tag is None and ref.digest is None


def _valid_remap_prefix(prefix: str) -> bool:
    """host[:port], or host[:port]/path: the forms containers/image accepts for a prefix."""
    if _DOMAIN.fullmatch(prefix):
        return True
    host, slash, path = prefix.partition("/")
    return bool(slash and _DOMAIN.fullmatch(host) and _PATH.fullmatch(path))


def _pem_public_key_problem(data: bytes) -> str | None:
    try:
        load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        return f"is not a PEM public key ({e})"
    return None


def _read_key_file(key_path: str, where: str, json_path: str) -> bytes:
    resolved = Path(key_path).absolute()
    try:
        data = resolved.read_bytes()
    except OSError as e:
        shown = key_path if key_path == str(resolved) else f"{key_path} (= {resolved})"
        raise PolicyError(f"{where}: {json_path}: cannot read public key {shown}: "
                          f"{e.strerror}") from None
    problem = _pem_public_key_problem(data)
    if problem:
        raise PolicyError(f"{where}: {json_path}: {resolved} {problem}")
    return data
