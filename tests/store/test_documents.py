"""kiln's strict document readers, its canonical writer, and the schema helper the
interop tests rely on, checked against the OCI image-spec conformance corpus."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from store.documents import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_SCHEMA1_SIGNED,
    LAYER_MEDIA_TYPES,
    MAX_DOCUMENT_BYTES,
    OCI_CONFIG,
    OCI_DESCRIPTOR,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_LAYOUT_HEADER,
    OCI_MANIFEST,
    Descriptor,
    canonical_json,
    decode_document,
    parse_any,
    parse_config,
    parse_descriptor,
    parse_index,
    parse_layout_header,
    parse_manifest,
)
from store.errors import ManifestError
from tests.schema_check import validate_with_schema

IMAGE_SPEC = Path(__file__).resolve().parents[2] / ".." / "shared" / "corpora" / "image-spec"
CORPUS_MISSING = (
    f"OCI image-spec corpus not found at {IMAGE_SPEC.resolve()}: the 84 conformance "
    "cases were NOT run"
)

H1 = "a" * 64
H2 = "b" * 64
EMPTY_JSON_DIGEST = "sha256:" + hashlib.sha256(b"{}").hexdigest()


# ---------------------------------------------------------------- corpus loading


def _table_cases() -> list[dict]:
    cases = []
    for path in sorted((IMAGE_SPEC / "tests").glob("*_test.json")):
        if path.name == "backwards_compatibility_test.json":
            continue
        for case in json.loads(path.read_text(encoding="utf-8"))["cases"]:
            cases.append({**case, "id": f"{path.stem}-{case['index']}"})
    examples = json.loads((IMAGE_SPEC / "spec-examples" / "index.json").read_text("utf-8"))
    for example in examples["examples"]:
        document = (IMAGE_SPEC / "spec-examples" / example["file"]).read_text(encoding="utf-8")
        cases.append(
            {
                "id": f"spec-{example['file']}",
                "mediaType": example["mediaType"],
                "fail": example["expected"] != "valid",
                "document": document,
            }
        )
    return cases


def _compat() -> dict:
    return json.loads(
        (IMAGE_SPEC / "tests" / "backwards_compatibility_test.json").read_text("utf-8")
    )


def _params(load) -> list:
    if not IMAGE_SPEC.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=CORPUS_MISSING), id="no-corpus")]
    return [pytest.param(case, id=case["id"]) for case in load()]


def _compat_cases() -> list[dict]:
    return [{**case, "id": f"{case['test']}-{case['index']}"} for case in _compat()["cases"]]


def _read_with_kiln(media_type: str, raw: bytes) -> object:
    """The reader kiln uses for each kind of document."""
    if media_type == OCI_DESCRIPTOR:
        return Descriptor.from_json(decode_document(raw, what="descriptor"))
    if media_type == OCI_LAYOUT_HEADER:
        return parse_layout_header(raw)
    if media_type == OCI_CONFIG:
        return parse_config(raw)
    if media_type == OCI_MANIFEST:
        return parse_manifest(raw, media_type=media_type)
    if media_type == OCI_INDEX:
        return parse_index(raw, media_type=media_type)
    raise AssertionError(f"corpus uses a media type this test does not route: {media_type}")


def _outcome(read) -> str | None:
    try:
        read()
    except ManifestError as exc:
        return str(exc) or "ManifestError"
    return None


def _schema_outcome(doc, media_type: str) -> str | None:
    try:
        validate_with_schema(doc, media_type)
    except AssertionError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------- corpus: kiln's reader


def test_corpus_has_the_documented_number_of_cases():
    if not IMAGE_SPEC.is_dir():
        pytest.skip(CORPUS_MISSING)
    table = _table_cases()
    compat = _compat_cases()
    assert len(table) + len(compat) == 84
    assert sum(case["fail"] for case in table + compat) == 40


@pytest.mark.parametrize("case", _params(_table_cases))
def test_kiln_reader_gives_the_corpus_outcome(case):
    raw = case["document"].encode("utf-8")
    error = _outcome(lambda: _read_with_kiln(case["mediaType"], raw))
    if case["fail"]:
        assert error, f"kiln accepted a document upstream rejects: {case.get('description')}"
    else:
        assert error is None, f"kiln refused a valid document: {error}"


@pytest.mark.parametrize("case", _params(_table_cases))
def test_parse_any_agrees_with_the_specific_reader(case):
    raw = case["document"].encode("utf-8")
    error = _outcome(lambda: parse_any(raw, case["mediaType"]))
    assert (error is not None) == case["fail"], error
    if not case["fail"]:
        detected, doc = parse_any(raw, case["mediaType"])
        assert detected == case["mediaType"]
        assert doc == json.loads(raw)


@pytest.mark.parametrize("case", _params(_compat_cases))
def test_docker_documents_from_docker_hub_read_as_docker(case):
    raw = case["document"].encode("utf-8")
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == case["digest_of_document"]
    if case["mediaType"] == OCI_CONFIG:
        doc = parse_config(raw, media_type=DOCKER_CONFIG)
        assert parse_any(raw, DOCKER_CONFIG) == (DOCKER_CONFIG, doc)
    else:
        detected, doc = parse_any(raw)  # the document names its own Docker media type
        assert detected in (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
        reader = parse_index if detected == DOCKER_MANIFEST_LIST else parse_manifest
        assert reader(raw, media_type=detected) == doc
        assert reader(raw) == doc
        # served as OCI while saying Docker: a client must not paper over that
        oci = OCI_INDEX if detected == DOCKER_MANIFEST_LIST else OCI_MANIFEST
        with pytest.raises(ManifestError, match="served as"):
            reader(raw, media_type=oci)


@pytest.mark.parametrize("case", _params(_compat_cases))
def test_docker_documents_pass_as_oci_after_the_compat_substitution(case):
    text = case["document"]
    for docker_type, oci_type in _compat()["compat_map"].items():
        text = text.replace(docker_type, oci_type)
    raw = text.encode("utf-8")
    assert _outcome(lambda: _read_with_kiln(case["mediaType"], raw)) is None
    assert parse_any(raw)[0] == case["mediaType"]
    assert _schema_outcome(raw, case["mediaType"]) is None


# ---------------------------------------------------------------- corpus: schema helper


@pytest.mark.parametrize("case", _params(_table_cases))
def test_schema_helper_gives_the_corpus_outcome(case):
    error = _schema_outcome(case["document"].encode("utf-8"), case["mediaType"])
    if case["fail"]:
        assert error, f"schema helper accepted a document upstream rejects: {case['id']}"
    else:
        assert error is None, error


def test_schema_helper_needs_its_three_go_side_checks():
    """Each Go-side check is what rejects one corpus case; without it the schema alone passes."""
    if not IMAGE_SPEC.is_dir():
        pytest.skip(CORPUS_MISSING)
    by_id = {case["id"]: case for case in _table_cases()}
    for case_id, expect in [
        ("config_test-9", "Env"),
        ("descriptor_test-15", "invalid sha256 digest"),
        ("descriptor_test-29", "base64"),
    ]:
        case = by_id[case_id]
        error = _schema_outcome(case["document"].encode(), case["mediaType"])
        assert error and expect in error, (case_id, error)


def test_schema_helper_reads_dollar_as_end_of_text_like_go():
    doc = _manifest(layers=[{"mediaType": OCI_LAYER_GZIP, "size": 1, "digest": f"sha256:{H1}\n"}])
    error = _schema_outcome(doc, OCI_MANIFEST)
    assert error and "layers/0/digest" in error


def test_schema_helper_checks_data_inside_manifests_and_dates_in_configs():
    layer = {"mediaType": OCI_EMPTY, "size": 2, "digest": EMPTY_JSON_DIGEST, "data": "e30"}
    error = _schema_outcome(_manifest(layers=[layer]), OCI_MANIFEST)
    assert error and "layers/0/data" in error
    config = _config(created="last tuesday")
    error = _schema_outcome(config, OCI_CONFIG)
    assert error and "date-time" in error


# ---------------------------------------------------------------- builders


def _manifest(**overrides) -> dict:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "size": 10, "digest": f"sha256:{H1}"},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "size": 20, "digest": f"sha256:{H2}"}],
    }
    doc.update(overrides)
    return doc


def _config(**overrides) -> dict:
    doc = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{H1}"]},
    }
    doc.update(overrides)
    return doc


def _raw(doc: dict) -> bytes:
    return json.dumps(doc).encode()


# ---------------------------------------------------------------- decoding limits


def test_document_over_the_size_limit_is_refused_before_decoding():
    base = _raw(_manifest())
    exact = base + b" " * (MAX_DOCUMENT_BYTES - len(base))
    assert len(exact) == MAX_DOCUMENT_BYTES
    assert parse_manifest(exact)["schemaVersion"] == 2
    with pytest.raises(ManifestError, match="over the 4194304 byte limit"):
        parse_manifest(exact + b" ")
    # not even looked at: garbage of that size gets the size message, not a JSON error
    with pytest.raises(ManifestError, match="byte limit"):
        parse_any(b"\xff" * (MAX_DOCUMENT_BYTES + 1))


@pytest.mark.parametrize(
    "raw, message",
    [
        (b'{"schemaVersion": 2, "schemaVersion": 2}', "duplicate key 'schemaVersion'"),
        (
            b'{"schemaVersion": 2, "config": {"mediaType": "a/b", "size": 1, "size": 2, '
            b'"digest": "sha256:' + H1.encode() + b'"}, "layers": []}',
            "duplicate key 'size'",
        ),
        (b'{"os": "linux\xff"}', "not UTF-8"),
        ('{"schemaVersion": 2}'.encode("utf-16"), "not UTF-8"),
        (b"\xef\xbb\xbf{}", "invalid JSON"),
        (b"[]", "top level must be a JSON object, not an array"),
        (b'"manifest"', "not a string"),
        (b"null", "not null"),
        (b"", "invalid JSON"),
        (b'{"size": NaN}', "NaN is not valid JSON"),
        (b'{"size": -Infinity}', "Infinity is not valid JSON"),
        (b'{"a": "\\ud800"}', "unpaired UTF-16 surrogate"),
        (b'{"size": ' + b"9" * 5000 + b"}", "invalid JSON"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON nested too deeply"),
    ],
    ids=[
        "dup-top",
        "dup-nested",
        "bad-utf8",
        "utf16",
        "bom",
        "array",
        "string",
        "null",
        "empty",
        "nan",
        "infinity",
        "lone-surrogate",
        "huge-int",
        "deep-nesting",
    ],
)
def test_undecodable_documents_are_refused(raw, message):
    for read in (parse_manifest, parse_index, parse_config, parse_layout_header, parse_any):
        with pytest.raises(ManifestError, match=message):
            read(raw)


def test_nul_and_non_ascii_in_strings_are_fine():
    doc = _manifest(annotations={"org.example.note": "a\u0000b", "org.example.name": "café ☕"})
    assert parse_manifest(_raw(doc))["annotations"]["org.example.note"] == "a\x00b"
    assert parse_manifest(canonical_json(doc)) == doc


# ---------------------------------------------------------------- manifests and indexes


def test_a_document_with_both_layers_and_manifests_is_refused_everywhere():
    doc = _manifest(manifests=[])
    for read in (parse_manifest, parse_index, parse_any):
        with pytest.raises(ManifestError, match="both 'layers' and 'manifests'"):
            read(_raw(doc))


def test_schema1_manifests_are_refused_with_a_clear_message():
    schema1 = {
        "schemaVersion": 1,
        "name": "library/hello",
        "tag": "latest",
        "architecture": "amd64",
        "fsLayers": [{"blobSum": f"sha256:{H1}"}],
        "history": [{"v1Compatibility": "{}"}],
    }
    for read in (parse_manifest, parse_any):
        with pytest.raises(ManifestError, match="Docker schema1 manifests are not supported"):
            read(_raw(schema1))
    with pytest.raises(ManifestError, match="Docker schema1 manifests are not supported"):
        parse_manifest(_raw(_manifest(mediaType=DOCKER_SCHEMA1_SIGNED)))
    with pytest.raises(ManifestError, match="Docker schema1 manifests are not supported"):
        parse_any(_raw(schema1), DOCKER_SCHEMA1_SIGNED)


def test_errors_say_what_is_wrong_and_where():
    layers = [
        {"mediaType": OCI_LAYER_GZIP, "size": 1, "digest": f"sha256:{H1}"},
        {"mediaType": OCI_LAYER_GZIP, "size": 1, "digest": f"sha256:{H2}"},
        {"mediaType": OCI_LAYER_GZIP, "size": 1, "digest": "sha256:ABC"},
    ]
    with pytest.raises(
        ManifestError,
        match=r"^manifest: layers\[2\]\.digest: invalid digest "
        r"'sha256:ABC'",
    ):
        parse_manifest(_raw(_manifest(layers=layers)))


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:../../x",
        "sha256:" + H1.upper(),
        "sha256:" + H1[:-1],
        "sha256:" + H1 + "0",
        f"sha256:{H1}\n",
        "sha384:" + "a" * 64,
        "sha512:" + "a" * 96,
        "sha256",
        ":" + H1,
        "SHA256:" + H1,
        "sha256+foo+-b:abc",
        "sha256:",
        "",
        7,
    ],
)
def test_bad_digests_are_refused_in_manifests_and_configs(digest):
    layers = [{"mediaType": OCI_LAYER_GZIP, "size": 1, "digest": digest}]
    with pytest.raises(ManifestError, match=r"manifest: layers\[0\]\.digest"):
        parse_manifest(_raw(_manifest(layers=layers)))
    rootfs = {"type": "layers", "diff_ids": [digest]}
    with pytest.raises(ManifestError, match=r"config: rootfs\.diff_ids\[0\]"):
        parse_config(_raw(_config(rootfs=rootfs)))


@pytest.mark.parametrize(
    "digest",
    [f"sha256:{H1}", "sha384:" + "c" * 96, "sha512:" + "d" * 128, "sha256+b64u:LCa0a2j_xo5m0U8="],
)
def test_registered_and_foreign_digest_algorithms_are_accepted(digest):
    layers = [{"mediaType": OCI_LAYER_GZIP, "size": 1, "digest": digest}]
    assert parse_manifest(_raw(_manifest(layers=layers)))["layers"][0]["digest"] == digest


@pytest.mark.parametrize(
    "size, message",
    [
        (True, "must be an integer, not a boolean"),
        (7682.0, "must be an integer, not a number"),
        ("7682", "must be an integer, not a string"),
        (None, "must be an integer, not null"),
        (-1, "out of range"),
        (2**63, "out of range"),
    ],
)
def test_sizes_must_be_non_negative_integers(size, message):
    layers = [{"mediaType": OCI_LAYER_GZIP, "size": size, "digest": f"sha256:{H1}"}]
    with pytest.raises(ManifestError, match=message):
        parse_manifest(_raw(_manifest(layers=layers)))
    with pytest.raises(ManifestError, match=message):
        parse_index(_raw({"schemaVersion": 2, "manifests": layers}))


def test_largest_size_is_accepted():
    layers = [{"mediaType": OCI_LAYER_GZIP, "size": 2**63 - 1, "digest": f"sha256:{H1}"}]
    assert parse_manifest(_raw(_manifest(layers=layers)))


@pytest.mark.parametrize("version", ["2", 2.0, True, 3, None])
def test_schema_version_must_be_the_integer_2(version):
    with pytest.raises(ManifestError, match="schemaVersion"):
        parse_manifest(_raw(_manifest(schemaVersion=version)))
    with pytest.raises(ManifestError, match="schemaVersion"):
        parse_index(_raw({"schemaVersion": version, "manifests": []}))


@pytest.mark.parametrize("media_type", ["", "application", "a/b c", "application/json\n"])
def test_media_types_must_match_rfc_6838(media_type):
    layers = [{"mediaType": media_type, "size": 1, "digest": f"sha256:{H1}"}]
    with pytest.raises(ManifestError, match=r"layers\[0\]\.mediaType: invalid media type"):
        parse_manifest(_raw(_manifest(layers=layers)))


@pytest.mark.parametrize("url", ["value", "/relative/path", "https://example.com/a b", ""])
def test_descriptor_urls_must_be_uris_with_a_scheme(url):
    layer = {"mediaType": OCI_LAYER_GZIP, "size": 1, "digest": f"sha256:{H1}", "urls": [url]}
    with pytest.raises(ManifestError, match=r"urls\[0\]: not a URI"):
        parse_manifest(_raw(_manifest(layers=[layer])))


def test_embedded_data_must_be_padded_base64_matching_size_and_digest():
    good = {"mediaType": OCI_EMPTY, "size": 2, "digest": EMPTY_JSON_DIGEST, "data": "e30="}
    assert Descriptor.from_json(good).data == b"{}"
    for data, message in [
        ("e30", "invalid base64"),
        ("e3-=", "invalid base64"),
        ("e30=e30=", "invalid base64"),
        (7, "must be a string"),
        ("W10=", "does not match digest"),  # "[]"
        ("e30hIQ==", "is 4 bytes, size says 2"),
    ]:
        with pytest.raises(ManifestError, match=message):
            Descriptor.from_json({**good, "data": data})
        with pytest.raises(ManifestError, match=r"manifest: layers\[0\]\.data"):
            parse_manifest(_raw(_manifest(layers=[{**good, "data": data}])))


def test_oci_manifest_needs_a_layer_but_docker_may_have_none():
    with pytest.raises(ManifestError, match="at least one layer"):
        parse_manifest(_raw(_manifest(layers=[])))
    docker = _manifest(mediaType=DOCKER_MANIFEST, layers=[])
    assert parse_manifest(_raw(docker)) == docker


def test_manifest_fields_are_checked():
    for overrides, message in [
        ({"config": None}, "config: must be an object"),
        ({"layers": {}}, "layers: must be an array"),
        ({"subject": "nope"}, "subject: must be an object"),
        ({"annotations": {"a": 1}}, r"annotations\['a'\]: must be a string"),
        ({"artifactType": "nope"}, "artifactType: invalid media type"),
        ({"mediaType": OCI_INDEX}, "is not a manifest media type"),
    ]:
        with pytest.raises(ManifestError, match=message):
            parse_manifest(_raw(_manifest(**overrides)))
    missing = _manifest()
    del missing["config"]
    with pytest.raises(ManifestError, match="missing required field 'config'"):
        parse_manifest(_raw(missing))


def test_index_and_manifest_are_not_confused():
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    assert parse_index(_raw(index)) == index
    assert parse_any(_raw(index)) == (OCI_INDEX, index)
    with pytest.raises(ManifestError, match="image index, not a manifest"):
        parse_manifest(_raw(index))
    with pytest.raises(ManifestError, match="image manifest, not an index"):
        parse_index(_raw(_manifest()))
    with pytest.raises(ManifestError, match="not a manifest media type"):
        parse_manifest(_raw(_manifest()), media_type=OCI_INDEX)


def test_index_platforms_are_checked():
    entry = {"mediaType": OCI_MANIFEST, "size": 1, "digest": f"sha256:{H1}"}
    for platform, message in [
        ({"os": "linux"}, "missing required field 'architecture'"),
        ({"architecture": "amd64", "os": 1}, r"platform\.os: must be a string"),
        ({"architecture": "arm", "os": "linux", "variant": 7}, r"platform\.variant"),
        ({"architecture": "amd64", "os": "linux", "os.features": "x"}, r"os\.features"),
    ]:
        doc = {"schemaVersion": 2, "manifests": [{**entry, "platform": platform}]}
        with pytest.raises(ManifestError, match=message):
            parse_index(_raw(doc))


def test_served_content_type_parameters_are_ignored():
    assert parse_manifest(_raw(_manifest()), media_type=OCI_MANIFEST + "; charset=utf-8")


def test_parse_any_tells_documents_apart():
    assert parse_any(_raw(_manifest()))[0] == OCI_MANIFEST
    no_type = _manifest()
    del no_type["mediaType"]
    assert parse_any(_raw(no_type))[0] == OCI_MANIFEST
    assert parse_any(b'{"imageLayoutVersion": "1.0.0"}')[0] == OCI_LAYOUT_HEADER
    assert parse_any(_raw(_config()))[0] == OCI_CONFIG
    with pytest.raises(ManifestError, match="cannot tell"):
        parse_any(b'{"hello": "world"}')
    with pytest.raises(ManifestError, match="not an image document kiln reads"):
        parse_any(_raw(_manifest()), OCI_LAYER_GZIP)


# ---------------------------------------------------------------- configs and layout header


def test_config_rules():
    for overrides, message in [
        ({"architecture": None}, "config: architecture: must be a string"),
        ({"rootfs": {"type": "layer", "diff_ids": []}}, r"rootfs\.type: must be 'layers'"),
        ({"rootfs": {"type": "layers"}}, "missing required field 'diff_ids'"),
        ({"created": "yesterday"}, "not an RFC 3339 timestamp"),
        ({"created": "2015-13-31T22:22:56Z"}, "not an RFC 3339 timestamp"),
        ({"config": {"ExposedPorts": ["80/tcp"]}}, r"ExposedPorts: must be an object"),
        ({"config": {"Volumes": ["/data"]}}, r"Volumes: must be an object"),
        ({"config": {"Env": ["PATH"]}}, r"Env\[0\]: must look like NAME=value"),
        ({"config": {"Env": ["=x"]}}, r"Env\[0\]"),
        ({"config": {"Env": None}}, r"Env: must be an array"),
        ({"config": {"Cmd": "sh"}}, r"Cmd: must be an array"),
        ({"config": {"Labels": {"a": 1}}}, r"Labels\['a'\]"),
        ({"config": {"ArgsEscaped": "yes"}}, r"ArgsEscaped: must be a boolean"),
        ({"history": [{"empty_layer": "true"}]}, r"history\[0\]\.empty_layer"),
    ]:
        with pytest.raises(ManifestError, match=message):
            parse_config(_raw(_config(**overrides)))
    for key in ("architecture", "os", "rootfs"):
        doc = _config()
        del doc[key]
        with pytest.raises(ManifestError, match=f"missing required field '{key}'"):
            parse_config(_raw(doc))


def test_config_nulls_the_schema_allows_and_docker_writes():
    nullable = _config(config={"Cmd": None, "Entrypoint": None, "Volumes": None, "Labels": None})
    assert parse_config(_raw(nullable)) == nullable
    docker = _config(config={"Env": None, "User": None, "OnBuild": None}, author=None)
    assert parse_config(_raw(docker), media_type=DOCKER_CONFIG) == docker
    with pytest.raises(ManifestError, match="config: author: must be a string, not null"):
        parse_config(_raw(docker))
    with pytest.raises(ManifestError, match=r"config: config\.Env: must be an array, not null"):
        parse_config(_raw(_config(config={"Env": None})), media_type=OCI_CONFIG)
    with pytest.raises(ManifestError, match="config: os: must be a string, not null"):
        parse_config(_raw(_config(os=None)), media_type=DOCKER_CONFIG)
    with pytest.raises(ManifestError, match="not an image config type"):
        parse_config(_raw(_config()), media_type="application/octet-stream")


def test_config_env_values_may_contain_equals_and_be_empty():
    env = ["PATH=/usr/bin", "EMPTY=", "EQ=a=b"]
    assert parse_config(_raw(_config(config={"Env": env})))["config"]["Env"] == env


def test_layout_header_version_must_be_the_string_1_0_0():
    assert parse_layout_header(b'{"imageLayoutVersion":"1.0.0"}')
    for version in ['"1.0.1"', "1", "null", '"1.0.0 "']:
        with pytest.raises(ManifestError, match="oci-layout: imageLayoutVersion: must be"):
            parse_layout_header(b'{"imageLayoutVersion":' + version.encode() + b"}")
    with pytest.raises(ManifestError, match="missing required field 'imageLayoutVersion'"):
        parse_layout_header(b"{}")


# ---------------------------------------------------------------- writing


def test_canonical_json_is_sorted_compact_utf8_and_stable():
    one = {"b": 1, "a": {"z": [1, "é"], "y": None}}
    two = {"a": {"y": None, "z": [1, "é"]}, "b": 1}
    assert canonical_json(one) == canonical_json(two)
    assert canonical_json(one) == '{"a":{"y":null,"z":[1,"é"]},"b":1}'.encode()
    assert canonical_json(json.loads(canonical_json(one))) == canonical_json(one)
    with pytest.raises(ManifestError):
        canonical_json({"size": float("nan")})
    with pytest.raises(ManifestError):
        canonical_json({"a": "\ud800"})


def _kiln_image() -> tuple[Descriptor, list[Descriptor], bytes]:
    config_bytes = canonical_json(_config())
    config = Descriptor(
        OCI_CONFIG, "sha256:" + hashlib.sha256(config_bytes).hexdigest(), len(config_bytes)
    )
    layers = [
        Descriptor(OCI_LAYER_ZSTD, f"sha256:{H1}", 1234),
        Descriptor(
            OCI_LAYER_GZIP,
            f"sha256:{H2}",
            99,
            annotations={"org.opencontainers.image.title": "layer.tar.gz"},
            urls=("https://example.com/layer",),
        ),
        Descriptor(OCI_EMPTY, EMPTY_JSON_DIGEST, 2, data=b"{}", artifact_type="a/b"),
    ]
    return config, layers, config_bytes


def test_descriptors_kiln_builds_round_trip_through_the_readers():
    config, layers, config_bytes = _kiln_image()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
        "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
    }
    raw = canonical_json(manifest)
    parsed = parse_manifest(raw, media_type=OCI_MANIFEST)
    assert parsed == manifest
    assert Descriptor.from_json(parsed["config"], where="manifest.config") == config
    assert [Descriptor.from_json(layer) for layer in parsed["layers"]] == layers
    assert layers[2].to_json()["data"] == "e30="
    assert "data" not in layers[0].to_json() and "urls" not in layers[0].to_json()

    entry = Descriptor(
        OCI_MANIFEST,
        "sha256:" + hashlib.sha256(raw).hexdigest(),
        len(raw),
        platform={"architecture": "arm64", "os": "linux", "variant": "v8"},
        annotations={"org.opencontainers.image.ref.name": "app:1"},
    )
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry.to_json()]}
    parsed_index = parse_index(canonical_json(index))
    assert Descriptor.from_json(parsed_index["manifests"][0]) == entry
    assert parse_config(config_bytes) == _config()
    assert parse_descriptor(canonical_json(entry.to_json())) == entry.to_json()


def test_documents_kiln_builds_pass_the_oci_schemas():
    config, layers, config_bytes = _kiln_image()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    validate_with_schema(canonical_json(manifest), OCI_MANIFEST)
    validate_with_schema(config_bytes, OCI_CONFIG)
    validate_with_schema(layers[1].to_json(), OCI_DESCRIPTOR)
    validate_with_schema(b'{"imageLayoutVersion":"1.0.0"}', OCI_LAYOUT_HEADER)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"digest": "sha256:../../x"}, "invalid digest"),
        ({"digest": "sha256:" + H1.upper()}, "lowercase hex"),
        ({"size": -1}, "out of range"),
        ({"size": True}, "must be an integer"),
        ({"media_type": "tarball"}, "invalid media type"),
        ({"urls": ("ftp//x",)}, "not a URI"),
        ({"data": "e30="}, "data must be bytes"),
        ({"data": b"{}", "size": 3}, "size says 3"),
        ({"platform": {"os": "linux"}}, "architecture"),
    ],
)
def test_descriptor_refuses_to_be_built_wrong(kwargs, message):
    fields = {"media_type": OCI_EMPTY, "digest": EMPTY_JSON_DIGEST, "size": 2, **kwargs}
    with pytest.raises(ManifestError, match=message):
        Descriptor(**fields)


def test_layer_media_types_cover_oci_and_docker():
    assert OCI_LAYER_GZIP in LAYER_MEDIA_TYPES and OCI_LAYER_ZSTD in LAYER_MEDIA_TYPES
    assert "application/vnd.docker.image.rootfs.diff.tar.gzip" in LAYER_MEDIA_TYPES
    assert "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" in LAYER_MEDIA_TYPES
    assert "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" in LAYER_MEDIA_TYPES
    assert OCI_CONFIG not in LAYER_MEDIA_TYPES and OCI_EMPTY not in LAYER_MEDIA_TYPES
    assert (
        base64.b64decode(Descriptor(OCI_EMPTY, EMPTY_JSON_DIGEST, 2, data=b"{}").to_json()["data"])
        == b"{}"
    )
