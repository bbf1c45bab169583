"""Strict readers and the canonical writer for OCI / Docker image documents.

Every parser takes the raw bytes exactly as fetched, decodes them with a JSON
decoder that refuses duplicate keys, NaN/Infinity and lone surrogates, and
validates the result by hand against the rules of the OCI image-spec JSON
schemas plus the checks the Go reference validator adds (go-digest grammar,
strict base64 for ``data``, ``Env`` entries as ``KEY=value``). It returns the
decoded document unchanged or raises ManifestError naming the field, e.g.
``manifest: layers[2].digest: invalid digest 'sha256:ABC'``.

Docker schema2 documents (manifest, manifest list, image config) are read by
the same rules with the few allowances real registries need; Docker schema1
is refused.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import re
from dataclasses import dataclass

from store.errors import ManifestError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on start-up
if TYPE_CHECKING:
    from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYOUT_HEADER = "application/vnd.oci.layout.header.v1+json"
OCI_DESCRIPTOR = "application/vnd.oci.descriptor.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1_UNSIGNED = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_SCHEMA1 = frozenset({DOCKER_SCHEMA1_UNSIGNED, DOCKER_SCHEMA1_SIGNED})

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"

FOREIGN_LAYER_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
LAYER_MEDIA_TYPES = frozenset(
    {OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER, DOCKER_LAYER_GZIP, DOCKER_LAYER_ZSTD}
    | FOREIGN_LAYER_MEDIA_TYPES
)

MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
CONFIG_MEDIA_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
# An image config carries the whole history: a Containerfile of 100,000 ENV lines makes one
# of about 11 MiB. kiln reads configs up to this size (containers/image, and so podman and
# skopeo, stop at 4 MiB: the builder warns past that).
MAX_CONFIG_BYTES = 32 * 1024 * 1024
# Real documents nest 4-6 levels. json.loads itself stops near 1000, but a document that
# deep breaks whatever walks it later (copy.deepcopy of a base config in a build, json.dumps
# from a deeper stack): 128, serde_json's default, leaves all of them far from the limit.
MAX_NESTING = 128
MAX_SIZE = 2**63 - 1  # descriptor sizes are Go int64

_MEDIA_TYPE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)
_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_REGISTERED_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}
_LOWER_HEX = re.compile(r"[0-9a-f]*")
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
# RFC 3986: a scheme, then only unreserved, reserved and percent-encoded characters.
_URI = re.compile(
    r"[A-Za-z][A-Za-z0-9+.-]*:(?:[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*"
)
_ENV_ENTRY = re.compile(r"[^=]+=.*")
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.\d+)?(?:[Zz]|[+-](\d{2}):(\d{2}))",
    re.ASCII,
)

_ABSENT = object()


# ---------------------------------------------------------------- decoding


def canonical_json(obj: object) -> bytes:
    """The bytes kiln writes for a document: sorted keys, no whitespace, UTF-8."""
    try:
        text = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise ManifestError(f"cannot write document as JSON: {exc}") from None


_ALL_BUT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_STRING = re.compile(rb'"[^"]*"')
_INNERMOST = re.compile(rb"\[\]|\{\}")
_QUICK_PASSES = 8


def _nested_deeper_than(raw: bytes, limit: int) -> bool:
    """For valid JSON ``raw``: do arrays and objects nest more than ``limit`` deep?

    Everything but the bracket structure is dropped in C (escapes first, then every other
    byte, then the strings that are left); passes that each drop the innermost level end a
    real document; what is left of a hostile one is walked once."""
    if raw.count(b"[") + raw.count(b"{") <= limit:  # most documents: two scans
        return False
    skeleton = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _ALL_BUT_STRUCTURE)
    brackets = _STRING.sub(b"", skeleton)
    passes = min(_QUICK_PASSES, limit)
    for _ in range(passes):
        brackets = _INNERMOST.sub(b"", brackets)
        if not brackets:
            return False
    depth = passes  # the levels the passes dropped
    for c in brackets:
        if c == 0x5B or c == 0x7B:  # [ {
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise ManifestError(f"duplicate key {_show(key)} in a JSON object")
        obj[key] = value
    return obj


def _refuse_constant(name: str) -> None:
    raise ManifestError(f"{name} is not valid JSON")


def decode_document(raw: bytes, *, what: str = "document", top: type = dict,
                    limit: int = MAX_DOCUMENT_BYTES) -> Any:
    """Decode one JSON document under kiln's rules; the top level must be a ``top``."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise TypeError(f"{what}: expected bytes, got {type(raw).__name__}")
    if len(raw) > limit:
        raise ManifestError(f"{what}: {len(raw)} bytes is over the {limit} byte limit")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{what}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        doc = json.loads(
            text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant
        )
    except ManifestError as exc:
        raise ManifestError(f"{what}: {exc}") from None
    except RecursionError:
        raise ManifestError(f"{what}: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
        raise ManifestError(f"{what}: invalid JSON: {exc}") from None
    if _nested_deeper_than(bytes(raw), MAX_NESTING):
        raise ManifestError(f"{what}: JSON nested too deeply (more than {MAX_NESTING} levels)")
    if not isinstance(doc, top):
        want = "a JSON object" if top is dict else "a JSON array"
        raise ManifestError(f"{what}: top level must be {want}, not {_json_type(doc)}")
    if "\\u" in text:  # only escapes can produce lone surrogates, which kiln could not re-encode
        try:
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ManifestError(f"{what}: string contains an unpaired UTF-16 surrogate") from None
    return doc


# ---------------------------------------------------------------- small checks


def _show(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _at(where: str, key: str) -> str:
    """Path of a member: a document root is written ``manifest:``, giving ``manifest: layers``."""
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def _fail(where: str, problem: str) -> ManifestError:
    return ManifestError(f"{where} {problem}" if where.endswith(":") else f"{where}: {problem}")


def _want_type(value: object, kind: type, where: str) -> Any:
    names = {str: "a string", list: "an array", dict: "an object", bool: "a boolean"}
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        name = "an integer"
    else:
        ok = isinstance(value, kind)
        name = names[kind]
    if not ok:
        raise _fail(where, f"must be {name}, not {_json_type(value)} {_show(value)}")
    return value


def _get(obj: dict, key: str, where: str, *, required: bool = False, nulls: bool = False):
    """The value of ``key`` or _ABSENT; with ``nulls`` a JSON null counts as absent (Docker)."""
    value = obj.get(key, _ABSENT)
    if value is None and nulls and not required:
        return _ABSENT
    if value is _ABSENT and required:
        raise _fail(where, f"missing required field {key!r}")
    return value


def check_media_type(value: object, where: str) -> str:
    _want_type(value, str, where)
    if not _MEDIA_TYPE.fullmatch(value):
        raise _fail(where, f"invalid media type {_show(value)}")
    return value


def check_digest(value: object, where: str) -> str:
    """go-digest's rules: the grammar, and lowercase hex of the right length for sha256/384/512."""
    _want_type(value, str, where)
    if not _DIGEST.fullmatch(value):
        raise _fail(where, f"invalid digest {_show(value)}")
    algorithm, encoded = value.split(":", 1)
    want = _REGISTERED_HEX_LENGTHS.get(algorithm)
    if want is not None and (len(encoded) != want or not _LOWER_HEX.fullmatch(encoded)):
        raise _fail(
            where, f"invalid digest {_show(value)}: {algorithm} needs {want} lowercase hex digits"
        )
    return value


def _check_size(value: object, where: str) -> int:
    _want_type(value, int, where)
    if not 0 <= value <= MAX_SIZE:
        raise _fail(where, f"size {value} is out of range (0 to 2**63-1)")
    return value


def _check_url(value: object, where: str) -> str:
    _want_type(value, str, where)
    if not _URI.fullmatch(value):
        raise _fail(where, f"not a URI with a scheme: {_show(value)}")
    return value


def _decode_base64(value: object, where: str) -> bytes:
    """Go's encoding/json rules for []byte: standard alphabet, padding required, CR/LF ignored."""
    _want_type(value, str, where)
    compact = value.replace("\r", "").replace("\n", "")
    if not _BASE64.fullmatch(compact):
        raise _fail(where, f"invalid base64 (standard alphabet with padding): {_show(value)}")
    try:
        import base64  # only for descriptors that embed data

        return base64.b64decode(compact, validate=True)
    except binascii.Error as exc:  # unreachable after the regex, kept as a guard
        raise _fail(where, f"invalid base64: {exc}") from None


def _check_timestamp(value: object, where: str) -> str:
    _want_type(value, str, where)
    match = _RFC3339.fullmatch(value)
    if match:
        _year, month, day, hour, minute, second, off_h, off_m = (
            int(g) if g is not None else 0 for g in match.groups()
        )
        if (
            1 <= month <= 12
            and 1 <= day <= 31
            and hour < 24
            and minute < 60
            and second <= 60
            and off_h < 24
            and off_m < 60
        ):
            return value
    raise _fail(where, f"not an RFC 3339 timestamp: {_show(value)}")


def _check_string_list(value: object, where: str) -> list:
    for i, item in enumerate(_want_type(value, list, where)):
        _want_type(item, str, f"{where}[{i}]")
    return value


def _check_string_map(value: object, where: str) -> dict:
    for key, item in _want_type(value, dict, where).items():
        _want_type(item, str, f"{where}[{key!r}]")
    return value


def _check_object_map(value: object, where: str) -> dict:
    """A set encoded as an object of empty objects: ExposedPorts, Volumes."""
    for key, item in _want_type(value, dict, where).items():
        _want_type(item, dict, f"{where}[{key!r}]")
    return value


def _check_optional(obj: dict, key: str, where: str, check, *, nulls: bool = False) -> None:
    value = _get(obj, key, where, nulls=nulls)
    if value is not _ABSENT:
        check(value, _at(where, key))


def _check_platform(value: object, where: str) -> dict:
    _want_type(value, dict, where)
    for key in ("architecture", "os"):
        _want_type(_get(value, key, where, required=True), str, _at(where, key))
    for key in ("os.version", "variant"):
        _check_optional(value, key, where, lambda v, w: _want_type(v, str, w))
    _check_optional(value, "os.features", where, _check_string_list)
    return value


# ---------------------------------------------------------------- descriptors


def _check_descriptor(obj: object, where: str) -> dict:
    _want_type(obj, dict, where)
    check_media_type(_get(obj, "mediaType", where, required=True), _at(where, "mediaType"))
    digest = check_digest(_get(obj, "digest", where, required=True), _at(where, "digest"))
    size = _check_size(_get(obj, "size", where, required=True), _at(where, "size"))
    _check_optional(obj, "artifactType", where, check_media_type)
    _check_optional(obj, "annotations", where, _check_string_map)
    _check_optional(obj, "platform", where, _check_platform)
    urls = _get(obj, "urls", where)
    if urls is not _ABSENT:
        for i, url in enumerate(_want_type(urls, list, _at(where, "urls"))):
            _check_url(url, _at(where, f"urls[{i}]"))
    data = _get(obj, "data", where)
    if data is not _ABSENT:
        blob = _decode_base64(data, _at(where, "data"))
        if len(blob) != size:
            raise _fail(_at(where, "data"), f"embedded data is {len(blob)} bytes, size says {size}")
        if digest.startswith("sha256:") and "sha256:" + hashlib.sha256(blob).hexdigest() != digest:
            raise _fail(_at(where, "data"), f"embedded data does not match digest {digest}")
    return obj


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None = None
    platform: dict | None = None
    urls: tuple[str, ...] | None = None
    artifact_type: str | None = None
    data: bytes | None = None

    def __post_init__(self) -> None:
        if self.data is not None and not isinstance(self.data, bytes):
            raise ManifestError(f"descriptor: data must be bytes, not {type(self.data).__name__}")
        _check_descriptor(self.to_json(), "descriptor")

    def to_json(self) -> dict:
        obj: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.urls is not None:
            obj["urls"] = list(self.urls)
        if self.annotations is not None:
            obj["annotations"] = dict(self.annotations)
        if self.data is not None:
            import base64

            obj["data"] = base64.b64encode(self.data).decode("ascii")
        if self.platform is not None:
            obj["platform"] = dict(self.platform)
        if self.artifact_type is not None:
            obj["artifactType"] = self.artifact_type
        return obj

    @classmethod
    def from_json(cls, obj: object, *, where: str = "descriptor") -> Descriptor:
        """Validate a decoded descriptor object; unknown fields are ignored, as the spec says."""
        _check_descriptor(obj, where)
        urls = obj.get("urls")
        data = obj.get("data")
        return cls(
            media_type=obj["mediaType"],
            digest=obj["digest"],
            size=obj["size"],
            annotations=obj.get("annotations"),
            platform=obj.get("platform"),
            urls=tuple(urls) if urls is not None else None,
            artifact_type=obj.get("artifactType"),
            data=_decode_base64(data, _at(where, "data")) if data is not None else None,
        )


def _check_descriptor_list(value: object, where: str) -> list:
    for i, item in enumerate(_want_type(value, list, where)):
        _check_descriptor(item, f"{where}[{i}]")
    return value


# ---------------------------------------------------------------- media types


def _bare_media_type(media_type: str | None) -> str | None:
    """A Content-Type header may carry parameters (``; charset=utf-8``); they do not matter."""
    if media_type is None:
        return None
    return media_type.split(";", 1)[0].strip()


def _refuse_schema1(doc: dict, media_type: str | None, what: str) -> None:
    declared = doc.get("mediaType")
    if (
        media_type in DOCKER_SCHEMA1
        or declared in DOCKER_SCHEMA1
        or (doc.get("schemaVersion") == 1 and not isinstance(doc.get("schemaVersion"), bool))
    ):
        raise ManifestError(
            f"{what}: Docker schema1 manifests are not supported; "
            "re-push the image with a current Docker or skopeo to get schema2/OCI"
        )


def _refuse_ambiguous(doc: dict, what: str) -> None:
    if "layers" in doc and "manifests" in doc:
        raise ManifestError(
            f"{what}: has both 'layers' and 'manifests', so it is neither a manifest "
            "nor an index (the OCI spec says not to guess)"
        )


def _document_media_type(
    doc: dict, media_type: str | None, allowed: frozenset[str], default: str, what: str
) -> str:
    """The media type a manifest or index really has: its own field, the caller's, or OCI's."""
    if media_type is not None and media_type not in allowed:
        raise ManifestError(f"{what}: media type {media_type!r} is not a {what} media type")
    declared = doc.get("mediaType", _ABSENT)
    if declared is _ABSENT:
        return media_type or default
    where = _at(what + ":", "mediaType")
    check_media_type(declared, where)
    if declared not in allowed:
        raise _fail(where, f"{declared!r} is not a {what} media type")
    if media_type is not None and declared != media_type:
        raise _fail(where, f"document says {declared!r} but was served as {media_type!r}")
    return declared


def _check_schema_version(doc: dict, where: str) -> None:
    version = _want_type(
        _get(doc, "schemaVersion", where, required=True), int, _at(where, "schemaVersion")
    )
    if version != 2:
        raise _fail(_at(where, "schemaVersion"), f"must be 2, not {version}")


# ---------------------------------------------------------------- documents


def _validate_manifest(doc: dict, media_type: str | None) -> str:
    where = "manifest:"
    _refuse_schema1(doc, media_type, "manifest")
    _refuse_ambiguous(doc, "manifest")
    if "manifests" in doc and "layers" not in doc:
        raise ManifestError("manifest: has 'manifests', so it is an image index, not a manifest")
    kind = _document_media_type(doc, media_type, MANIFEST_MEDIA_TYPES, OCI_MANIFEST, "manifest")
    _check_schema_version(doc, where)
    _check_descriptor(_get(doc, "config", where, required=True), _at(where, "config"))
    layers = _check_descriptor_list(_get(doc, "layers", where, required=True), _at(where, "layers"))
    if not layers and kind == OCI_MANIFEST:
        raise _fail(_at(where, "layers"), "must have at least one layer (OCI manifest schema)")
    _check_optional(doc, "artifactType", where, check_media_type)
    _check_optional(doc, "subject", where, _check_descriptor)
    _check_optional(doc, "annotations", where, _check_string_map)
    return kind


def _validate_index(doc: dict, media_type: str | None) -> str:
    where = "index:"
    _refuse_schema1(doc, media_type, "index")
    _refuse_ambiguous(doc, "index")
    if "manifests" not in doc and "layers" in doc:
        raise ManifestError("index: has 'layers', so it is an image manifest, not an index")
    kind = _document_media_type(doc, media_type, INDEX_MEDIA_TYPES, OCI_INDEX, "index")
    _check_schema_version(doc, where)
    _check_descriptor_list(_get(doc, "manifests", where, required=True), _at(where, "manifests"))
    _check_optional(doc, "artifactType", where, check_media_type)
    _check_optional(doc, "subject", where, _check_descriptor)
    _check_optional(doc, "annotations", where, _check_string_map)
    return kind


def _check_env(value: object, where: str) -> None:
    for i, entry in enumerate(_check_string_list(value, where)):
        if not _ENV_ENTRY.fullmatch(entry):
            raise _fail(f"{where}[{i}]", f"must look like NAME=value, not {_show(entry)}")


def _check_command(value: object, where: str) -> None:
    if value is not None:  # the schema allows null for Entrypoint and Cmd
        _check_string_list(value, where)


def _check_runtime_config(value: object, where: str, nulls: bool) -> None:
    """The ``config`` member of an image config: what a container started from it gets."""
    _want_type(value, dict, where)

    def string(v: object, w: str) -> None:
        _want_type(v, str, w)

    for key in ("User", "WorkingDir", "StopSignal"):
        _check_optional(value, key, where, string, nulls=nulls)
    _check_optional(value, "ArgsEscaped", where, lambda v, w: _want_type(v, bool, w), nulls=nulls)
    _check_optional(value, "ExposedPorts", where, _check_object_map, nulls=nulls)
    _check_optional(value, "Env", where, _check_env, nulls=nulls)
    _check_optional(value, "Entrypoint", where, _check_command)
    _check_optional(value, "Cmd", where, _check_command)
    _check_optional(value, "Volumes", where, _check_object_map, nulls=True)
    _check_optional(value, "Labels", where, _check_string_map, nulls=True)


def _check_history(value: object, where: str, nulls: bool) -> None:
    for i, entry in enumerate(_want_type(value, list, where)):
        at = f"{where}[{i}]"
        _want_type(entry, dict, at)
        _check_optional(entry, "created", at, _check_timestamp, nulls=nulls)
        for key in ("author", "created_by", "comment"):
            _check_optional(entry, key, at, lambda v, w: _want_type(v, str, w), nulls=nulls)
        _check_optional(entry, "empty_layer", at, lambda v, w: _want_type(v, bool, w), nulls=nulls)


def _check_rootfs(value: object, where: str) -> None:
    _want_type(value, dict, where)
    kind = _want_type(_get(value, "type", where, required=True), str, _at(where, "type"))
    if kind != "layers":
        raise _fail(_at(where, "type"), f"must be 'layers', not {_show(kind)}")
    diff_ids = _get(value, "diff_ids", where, required=True)
    _want_type(diff_ids, list, _at(where, "diff_ids"))
    for i, diff_id in enumerate(diff_ids):
        check_digest(diff_id, _at(where, f"diff_ids[{i}]"))


def _validate_config(doc: dict, media_type: str | None) -> str:
    """OCI rules; for a Docker config a JSON null in an optional field counts as absent,
    because Docker's Go structs write ``"Env": null`` and real registries serve that."""
    where = "config:"
    if media_type is not None and media_type not in CONFIG_MEDIA_TYPES:
        raise ManifestError(
            f"config: media type {media_type!r} is not an image config type "
            "(a Docker schema2 manifest may name it application/octet-stream; "
            f"pass {DOCKER_CONFIG!r} for those)"
        )
    nulls = media_type == DOCKER_CONFIG
    for key in ("architecture", "os"):
        _want_type(_get(doc, key, where, required=True), str, _at(where, key))
    _check_rootfs(_get(doc, "rootfs", where, required=True), _at(where, "rootfs"))
    for key in ("author", "variant", "os.version"):
        _check_optional(doc, key, where, lambda v, w: _want_type(v, str, w), nulls=nulls)
    _check_optional(doc, "created", where, _check_timestamp, nulls=nulls)
    _check_optional(doc, "os.features", where, _check_string_list, nulls=nulls)
    _check_optional(
        doc, "config", where, lambda v, w: _check_runtime_config(v, w, nulls), nulls=nulls
    )
    _check_optional(doc, "history", where, lambda v, w: _check_history(v, w, nulls), nulls=nulls)
    return media_type or OCI_CONFIG


def _validate_layout_header(doc: dict) -> str:
    where = "oci-layout:"
    version = _get(doc, "imageLayoutVersion", where, required=True)
    if not isinstance(version, str) or version != "1.0.0":
        raise _fail(_at(where, "imageLayoutVersion"), f'must be "1.0.0", not {_show(version)}')
    return OCI_LAYOUT_HEADER


def _validate_descriptor_document(doc: dict) -> str:
    _check_descriptor(doc, "descriptor:")
    return OCI_DESCRIPTOR


# ---------------------------------------------------------------- public parsers


def parse_manifest(raw: bytes, *, media_type: str | None = None) -> dict:
    """An OCI image manifest or Docker schema2 manifest; ``media_type`` is what it was served as."""
    doc = decode_document(raw, what="manifest")
    _validate_manifest(doc, _bare_media_type(media_type))
    return doc


def parse_index(raw: bytes, *, media_type: str | None = None) -> dict:
    """An OCI image index or Docker manifest list."""
    doc = decode_document(raw, what="index")
    _validate_index(doc, _bare_media_type(media_type))
    return doc


def parse_config(raw: bytes, *, media_type: str | None = None) -> dict:
    """An image config; OCI rules unless ``media_type`` is DOCKER_CONFIG."""
    doc = decode_document(raw, what="config", limit=MAX_CONFIG_BYTES)
    _validate_config(doc, _bare_media_type(media_type))
    return doc


def parse_layout_header(raw: bytes) -> dict:
    """The ``oci-layout`` file of an OCI image layout."""
    doc = decode_document(raw, what="oci-layout")
    _validate_layout_header(doc)
    return doc


def parse_descriptor(raw: bytes) -> dict:
    """A stand-alone descriptor document (application/vnd.oci.descriptor.v1+json)."""
    doc = decode_document(raw, what="descriptor")
    _validate_descriptor_document(doc)
    return doc


def _sniff(doc: dict) -> str:
    declared = doc.get("mediaType")
    if declared in MANIFEST_MEDIA_TYPES or declared in INDEX_MEDIA_TYPES:
        return declared
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc or ("config" in doc and "schemaVersion" in doc):
        return OCI_MANIFEST
    if "imageLayoutVersion" in doc:
        return OCI_LAYOUT_HEADER
    if "rootfs" in doc or "architecture" in doc:
        return OCI_CONFIG
    if "digest" in doc:
        return OCI_DESCRIPTOR
    raise ManifestError("document: cannot tell what kind of image document this is")


def parse_any(raw: bytes, media_type: str | None = None) -> tuple[str, dict]:
    """Decode and validate any document kiln reads; returns (its media type, the document).

    Without ``media_type`` the kind is taken from the document's own ``mediaType``
    or, failing that, from which fields it has.
    """
    doc = decode_document(raw)
    media_type = _bare_media_type(media_type)
    if media_type is None or media_type in DOCKER_SCHEMA1:
        _refuse_schema1(doc, media_type, "document")
        _refuse_ambiguous(doc, "document")
    kind = media_type or _sniff(doc)
    if kind in MANIFEST_MEDIA_TYPES:
        return _validate_manifest(doc, media_type), doc
    if kind in INDEX_MEDIA_TYPES:
        return _validate_index(doc, media_type), doc
    if kind in CONFIG_MEDIA_TYPES:
        return _validate_config(doc, media_type), doc
    if kind == OCI_LAYOUT_HEADER:
        return _validate_layout_header(doc), doc
    if kind == OCI_DESCRIPTOR:
        return _validate_descriptor_document(doc), doc
    raise ManifestError(f"document: media type {kind!r} is not an image document kiln reads")
