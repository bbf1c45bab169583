import pytest

from store.errors import ReferenceError_
from store.reference import parse_reference

HEX = "a" * 64


@pytest.mark.parametrize("text, want", [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("library/busybox", "docker.io/library/busybox:latest"),
    ("docker.io/busybox", "docker.io/library/busybox:latest"),
    ("index.docker.io/team/app:v1", "docker.io/team/app:v1"),
    ("localhost:5000/x", "localhost:5000/x:latest"),
    ("localhost/x:y", "localhost/x:y"),
    ("127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000/a/b/c:t"),
    ("quay.io/org/app@sha256:" + HEX, "quay.io/org/app@sha256:" + HEX),
    ("quay.io/org/app:1@sha256:" + HEX, "quay.io/org/app:1@sha256:" + HEX),
    ("[::1]:5000/x:y", "[::1]:5000/x:y"),
    ("a__b/c-d.e:T_1.x-", "docker.io/a__b/c-d.e:T_1.x-"),
])
def test_references_normalise_like_docker(text, want):
    assert str(parse_reference(text)) == want


def test_endpoint_for_docker_hub():
    assert parse_reference("busybox").endpoint == "index.docker.io"
    assert parse_reference("ghcr.io/a/b").endpoint == "ghcr.io"


@pytest.mark.parametrize("bad", [
    "", "Busybox", "busybox:", "busybox@sha256:" + "A" * 64, "busybox@sha256:../../x",
    "busybox@md5:abc", "a//b", "-a", "a/", ":tag", "busy box", "x:" + "t" * 129,
    "registry:5000:5000/x", "a/" + "b" * 260, "busybox:tag with space", "x@", "a/../b",
])
def test_invalid_references_are_refused_clearly(bad):
    with pytest.raises(ReferenceError_, match="invalid image reference"):
        parse_reference(bad)
