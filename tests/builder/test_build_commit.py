"""A step's layer is committed while the next step runs, and COPY writes into what is there.

The blob of a RUN/COPY layer is written by a thread while the build goes on; these tests
check what a user could notice if that went wrong: layers that differ from their dirs,
steps missing from the cache, leftovers in the store, errors that get lost. The copy
tests check COPY over existing destinations (files, directories, symlinks, duplicates).
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from builder.copy import CopyAction, CopyError, apply_copy
from tests.builder.conftest import build_context as _ctx


def _leftovers(root: Path) -> list[str]:
    return sorted(os.listdir(root / "tmp"))


def test_layers_are_the_tar_of_their_dirs_and_rebuilds_are_cached(kb, broot, tmp_path):
    from store.layer_writer import write_layer
    from store.store import Store

    files = {f"src/m{i // 10}/f{i}.txt": f"line {i}\n" * (i + 1) for i in range(60)}
    # commits overlap (up to two at a time) with the steps after them, metadata steps among
    ctx = _ctx(tmp_path, "FROM busybox\nRUN echo base > /base\nENV E=1\nWORKDIR /app\n"
               "COPY . .\nRUN cat src/*/*.txt | wc -l > /lines\nLABEL x=y\n"
               "COPY Containerfile /again\nRUN echo done > /done\nCMD [\"true\"]\n", files)
    (ctx / "link").symlink_to("src")
    first = kb("build", "-q", "--timestamp", "1700000000", "-t", "cm:1", str(ctx)).out.strip()
    assert _leftovers(broot) == []
    assert kb("run", "--rm", "cm:1", "cat", "/base", "/lines", "/done").out == \
        "base\n1830\ndone\n"

    store = Store(broot)
    image = store.image("cm:1")
    diff_ids = image.config()["rootfs"]["diff_ids"]
    layers = list(image.layers())
    assert [la.diff_id for la in layers] == diff_ids and len(layers) == 7
    for la in layers[1:]:  # the steps' layers (the base is kiln import's)
        out = io.BytesIO()
        blob = write_layer(store.layer_dir(la.diff_id), out, compression="zstd",
                           source_date_epoch=1700000000)
        assert (blob.diff_id, blob.digest, blob.size) == (la.diff_id, la.digest, la.size)
    # each layer is its step's diff only
    assert sorted(os.listdir(store.layer_dir(layers[4].diff_id))) == ["lines"]
    assert sorted(os.listdir(store.layer_dir(layers[6].diff_id))) == ["done"]

    p = kb("build", "--timestamp", "1700000000", "-t", "cm:1", str(ctx))
    assert p.err.count("--> CACHED") == 6, p.err
    again = kb("build", "-q", "--timestamp", "1700000000", "-t", "cm:1", str(ctx)).out.strip()
    assert again == first
    # without a timestamp, the same image again only if every step's record was kept,
    # the metadata steps' (LABEL, CMD) written once the commits before them finished
    with open(ctx / "src" / "m0" / "f0.txt", "a") as f:
        f.write("changed\n")
    one = kb("build", "-q", str(ctx)).out.strip()
    time.sleep(1.1)  # history times have whole seconds
    assert kb("build", "-q", str(ctx)).out.strip() == one
    assert _leftovers(broot) == []


def test_a_failing_step_keeps_the_step_before_it_cached(kb, broot, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nCOPY data/ /c/\nRUN sh -c 'exit 3'\n",
               {f"data/f{i}": str(i) for i in range(20)})
    p = kb("build", str(ctx), check=False)
    assert p.returncode == 125 and "exited with code 3" in p.err
    assert _leftovers(broot) == []
    (ctx / "Containerfile").write_text("FROM busybox\nCOPY data/ /c/\nRUN ls /c | wc -l > /n\n")
    p = kb("build", "-t", "fail:1", str(ctx))
    assert p.err.count("--> CACHED") == 1, p.err  # the COPY
    assert kb("run", "--rm", "fail:1", "cat", "/n").out == "20\n"


@pytest.mark.parametrize("then", ["", "RUN echo next > /n\n"])
def test_a_layer_that_cannot_be_written_fails_the_build(kb, broot, tmp_path, then):
    # a deleted /bin/vi (an overlay whiteout) and a file named .wh.vi: the same tar name
    ctx = _ctx(tmp_path, "FROM busybox\nRUN rm /bin/vi && touch /bin/.wh.vi\n" + then)
    p = kb("build", "-t", "bad:1", str(ctx), check=False)
    assert p.returncode == 125
    assert "two entries map to the same tar name" in p.err and "bin/.wh.vi" in p.err
    assert _leftovers(broot) == []
    assert kb("images").out.count("bad") == 0


# -- apply_copy over existing destinations ------------------------------------------------


def _file(src: str, dest: str, mode: int = 0o644) -> CopyAction:
    return CopyAction(src, dest, "file", mode)


@pytest.fixture
def src(tmp_path) -> Path:
    s = tmp_path / "src"
    s.mkdir()
    (s / "a").write_text("new a")
    (s / "b").write_text("new b")
    (s / "sub").mkdir()
    (s / "sub" / "a").write_text("other a")
    return s


@pytest.fixture
def root(tmp_path) -> Path:
    r = tmp_path / "root"
    (r / "dst" / "adir").mkdir(parents=True)
    (r / "dst" / "old").write_text("old")
    (r / "elsewhere").mkdir()
    (r / "dst" / "tolink").symlink_to("/elsewhere/victim")
    (r / "dst" / "dangling").symlink_to("nowhere")
    (r / "dst" / "dirlink").symlink_to("/elsewhere")
    return r


def test_copy_creates_new_files_with_their_modes(src, root):
    apply_copy(str(root), str(src), [_file("a", "/dst/new", 0o751), _file("b", "/made/b")],
               uid=12, gid=34)
    new = root / "dst" / "new"
    assert new.read_text() == "new a" and (new.stat().st_mode & 0o7777) == 0o751
    assert (new.stat().st_uid, new.stat().st_gid) == (12, 34)
    assert (root / "made" / "b").read_text() == "new b"
    assert (root / "made").stat().st_uid == 12


def test_copy_to_a_symlink_writes_where_it_leads_inside_root(src, root):
    # the destination as written has its symlinks followed inside the root, as BuildKit's
    # (fs.RootPath): the link stays, what it points to gets the file, never the host's
    apply_copy(str(root), str(src), [_file("a", "/dst/old", 0o600), _file("a", "/dst/tolink"),
                                     _file("b", "/dst/dangling")])
    assert (root / "dst" / "old").read_text() == "new a"
    assert (root / "dst" / "old").stat().st_mode & 0o777 == 0o600
    assert os.readlink(root / "dst" / "tolink") == "/elsewhere/victim"
    assert (root / "elsewhere" / "victim").read_text() == "new a"
    assert os.readlink(root / "dst" / "dangling") == "nowhere"
    assert (root / "dst" / "nowhere").read_text() == "new b"
    assert not os.path.exists("/elsewhere/victim")


def test_an_entry_below_the_destination_replaces_a_symlink(src, root):
    # a file inside a copied directory (or named after its source in a destination dir)
    # takes the place of a symlink there, which is not followed
    apply_copy(str(root), str(src), [
        CopyAction("a", "/dst/tolink", "file", 0o644, at_dest=False),
        CopyAction("b", "/dst/dangling", "file", 0o644, at_dest=False)])
    for name, text in (("tolink", "new a"), ("dangling", "new b")):
        p = root / "dst" / name
        assert not p.is_symlink() and p.read_text() == text
    assert os.listdir(root / "elsewhere") == []


def test_copy_into_an_existing_directory_and_duplicates_last_wins(src, root):
    apply_copy(str(root), str(src), [_file("a", "/dst/adir"), _file("a", "/dst/twice"),
                                     _file("sub/a", "/dst/twice")])
    assert (root / "dst" / "adir" / "a").read_text() == "new a"
    assert (root / "dst" / "twice").read_text() == "other a"


def test_copy_through_a_symlinked_parent_stays_inside_root(src, root):
    apply_copy(str(root), str(src), [_file("a", "/dst/dirlink/x")])
    assert (root / "elsewhere" / "x").read_text() == "new a"


def test_a_missing_source_fails_and_names_it(src, root):
    with pytest.raises(CopyError, match="copying nosuch to /dst/old: No such file"):
        apply_copy(str(root), str(src), [_file("nosuch", "/dst/old")])
