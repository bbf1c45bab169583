"""Issue 11.1: steps whose diffs are identical (four `RUN true`, a file copied, removed and
copied again) are one layer dir in the store, listed as often as docker lists them; a
container over them mounts that dir once, at its highest place, which is exact."""

from __future__ import annotations

import json

from tests.builder.conftest import build_context


def test_repeated_empty_layers_build_and_run(kb, tmp_path):
    ctx = build_context(tmp_path, "FROM busybox\n" + "RUN true\n" * 4 + "RUN echo ok > /ok\n")
    kb("build", "-t", "dup:1", str(ctx))
    assert kb("run", "--rm", "dup:1", "cat", "/ok").out == "ok\n"
    diff_ids = json.loads(kb("inspect", "dup:1").out)[0]["RootFS"]["diff_ids"]
    assert len(diff_ids) == 6 and len(set(diff_ids[1:5])) == 1  # docker keeps all four


def test_a_layer_repeated_above_what_undid_it_wins(kb, tmp_path):
    ctx = build_context(tmp_path, "FROM busybox\n"
                        "COPY f /d/f\n"
                        "RUN rm -r /d && mkdir /d && echo other > /d/g\n"
                        "COPY f /d/f\n"
                        "RUN ls /d > /listing\n",
                        {"f": "one\n"})
    # clamped times: the dir /d of both COPY layers is then the same whatever second each
    # step ran in (made by the first COPY, copied up and touched by the second)
    kb("build", "--timestamp", "1700000000", "-t", "dup:2", str(ctx))
    diff_ids = json.loads(kb("inspect", "dup:2").out)[0]["RootFS"]["diff_ids"]
    assert diff_ids[1] == diff_ids[3]
    assert kb("run", "--rm", "dup:2", "cat", "/listing", "/d/f").out == "f\ng\none\n"


def test_an_image_with_a_repeated_layer_travels(kb, tmp_path):
    from tests.conftest import KilnCLI

    ctx = build_context(tmp_path, "FROM busybox\nRUN true\nRUN true\nRUN echo ok > /ok\n")
    kb("build", "-t", "dup:3", str(ctx))
    for fmt in ("oci-archive", "docker-archive"):
        archive = tmp_path / f"dup.{fmt}"
        kb("save", "dup:3", "-o", str(archive), "--format", fmt)
        other = KilnCLI(tmp_path / f"other-{fmt}")
        other("load", "-i", str(archive))
        assert other("run", "--rm", "dup:3", "cat", "/ok").out == "ok\n"
