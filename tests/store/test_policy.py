"""containers-policy.json(5) parsing, scope lookup and identity rules (store/policy.py)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from store.errors import KilnError
from store.policy import (
    AcceptAnything,
    PolicyError,
    Reject,
    SignedIdentity,
    SigstoreSigned,
    default_policy_path,
    load_policy,
    parse_policy,
)

DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32
ACCEPT = {"type": "insecureAcceptAnything"}
REJECT = {"type": "reject"}


def new_public_key() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def keys() -> list[bytes]:
    return [new_public_key() for _ in range(6)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_policy(tmp_path: Path, doc, name: str = "policy.json") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2))
    return path


def signed_with(key: bytes, **extra) -> dict:
    return {"type": "sigstoreSigned", "keyData": b64(key), **extra}


# --- scope lookup -----------------------------------------------------------------------------


@pytest.fixture
def scoped(tmp_path, keys):
    """One policy with a distinct key per scope, so the chosen scope shows in the result."""
    doc = {
        "default": [REJECT],
        "transports": {
            "docker": {
                "*.example.com": [signed_with(keys[0])],
                "registry.example.com": [signed_with(keys[1])],
                "registry.example.com/team": [signed_with(keys[2])],
                "registry.example.com/team/app": [signed_with(keys[3])],
                "registry.example.com/team/app:1.0": [signed_with(keys[4])],
                f"registry.example.com/team/app@{DIGEST}": [signed_with(keys[5])],
                "docker.io/library/busybox": [ACCEPT],
            },
        },
    }
    return load_policy(write_policy(tmp_path, doc))


def chosen_key(policy, reference: str, keys: list[bytes]) -> int:
    (req,) = policy.requirements_for(reference)
    assert isinstance(req, SigstoreSigned)
    return keys.index(req.keys[0])


@pytest.mark.parametrize("reference, key_index", [
    ("registry.example.com/team/app:1.0", 4),          # the exact tagged image
    (f"registry.example.com/team/app@{DIGEST}", 5),   # the exact digest
    ("registry.example.com/team/app:2.0", 3),          # other tag: the repository
    ("registry.example.com/team/app", 3),              # :latest implied
    (f"registry.example.com/team/app@{OTHER_DIGEST}", 3),
    (f"registry.example.com/team/app:1.0@{OTHER_DIGEST}", 3),  # pulled by digest
    ("registry.example.com/team/other:1.0", 2),        # the namespace
    ("registry.example.com/team/sub/deep:x", 2),       # nested namespace
    ("registry.example.com/elsewhere/app", 1),         # the host
    ("mirror.example.com/team/app:1.0", 0),            # *.example.com
    ("a.b.example.com/team/app", 0),                   # wildcard spans levels
    ("registry.example.com:5000/team/app", 0),         # host:port is not the host scope
])
def test_most_specific_docker_scope_wins(scoped, keys, reference, key_index):
    assert chosen_key(scoped, reference, keys) == key_index


def test_scope_labels_name_the_section(scoped):
    assert scoped.scope_for("registry.example.com/team/x") == \
        'transports.docker["registry.example.com/team"]'
    assert scoped.scope_for("quay.io/x/y") == "default"


@pytest.mark.parametrize("reference", ["example.com/app", "quay.io/team/app", "ubuntu"])
def test_unmatched_references_fall_to_default(scoped, reference):
    assert scoped.requirements_for(reference) == [Reject()]


@pytest.mark.parametrize("reference", [
    "busybox", "busybox:1.36", "docker.io/busybox", "index.docker.io/library/busybox:1",
    f"busybox@{DIGEST}",
])
def test_short_names_are_looked_up_fully_expanded(scoped, reference):
    assert scoped.requirements_for(reference) == [AcceptAnything()]


def test_docker_transport_default_beats_global_default(tmp_path):
    policy = load_policy(write_policy(tmp_path, {
        "default": [REJECT],
        "transports": {"docker": {"": [ACCEPT], "quay.io": [REJECT]}},
    }))
    assert policy.requirements_for("ghcr.io/a/b") == [AcceptAnything()]
    assert policy.requirements_for("quay.io/a/b") == [Reject()]
    assert policy.scope_for("ghcr.io/a/b") == 'transports.docker[""]'


def test_short_name_scope_never_matches(tmp_path):
    # containers/image accepts any scope string; "busybox" is not the expanded form.
    policy = load_policy(write_policy(tmp_path, {
        "default": [REJECT], "transports": {"docker": {"busybox": [ACCEPT]}}}))
    assert policy.requirements_for("busybox") == [Reject()]


def test_other_transports_are_parsed_and_ignored(tmp_path, keys):
    policy = load_policy(write_policy(tmp_path, {
        "default": [ACCEPT],
        "transports": {
            "atomic": {"hostname:5000/myns/official": [
                {"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/nonexistent.gpg"}]},
            "dir": {"": [REJECT]},
            "oci": {"/var/images:tag": [signed_with(keys[0])]},
            "made-up-transport": {"anything": [REJECT]},
        },
    }))
    assert policy.requirements_for("hostname:5000/myns/official") == [AcceptAnything()]
    assert {"atomic", "dir", "oci", "made-up-transport"} == set(policy.transports)


def test_all_requirements_of_a_scope_are_returned_in_order(tmp_path, keys):
    policy = load_policy(write_policy(tmp_path, {"default": [
        ACCEPT,
        signed_with(keys[0]),
        signed_with(keys[1], signedIdentity={"type": "matchRepository"}),
        REJECT,
    ]}))
    reqs = policy.requirements_for("quay.io/a/b:1")
    assert reqs[0] == AcceptAnything() and reqs[3] == Reject()
    assert reqs[1] == SigstoreSigned((keys[0],), SignedIdentity("matchRepoDigestOrExact"))
    assert reqs[2] == SigstoreSigned((keys[1],), SignedIdentity("matchRepository"))
    assert reqs[1].origin == f"{tmp_path / 'policy.json'}: default[1]"


# --- keys -------------------------------------------------------------------------------------


def test_key_path_absolute(tmp_path, keys):
    key = tmp_path / "keys" / "cosign.pub"
    key.parent.mkdir()
    key.write_bytes(keys[0])
    policy = load_policy(write_policy(tmp_path, {"default": [
        {"type": "sigstoreSigned", "keyPath": str(key)}]}))
    assert policy.requirements_for("quay.io/a/b")[0].keys == (keys[0],)


def test_relative_key_path_is_resolved_against_the_working_directory(tmp_path, keys,
                                                                     monkeypatch):
    # containers/image hands keyPath to os.ReadFile unchanged: relative to the cwd, not to
    # the policy file's directory.
    (tmp_path / "etc").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "etc" / "cosign.pub").write_bytes(keys[0])
    (tmp_path / "work" / "cosign.pub").write_bytes(keys[1])
    path = write_policy(tmp_path / "etc", {"default": [
        {"type": "sigstoreSigned", "keyPath": "cosign.pub"}]})
    monkeypatch.chdir(tmp_path / "work")
    assert load_policy(path).requirements_for("quay.io/a/b")[0].keys == (keys[1],)


def test_key_paths_give_every_key(tmp_path, keys):
    for i in range(3):
        (tmp_path / f"k{i}.pub").write_bytes(keys[i])
    policy = load_policy(write_policy(tmp_path, {"default": [
        {"type": "sigstoreSigned", "keyPaths": [str(tmp_path / f"k{i}.pub") for i in range(3)]}
    ]}))
    assert policy.requirements_for("quay.io/a/b")[0].keys == tuple(keys[:3])


def test_key_data_and_key_datas_are_base64(tmp_path, keys):
    wrapped = "\n".join(b64(keys[2])[i:i + 64] for i in range(0, len(b64(keys[2])), 64))
    policy = load_policy(write_policy(tmp_path, {"default": [
        {"type": "sigstoreSigned", "keyData": b64(keys[0])},
        {"type": "sigstoreSigned", "keyDatas": [b64(keys[1]), wrapped]},
    ]}))
    first, second = policy.requirements_for("quay.io/a/b")
    assert first.keys == (keys[0],)
    assert second.keys == (keys[1], keys[2])


def test_missing_key_file_fails_only_where_it_is_used(tmp_path):
    path = write_policy(tmp_path, {
        "default": [ACCEPT],
        "transports": {"docker": {"quay.io/signed": [
            {"type": "sigstoreSigned", "keyPath": str(tmp_path / "gone.pub")}]}},
    })
    policy = load_policy(path)
    assert policy.requirements_for("ghcr.io/a/b") == [AcceptAnything()]
    with pytest.raises(PolicyError) as e:
        policy.requirements_for("quay.io/signed/app")
    msg = str(e.value)
    assert str(path) in msg and 'transports.docker["quay.io/signed"][0].keyPath' in msg
    assert "gone.pub" in msg and "No such file" in msg


def test_key_file_that_is_not_a_public_key_is_refused(tmp_path):
    (tmp_path / "cosign.key").write_text("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    policy = load_policy(write_policy(tmp_path, {"default": [
        {"type": "sigstoreSigned", "keyPaths": [str(tmp_path / "cosign.key")]}]}))
    with pytest.raises(PolicyError, match=r"default\[0\]\.keyPaths\[0\]: .*not a PEM public key"):
        policy.requirements_for("quay.io/a/b")


# --- identity rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("identity, signed, image, ok", [
    # matchRepoDigestOrExact (the default): a tag must be signed exactly ...
    ({}, "quay.io/ns/app:1.0", "quay.io/ns/app:1.0", True),
    ({}, "quay.io/ns/app:1.1", "quay.io/ns/app:1.0", False),
    ({}, "quay.io/ns/app", "quay.io/ns/app:latest", False),     # a signature must name a tag
    ({}, "quay.io/ns/app:latest", "quay.io/ns/app", True),      # the pull implies :latest
    ({}, "busybox:latest", "docker.io/library/busybox", True),  # both sides normalised
    ({}, "quay.io/ns/other:1.0", "quay.io/ns/app:1.0", False),
    # ... a digest pull accepts any tag of the same repository
    ({}, "quay.io/ns/app:1.0", f"quay.io/ns/app@{DIGEST}", True),
    ({}, f"quay.io/ns/app@{OTHER_DIGEST}", f"quay.io/ns/app@{DIGEST}", True),
    ({}, "quay.io/ns/other:1.0", f"quay.io/ns/app@{DIGEST}", False),
    ({}, "quay.io/ns/app", f"quay.io/ns/app@{DIGEST}", False),  # still needs a tag/digest
    ({}, "not a reference", "quay.io/ns/app:1.0", False),
    # matchExact: "referencing an image by digest (with a signature claiming a
    # repository:tag identity) will fail"
    ({"type": "matchExact"}, "quay.io/ns/app:1.0", "quay.io/ns/app:1.0", True),
    ({"type": "matchExact"}, "quay.io/ns/app:1.0", f"quay.io/ns/app@{DIGEST}", False),
    ({"type": "matchExact"}, f"quay.io/ns/app@{DIGEST}", f"quay.io/ns/app@{DIGEST}", True),
    ({"type": "matchExact"}, "quay.io/ns/app:1.1", "quay.io/ns/app:1.0", False),
    # matchRepository: pull :latest of an image signed with an exact version
    ({"type": "matchRepository"}, "quay.io/ns/app:1.4", "quay.io/ns/app:latest", True),
    ({"type": "matchRepository"}, "quay.io/ns/app", "quay.io/ns/app:latest", True),
    ({"type": "matchRepository"}, "quay.io/ns/app2:1.4", "quay.io/ns/app:latest", False),
    ({"type": "matchRepository"}, "quay.io/ns:1.4", "quay.io/ns/app:latest", False),
    # exactReference: "when locally mirroring images signed using their public identity"
    ({"type": "exactReference", "dockerReference": "docker.io/library/busybox:1.36"},
     "busybox:1.36", "mirror.local:5000/busybox:1.36", True),
    ({"type": "exactReference", "dockerReference": "docker.io/library/busybox:1.36"},
     "busybox:1.35", "mirror.local:5000/busybox:1.36", False),
    ({"type": "exactReference", "dockerReference": "docker.io/library/busybox:1.36"},
     "mirror.local:5000/busybox:1.36", "mirror.local:5000/busybox:1.36", False),
    # exactRepository: the man page's vendor/product example
    ({"type": "exactRepository", "dockerRepository": "vendor-hostname/product/repository"},
     "vendor-hostname/product/repository:7", "hostname:5000/vendor/product:7", True),
    ({"type": "exactRepository", "dockerRepository": "vendor-hostname/product/repository"},
     "vendor-hostname/product/other:7", "hostname:5000/vendor/product:7", False),
    ({"type": "exactRepository", "dockerRepository": "vendor-hostname/product/repository"},
     "hostname:5000/vendor/product:7", "hostname:5000/vendor/product:7", False),
])
def test_identity_rules(tmp_path, keys, identity, signed, image, ok):
    requirement = signed_with(keys[0])
    if identity:
        requirement["signedIdentity"] = identity
    policy = load_policy(write_policy(tmp_path, {"default": [requirement]}))
    (req,) = policy.requirements_for(image)
    assert req.identity.matches(signed, image) is ok


REMAP = {"type": "remapIdentity", "prefix": "private-mirror:5000/vendor-mirror",
         "signedPrefix": "vendor.example.com"}


@pytest.mark.parametrize("signed, image, ok", [
    # the man page: private-mirror:5000/vendor-mirror/productA/image1:latest "needs to be
    # signed as" vendor.example.com/productA/image1:latest
    ("vendor.example.com/producta/image1:latest",
     "private-mirror:5000/vendor-mirror/producta/image1:latest", True),
    ("vendor.example.com/producta/image1:1.0",
     "private-mirror:5000/vendor-mirror/producta/image1:latest", False),
    ("private-mirror:5000/vendor-mirror/producta/image1:latest",
     "private-mirror:5000/vendor-mirror/producta/image1:latest", False),
    # by digest: any tag of the remapped repository
    ("vendor.example.com/producta/image1:2",
     f"private-mirror:5000/vendor-mirror/producta/image1@{DIGEST}", True),
    # the prefix matches whole path components only; otherwise no remapping takes place
    ("vendor.example.com-x/image1:1",
     "private-mirror:5000/vendor-mirror-x/image1:1", False),
    ("private-mirror:5000/vendor-mirror-x/image1:1",
     "private-mirror:5000/vendor-mirror-x/image1:1", True),
    ("quay.io/elsewhere/app:1", "quay.io/elsewhere/app:1", True),
])
def test_remap_identity(signed, image, ok):
    identity = SignedIdentity("remapIdentity", prefix=REMAP["prefix"],
                              signed_prefix=REMAP["signedPrefix"])
    assert identity.matches(signed, image) is ok


def test_remap_identity_to_a_non_canonical_name_matches_nothing():
    # docker.io/busybox is not the canonical docker.io/library/busybox: containers/image's
    # re-parse refuses it, so nothing can match.
    identity = SignedIdentity("remapIdentity", prefix="mirror.local/library",
                              signed_prefix="docker.io")
    assert not identity.matches("docker.io/library/busybox:1", "mirror.local/library/busybox:1")
    assert not identity.matches("docker.io/busybox:1", "mirror.local/library/busybox:1")


def test_remap_identity_is_parsed_from_the_file(tmp_path, keys):
    policy = load_policy(write_policy(tmp_path, {"default": [REJECT], "transports": {"docker": {
        "private-mirror:5000/vendor-mirror": [signed_with(keys[0], signedIdentity=REMAP)]}}}))
    (req,) = policy.requirements_for("private-mirror:5000/vendor-mirror/producta/image1")
    assert req.identity == SignedIdentity("remapIdentity", prefix=REMAP["prefix"],
                                          signed_prefix=REMAP["signedPrefix"])


# --- the man page's own example ---------------------------------------------------------------


MAN_PAGE_EXAMPLE = """{
    "default": [{"type": "reject"}],
    "transports": {
        "docker": {
            "docker.io/openshift": [{"type": "insecureAcceptAnything"}],
            "docker.io/library/busybox": [{"type": "insecureAcceptAnything"}],
            "*.temporary-project.example.com": [{"type": "insecureAcceptAnything"}],
            "hostname:5000/myns/sigstore-signed-with-full-references": [
                {"type": "sigstoreSigned", "keyPath": "/path/to/sigstore-pubkey.pub"}
            ],
            "hostname:5000/myns/sigstore-signed-fulcio-rekor": [
                {
                    "type": "sigstoreSigned",
                    "fulcio": {
                        "caPath": "/path/to/fulcio_v1.crt.pem",
                        "oidcIssuer": "https://github.com/login/oauth",
                        "subjectEmail": "test-user@example.com"
                    },
                    "rekorPublicKeyPath": "/path/to/rekor.pub"
                }
            ],
            "hostname:5000/myns/sigstore-signed-allows-malicious-tag-substitution": [
                {
                    "type": "sigstoreSigned",
                    "keyPath": "/path/to/sigstore-pubkey.pub",
                    "signedIdentity": {"type": "matchRepository"}
                }
            ]
        },
        "dir": {"": [{"type": "insecureAcceptAnything"}]},
        "atomic": {
            "hostname:5000/myns/official": [
                {"type": "signedBy", "keyType": "GPGKeys",
                 "keyPath": "/path/to/official-pubkey.gpg"}
            ],
            "private-mirror:5000/vendor-mirror": [
                {
                    "type": "signedBy",
                    "keyType": "GPGKeys",
                    "keyPath": "/path/to/vendor-pubkey.gpg",
                    "signedIdentity": {
                        "type": "remapIdentity",
                        "prefix": "private-mirror:5000/vendor-mirror",
                        "signedPrefix": "vendor.example.com"
                    }
                }
            ]
        }
    }
}"""


def test_man_page_example_policy(tmp_path):
    path = write_policy(tmp_path, MAN_PAGE_EXAMPLE)
    policy = load_policy(path)
    assert policy.requirements_for("openshift/origin") == [AcceptAnything()]
    assert policy.requirements_for("busybox") == [AcceptAnything()]
    assert policy.requirements_for("x.temporary-project.example.com/a") == [AcceptAnything()]
    assert policy.requirements_for("alpine") == [Reject()]
    assert policy.requirements_for("temporary-project.example.com/a") == [Reject()]
    with pytest.raises(PolicyError, match="kiln verifies key-based sigstore signatures only"):
        policy.requirements_for("hostname:5000/myns/sigstore-signed-fulcio-rekor:1")
    with pytest.raises(PolicyError, match="/path/to/sigstore-pubkey.pub"):
        policy.requirements_for("hostname:5000/myns/sigstore-signed-with-full-references")


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ('{"default": [{"type": "reject"}]', r"invalid JSON at line 1"),
    ("", r"invalid JSON"),
    ('{"default": [{"type": "reject"}], "default": [{"type": "reject"}]}',
     r"top level: duplicate field 'default'"),
    ('{"default": [{"type": "reject", "type": "reject"}]}',
     r"default\[0\]: duplicate field 'type'"),
    ('{"default": [{"type": "reject"}], "transports": {"docker": {"a": [{"type": "reject"}],'
     ' "a": [{"type": "reject"}]}}}', r"transports\.docker: duplicate field 'a'"),
    ('{"default": [{"type": "reject"}], "Transports": {}}', r"unknown field 'Transports'"),
    ('{"transports": {}}', r"top level: missing field 'default'"),
    ('{"default": []}', r"default: the list of policy requirements must not be empty"),
    ('{"default": [{"type": "reject"}], "transports": {"docker": {"quay.io": []}}}',
     r'transports\.docker\["quay\.io"\]: the list of policy requirements must not be empty'),
    ('{"default": {"type": "reject"}}', r"default: expected an array"),
    ('[{"type": "reject"}]', r"top level: expected an object, found an array"),
    ('{"default": [{"type": "reject"}], "transports": null}',
     r"transports: expected an object, found null"),
    ('{"default": [{"type": "rejected"}]}', r"unknown policy requirement type 'rejected'"),
    ('{"default": [{}]}', r"unknown policy requirement type missing"),
    ('{"default": [{"type": "reject", "why": "x"}]}', r"default\[0\]: unknown field 'why'"),
    ('{"default": [{"type": "insecureAcceptAnything", "keyPath": "/k"}]}',
     r"unknown field 'keyPath'"),
    ('{"default": [{"type": "reject"}], "extra": NaN}', r"invalid JSON"),
])
def test_malformed_policies_are_refused_naming_the_file(tmp_path, text, expected):
    path = write_policy(tmp_path, text)
    with pytest.raises(PolicyError, match=expected) as e:
        load_policy(path)
    assert str(e.value).startswith(f"{path}: ")
    assert isinstance(e.value, KilnError)


def bad_sigstore(key: bytes) -> list[tuple[dict, str]]:
    data = b64(key)
    return [
        ({"type": "sigstoreSigned"}, "exactly one of keyPath, keyPaths, keyData, keyDatas"),
        ({"type": "sigstoreSigned", "keyPath": "/k", "keyData": data},
         "found keyPath, keyData"),
        ({"type": "sigstoreSigned", "keyPath": ""}, r"keyPath: must not be empty"),
        ({"type": "sigstoreSigned", "keyPath": 7}, r"keyPath: expected a string, found a number"),
        ({"type": "sigstoreSigned", "keyPaths": []}, r"keyPaths: contains no entries"),
        ({"type": "sigstoreSigned", "keyDatas": []}, r"keyDatas: contains no entries"),
        ({"type": "sigstoreSigned", "keyData": "%%%"}, r"keyData: is not valid base64"),
        ({"type": "sigstoreSigned", "keyData": b64(b"hello")},
         r"keyData: is not a PEM public key"),
        ({"type": "sigstoreSigned", "keyData": data, "keyPathz": "/k"},
         r"unknown field 'keyPathz'"),
        ({"type": "sigstoreSigned", "keyData": data, "signedIdentity": {"type": "matchAll"}},
         r"signedIdentity: unknown signedIdentity type 'matchAll'"),
        ({"type": "sigstoreSigned", "keyData": data, "signedIdentity": None},
         r"signedIdentity: expected an object, found null"),
        ({"type": "sigstoreSigned", "keyData": data,
          "signedIdentity": {"type": "matchExact", "dockerReference": "a:1"}},
         r"signedIdentity: unknown field 'dockerReference'"),
        ({"type": "sigstoreSigned", "keyData": data,
          "signedIdentity": {"type": "exactReference"}},
         r"signedIdentity: missing field 'dockerReference'"),
        ({"type": "sigstoreSigned", "keyData": data,
          "signedIdentity": {"type": "exactReference", "dockerReference": "quay.io/a/b"}},
         r"signedIdentity\.dockerReference: 'quay\.io/a/b' contains neither a tag nor a digest"),
        ({"type": "sigstoreSigned", "keyData": data,
          "signedIdentity": {"type": "exactRepository", "dockerRepository": "Quay.io/A"}},
         r"signedIdentity\.dockerRepository: invalid image reference"),
        ({"type": "sigstoreSigned", "keyData": data,
          "signedIdentity": {"type": "remapIdentity", "prefix": "quay.io/a:tag",
                             "signedPrefix": "quay.io/b"}},
         r"signedIdentity\.prefix: prefix 'quay\.io/a:tag' is not valid"),
        ({"type": "sigstoreSigned", "keyData": data,
          "signedIdentity": {"type": "remapIdentity", "prefix": "quay.io/a",
                             "signedPrefix": ""}},
         r"signedIdentity\.signedPrefix: prefix '' is not valid"),
        ({"type": "sigstoreSigned", "fulcio": {"caPath": "/ca", "oidcIssuer": "x",
                                               "subjectEmail": "y"}},
         r"fulcio needs one of rekorPublicKeyPath"),
        ({"type": "sigstoreSigned", "keyData": data, "rekorPublicKeyPath": "/r",
          "rekorPublicKeyData": data}, r"at most one of rekorPublicKeyData, rekorPublicKeyPath"),
        ({"type": "signedBy", "keyPath": "/k.gpg"}, r"missing field 'keyType'"),
        ({"type": "signedBy", "keyType": "PGP", "keyPath": "/k.gpg"},
         r"keyType: unrecognized keyType 'PGP'"),
        ({"type": "signedBy", "keyType": "GPGKeys"},
         r"exactly one of keyPath, keyPaths and keyData"),
    ]


def test_malformed_requirements_are_refused_at_load(tmp_path, keys):
    path = tmp_path / "policy.json"
    for requirement, expected in bad_sigstore(keys[0]):
        doc = {"default": [ACCEPT], "transports": {"docker": {"quay.io/x": [requirement]}}}
        path.write_text(json.dumps(doc))
        with pytest.raises(PolicyError) as e:
            load_policy(path)
        message = str(e.value)
        assert message.startswith(f"{path}: transports.docker[\"quay.io/x\"][0]"), message
        assert re.search(expected, message), (expected, message)


@pytest.mark.parametrize("requirement, what", [
    ({"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/etc/pki/rpm-gpg/RPM-GPG-KEY"},
     "signedBy"),
    ({"type": "signedBy", "keyType": "GPGKeys", "keyPaths": []}, "signedBy"),
    ({"type": "signedBaseLayer", "baseLayerIdentity": {"type": "matchRepository"}},
     "signedBaseLayer"),
    ({"type": "sigstoreSigned", "fulcio": {"caPath": "/ca.pem", "oidcIssuer": "https://x",
                                           "subjectEmail": "a@example.com"},
      "rekorPublicKeyPath": "/rekor.pub"}, "fulcio"),
    ({"type": "sigstoreSigned", "keyPath": "/cosign.pub", "rekorPublicKeyPath": "/rekor.pub"},
     "rekorPublicKeyPath"),
    ({"type": "sigstoreSigned", "pki": {"caRootsPath": "/roots.pem",
                                        "subjectEmail": "a@example.com"}}, "pki"),
])
def test_unsupported_requirements_are_refused_where_they_apply(tmp_path, requirement, what):
    path = write_policy(tmp_path, {
        "default": [ACCEPT],
        "transports": {"docker": {"registry.redhat.io": [requirement]}},
    })
    policy = load_policy(path)  # a system policy pinning one registry to GPG still loads
    assert policy.requirements_for("quay.io/a/b") == [AcceptAnything()]
    with pytest.raises(PolicyError) as e:
        policy.requirements_for("registry.redhat.io/ubi9/ubi:latest")
    message = str(e.value)
    assert message.startswith(f'{path}: transports.docker["registry.redhat.io"][0]: ')
    assert what in message
    assert "kiln verifies key-based sigstore signatures only" in message


def test_unsupported_requirement_in_default_is_refused_when_default_applies(tmp_path):
    policy = parse_policy(json.dumps({"default": [
        {"type": "signedBy", "keyType": "GPGKeys", "keyData": b64(b"gpg")}]}).encode(),
        where="<inline>")
    with pytest.raises(PolicyError, match=r"^<inline>: default\[0\]: signedBy"):
        policy.requirements_for("quay.io/a/b")


def test_unreadable_policy_file_is_named(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(PolicyError, match=f"^{path}: cannot read policy file"):
        load_policy(path)


def test_non_utf8_policy_is_refused(tmp_path):
    path = tmp_path / "policy.json"
    path.write_bytes(b'{"default": [{"type": "reject\xff"}]}')
    with pytest.raises(PolicyError, match=f"^{path}: policy is not UTF-8"):
        load_policy(path)


def test_bad_reference_lookup_is_a_policy_error(tmp_path):
    policy = parse_policy(b'{"default": [{"type": "reject"}]}', where="p.json")
    with pytest.raises(PolicyError, match="^p.json: cannot look up policy: invalid image"):
        policy.requirements_for("Not/Valid")


# --- where the file is ------------------------------------------------------------------------


def test_default_policy_path_prefers_the_users_file(tmp_path):
    home = tmp_path / "home"
    system = tmp_path / "etc" / "policy.json"
    assert default_policy_path({"HOME": str(home)}, system_path=system) is None
    system.parent.mkdir()
    system.write_text('{"default": [{"type": "reject"}]}')
    assert default_policy_path({"HOME": str(home)}, system_path=system) == system
    user = home / ".config" / "containers" / "policy.json"
    user.parent.mkdir(parents=True)
    user.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    assert default_policy_path({"HOME": str(home)}, system_path=system) == user
