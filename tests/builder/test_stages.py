"""The stage graph: names, indexes, ARG in FROM, --target pruning, and errors with file:line."""

from __future__ import annotations

import pytest

from builder.engine import BuildError
from builder.parser import parse
from builder.stages import plan_stages


def plan(text: str, *, target=None, args=None, images=("busybox",)):
    df = parse(text, path="Containerfile")
    return plan_stages(df, build_args=args or {}, target=target,
                       image_exists=lambda ref: ref in images)


def test_names_indexes_and_dependencies():
    p = plan("FROM busybox AS a\nRUN true\nFROM busybox AS b\nCOPY --from=a /x /x\n"
             "FROM b AS c\nCOPY --from=0 /y /y\nFROM busybox AS unused\n", target="c")
    assert [s.name for s in p.needed] == ["a", "b", "c"]
    assert p.stages[2].base_stage == 1 and p.stages[2].deps == {0, 1}
    assert p.lookup("A") is p.stages[0] and p.lookup("1") is p.stages[1]


def test_last_stage_is_the_default_target_and_pruning():
    p = plan("FROM busybox AS a\nFROM busybox AS b\nRUN exit 1\nFROM busybox\n"
             "COPY --from=a /x /x\n")
    assert [s.index for s in p.needed] == [0, 2]


def test_global_args_in_from():
    p = plan("ARG BASE=busybox\nARG TAG\nFROM ${BASE}${TAG:+:$TAG} AS x\n", args={"TAG": "1"})
    assert p.stages[0].base == "busybox:1"
    assert p.stages[0].args["BASE"] == "busybox" and p.stages[0].args["TAG"] == "1"


def test_platform_args_are_predefined():
    p = plan("FROM busybox AS x-${TARGETOS}\n".replace("AS x-${TARGETOS}", "") +
             "ARG TARGETARCH\n")
    assert p.stages[0].args["TARGETOS"] == "linux"
    assert p.stages[0].args["TARGETPLATFORM"].startswith("linux/")
    assert p.stages[0].args["BUILDARCH"] == p.stages[0].args["TARGETARCH"]


@pytest.mark.parametrize("text, message", [
    ("FROM busybox\nCOPY --from=nosuch /a /a\n", "Containerfile:2: --from=nosuch"),
    ("FROM busybox AS a\nCOPY --from=a /a /a\n", "Containerfile:2: --from=a refers to its own"),
    ("FROM busybox AS a\nCOPY --from=b /a /a\nFROM busybox AS b\nCOPY --from=a /a /a\n",
     "Containerfile:2: --from=b refers to a later stage"),
    ("FROM busybox\nCOPY --from=3 /a /a\n", "Containerfile:2: --from=3: there is no stage 3"),
    ("FROM busybox AS a\nFROM busybox AS A\n", "Containerfile:2: duplicate stage name"),
    ("RUN true\nFROM busybox\n", "Containerfile:1: RUN before the first FROM"),
    ("ARG X\nFROM $X\n", "Containerfile:2: FROM names no image"),
    ("FROM busybox AS\n", "Containerfile:1: FROM takes IMAGE [AS NAME]"),
])
def test_errors_name_file_and_line(text, message):
    with pytest.raises(BuildError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan(text)


def test_unknown_target():
    with pytest.raises(BuildError, match="target stage 'nope' not found"):
        plan("FROM busybox AS a\n", target="nope")


def test_from_platform_is_the_host_or_a_clear_error():
    from builder.stages import platform_args

    host = platform_args()["BUILDPLATFORM"]
    plan(f"FROM --platform={host} busybox\nRUN true\n")
    plan("FROM --platform=$BUILDPLATFORM busybox\nRUN true\n")
    other = "linux/arm64" if not host.startswith("linux/arm64") else "linux/amd64"
    with pytest.raises(BuildError, match=rf"Containerfile:2: FROM --platform={other}: kiln "
                                         rf"builds for the host platform \({host}\) only"):
        plan(f"ARG P={other}\nFROM --platform=$P busybox\n")
