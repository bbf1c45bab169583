"""Validate documents against the OCI image-spec JSON schemas, the way upstream does.

Test helper, not a test module: the interop tests call ``validate_with_schema``
on documents kiln writes. It reproduces ``schema.Validator(mediaType).Validate``
of opencontainers/image-spec (see ../shared/corpora/image-spec/FORMAT.md):

1. the Go-side checks: go-digest validation of a top-level descriptor's digest,
   Go's strict base64 decode of every descriptor ``data``, and ``KEY=value``
   for config ``Env`` entries;
2. draft-04 JSON Schema validation with the upstream schema files, every file
   registered under the aliases upstream uses, and ``format`` asserted
   (``uri`` and ``date-time``, checked here without optional packages).

Pattern keywords are matched with Go's RE2 meaning of ``$`` (end of text) rather
than Python's (which also matches before a final newline), so
``"sha256:<64 hex>\\n"`` fails as it does upstream.

It is independent of kiln's own reader (store/documents.py) on purpose: it
checks kiln's output, so it must not share kiln's code.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from pathlib import Path

import pytest
from jsonschema import Draft4Validator, FormatChecker, ValidationError, validators
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

CORPORA_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpora"
IMAGE_SPEC_DIR = CORPORA_DIR / "image-spec"

ROOT_SCHEMAS = {
    "application/vnd.oci.descriptor.v1+json": "content-descriptor.json",
    "application/vnd.oci.layout.header.v1+json": "image-layout-schema.json",
    "application/vnd.oci.image.manifest.v1+json": "image-manifest-schema.json",
    "application/vnd.oci.image.index.v1+json": "image-index-schema.json",
    "application/vnd.oci.image.config.v1+json": "config-schema.json",
}

# Upstream (schema/schema.go) registers every file under its name and these URLs.
SCHEMA_ALIASES = {
    "config-schema.json": ["https://opencontainers.org/schema/image/config"],
    "content-descriptor.json": [
        "https://opencontainers.org/schema/descriptor",
        "https://opencontainers.org/schema/image/content-descriptor.json",
    ],
    "defs-descriptor.json": [
        "https://opencontainers.org/schema/image/descriptor/mediaType",
        "https://opencontainers.org/schema/defs-descriptor.json",
        "https://opencontainers.org/schema/image/defs-descriptor.json",
    ],
    "defs.json": [
        "https://opencontainers.org/schema/defs.json",
        "https://opencontainers.org/schema/image/defs.json",
        "https://opencontainers.org/schema/image/descriptor/defs.json",
    ],
    "image-index-schema.json": ["https://opencontainers.org/schema/image/index"],
    "image-layout-schema.json": ["https://opencontainers.org/schema/image/layout"],
    "image-manifest-schema.json": ["https://opencontainers.org/schema/image/manifest"],
}

_DESCRIPTOR = "application/vnd.oci.descriptor.v1+json"
_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_INDEX = "application/vnd.oci.image.index.v1+json"
_CONFIG = "application/vnd.oci.image.config.v1+json"

_GO_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_GO_REGISTERED = {"sha256": 64, "sha384": 96, "sha512": 128}
_GO_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_GO_ENV = re.compile(r"[^=]+=.*")
_URI = re.compile(
    r"[A-Za-z][A-Za-z0-9+.-]*:(?:[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*"
)
_DATE_TIME = re.compile(
    r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:"
    r"([0-5][0-9]|60)(\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
)


def image_spec_dir() -> Path:
    """The corpus directory, or skip the calling test loudly when it is not there."""
    if not (IMAGE_SPEC_DIR / "schema" / "image-manifest-schema.json").is_file():
        pytest.skip(
            f"OCI image-spec corpus not found at {IMAGE_SPEC_DIR.resolve()}: "
            "schema validation of kiln's documents was NOT run"
        )
    return IMAGE_SPEC_DIR


# ---------------------------------------------------------------- JSON Schema side


def _formats() -> FormatChecker:
    checker = FormatChecker(formats=())

    @checker.checks("uri")
    def is_uri(instance: object) -> bool:
        return not isinstance(instance, str) or bool(_URI.fullmatch(instance))

    @checker.checks("date-time")
    def is_date_time(instance: object) -> bool:
        return not isinstance(instance, str) or bool(_DATE_TIME.fullmatch(instance))

    return checker


def _go_regex(pattern: str) -> str:
    """RE2 ``$`` without the m flag means end of text; Python's ``\\Z`` says the same."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        return pattern[:-1] + r"\Z"
    return pattern


def _pattern(validator, pattern: str, instance: object, schema: dict):
    if validator.is_type(instance, "string") and not re.search(_go_regex(pattern), instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_GoDraft4Validator = validators.extend(Draft4Validator, {"pattern": _pattern})


@functools.cache
def _validators(schema_dir: Path) -> dict[str, Draft4Validator]:
    contents = {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(schema_dir.glob("*.json"))
    }
    # jsonschema picks the validator class from a subschema's "$schema" when it follows a
    # $ref, which would swap in the stock Draft4Validator (Python's "$"). Every file is
    # draft-04, so drop the key and say draft-04 once, below.
    for schema in contents.values():
        schema.pop("$schema", None)
    missing = set(SCHEMA_ALIASES) - set(contents)
    assert not missing, f"schema files missing from {schema_dir}: {sorted(missing)}"
    registry = Registry()
    for name, schema in contents.items():
        resource = Resource.from_contents(schema, default_specification=DRAFT4)
        for uri in [name, *SCHEMA_ALIASES.get(name, [])]:
            registry = registry.with_resource(uri, resource)
    registry = registry.crawl()
    return {
        media_type: _GoDraft4Validator(contents[name], registry=registry, format_checker=_formats())
        for media_type, name in ROOT_SCHEMAS.items()
    }


def schema_errors(doc: object, media_type: str) -> list[str]:
    validator = _validators(image_spec_dir() / "schema")[media_type]
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in errors
    ]


# ---------------------------------------------------------------- Go side


def _go_digest_error(digest: object) -> str | None:
    """go-digest ``Digest.Validate``; an unregistered algorithm is only "unsupported", not wrong."""
    if not isinstance(digest, str):
        return f"digest {digest!r} is not a string"
    algorithm, sep, encoded = digest.partition(":")
    if not algorithm or not sep or not encoded:
        return f"invalid digest format {digest!r}"
    if algorithm not in _GO_REGISTERED:
        return None if _GO_DIGEST.fullmatch(digest) else f"invalid digest format {digest!r}"
    if len(encoded) != _GO_REGISTERED[algorithm] or not re.fullmatch(r"[a-f0-9]*", encoded):
        return f"invalid {algorithm} digest {digest!r}"
    return None


def _go_base64_error(data: object, where: str) -> str | None:
    """Go decodes ``[]byte`` fields as standard base64 with padding; CR and LF are skipped."""
    if data is None:
        return None
    if not isinstance(data, str):
        return f"{where}: cannot decode {type(data).__name__} into []byte"
    compact = data.replace("\r", "").replace("\n", "")
    if not _GO_BASE64.fullmatch(compact):
        return f"{where}: illegal base64 data {data!r}"
    try:
        base64.b64decode(compact, validate=True)
    except binascii.Error as exc:
        return f"{where}: illegal base64 data: {exc}"
    return None


def _descriptors(doc: dict, media_type: str) -> list[tuple[str, object]]:
    """(path, descriptor) for every field Go decodes into a v1.Descriptor."""
    if media_type == _DESCRIPTOR:
        return [("<root>", doc)]
    found: list[tuple[str, object]] = []
    for key in ("config", "subject"):
        if key in doc:
            found.append((key, doc[key]))
    for key in ("layers", "manifests"):
        if isinstance(doc.get(key), list):
            found.extend((f"{key}/{i}", item) for i, item in enumerate(doc[key]))
    return found if media_type in (_MANIFEST, _INDEX) else []


def go_side_errors(doc: object, media_type: str) -> list[str]:
    if not isinstance(doc, dict):
        return [f"cannot decode {type(doc).__name__} into a Go struct"]
    errors = []
    for where, descriptor in _descriptors(doc, media_type):
        if isinstance(descriptor, dict) and "data" in descriptor:
            error = _go_base64_error(descriptor["data"], f"{where}/data")
            if error:
                errors.append(error)
    if media_type == _DESCRIPTOR:
        error = _go_digest_error(doc.get("digest", ""))
        if error:
            errors.append(f"digest: {error}")
    if media_type == _CONFIG:
        config = doc.get("config")
        env = config.get("Env") if isinstance(config, dict) else None
        for i, entry in enumerate(env if isinstance(env, list) else []):
            if isinstance(entry, str) and not _GO_ENV.fullmatch(entry):
                errors.append(f"config/Env/{i}: {entry!r} does not match ^[^=]+=.*$")
    return errors


# ---------------------------------------------------------------- entry point


def validate_with_schema(doc: dict | bytes | str, media_type: str) -> None:
    """Raise AssertionError listing every problem unless upstream's validator accepts ``doc``."""
    if media_type not in ROOT_SCHEMAS:
        raise ValueError(f"no OCI schema for media type {media_type!r}")
    image_spec_dir()
    if isinstance(doc, bytes | str):
        try:
            doc = json.loads(doc)
        except ValueError as exc:
            raise AssertionError(f"{media_type}: invalid JSON: {exc}") from None
    errors = go_side_errors(doc, media_type) + schema_errors(doc, media_type)
    if errors:
        raise AssertionError(f"{media_type} fails the OCI schema:\n  " + "\n  ".join(errors))
