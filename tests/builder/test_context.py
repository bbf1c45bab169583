"""The build context scanner: what it includes, content digests, the stat cache, COPY selection."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import time
from pathlib import Path

import pytest

from builder.context import RACY_WINDOW_NS, Context, ContextError, ContextFile
from builder.ignore import IgnoreMatcher


def make_tree(root: Path, files: dict[str, bytes | str]) -> Path:
    """Entries: "name/" is a directory, "name -> target" a symlink, else a file."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if name.endswith("/"):
            (root / name).mkdir(parents=True, exist_ok=True)
            continue
        if " -> " in name:
            link, target = name.split(" -> ")
            (root / link).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, root / link)
            continue
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def tree_digest(root: Path, **kw) -> str:
    ctx = Context(root, **kw)
    return ctx.digest_of(ctx.files())


def by_path(entries: list[ContextFile]) -> dict[str, ContextFile]:
    return {e.path: e for e in entries}


SMALL = {"app/main.py": "print('hi')\n", "app/util.py": "X = 1\n", "README.md": "# r\n",
         "data/blob.bin": os.urandom(70_000), "empty/": "", "lib -> app": ""}

BIG_FILES = 3000


@pytest.fixture(scope="module")
def aged(tmp_path_factory):
    """Trees whose files are older than the racy window, so the stat cache may keep them.

    They are built once, then we wait out the window (the only sleep in this file); each test
    that changes files gets a tree of its own.
    """
    base = tmp_path_factory.mktemp("aged")
    trees = {name: make_tree(base / name, SMALL)
             for name in ("warm", "changed", "racy", "ctime", "robust")}
    os.close(os.open(base / "warm" / os.fsencode("caf\xe9-\udcff.bin").decode(
        "utf-8", "surrogateescape"), os.O_CREAT | os.O_WRONLY, 0o644))
    big = base / "big"
    for d in range(30):
        (big / f"pkg{d:02}").mkdir(parents=True)
        for f in range(BIG_FILES // 30):
            (big / f"pkg{d:02}" / f"mod{f:03}.py").write_text(f"# module {d}/{f}\n" * 20)
    trees["big"] = big
    time.sleep(RACY_WINDOW_NS / 1e9 + 0.2)
    return trees


# -- what is in the context ----------------------------------------------------------------------


def test_root_must_be_an_existing_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ContextError, match="not a directory"):
        Context(tmp_path / "file")
    with pytest.raises(ContextError, match="No such file"):
        Context(tmp_path / "missing")


def test_files_records_kinds_modes_and_symlinks_unfollowed(tmp_path):
    root = make_tree(tmp_path / "ctx", {"bin/tool": "#!/bin/sh\n", "conf/a.conf": "a=1\n",
                                        "empty/": "", "passwd -> /etc/passwd": "",
                                        "dangling -> ../../nowhere": "",
                                        "bin/sh -> tool": ""})
    os.chmod(root / "bin" / "tool", 0o4755)
    os.chmod(root / "conf", 0o2750)
    entries = Context(root).files()
    assert [e.path for e in entries] == ["bin", "bin/sh", "bin/tool", "conf", "conf/a.conf",
                                         "dangling", "empty", "passwd"]
    e = by_path(entries)
    assert e["bin/tool"] == ContextFile(
        "bin/tool", "file", 0o4755, 10, None,
        "sha256:" + hashlib.sha256(b"#!/bin/sh\n").hexdigest())
    assert e["conf"].kind == "dir" and e["conf"].mode == 0o2750 and e["conf"].digest is None
    assert e["passwd"].kind == "symlink" and e["passwd"].link_target == "/etc/passwd"
    assert e["passwd"].digest is None  # never followed out of the context
    assert e["dangling"].link_target == "../../nowhere"
    assert e["empty"].kind == "dir"


def test_digest_tracks_content_mode_name_and_link_target_but_not_mtime(tmp_path):
    root = make_tree(tmp_path / "ctx", {"a.txt": "hello\n", "d/b.txt": "bee\n",
                                        "link -> a.txt": ""})
    base = tree_digest(root)
    assert tree_digest(root) == base  # deterministic

    old = os.stat(root / "a.txt")
    os.utime(root / "a.txt", ns=(old.st_atime_ns + 10**9, old.st_mtime_ns + 3600 * 10**9))
    os.utime(root / "d", ns=(0, 0))
    assert tree_digest(root) == base, "touch alone must not change the digest"

    changes = []
    (root / "a.txt").write_text("hellO\n")  # same size
    changes.append(tree_digest(root))
    (root / "a.txt").write_text("hello\n")
    assert tree_digest(root) == base

    os.chmod(root / "d" / "b.txt", 0o600)
    changes.append(tree_digest(root))
    os.chmod(root / "d" / "b.txt", 0o644)
    assert tree_digest(root) == base

    os.rename(root / "d" / "b.txt", root / "d" / "c.txt")
    changes.append(tree_digest(root))
    os.rename(root / "d" / "c.txt", root / "d" / "b.txt")

    os.unlink(root / "link")
    os.symlink("d/b.txt", root / "link")
    changes.append(tree_digest(root))
    os.unlink(root / "link")
    os.symlink("a.txt", root / "link")
    assert tree_digest(root) == base

    (root / "new-empty-dir").mkdir()
    changes.append(tree_digest(root))
    assert len(set(changes)) == len(changes) and base not in changes


def test_digest_of_dest_names(tmp_path):
    one = make_tree(tmp_path / "one", {"src/app.py": "x = 1\n"})
    two = make_tree(tmp_path / "two", {"source/app.py": "x = 1\n"})
    c1, c2 = Context(one), Context(two)
    e1, e2 = c1.select(["src/app.py"]), c2.select(["source/app.py"])
    assert c1.digest_of(e1) != c2.digest_of(e2)  # the names differ
    assert (c1.digest_of(e1, dest_names=["app/app.py"])
            == c2.digest_of(e2, dest_names=["app/app.py"]))
    assert (c1.digest_of(e1, dest_names=["app/app.py"])
            != c1.digest_of(e1, dest_names=["app/main.py"]))
    with pytest.raises(ValueError):
        c1.digest_of(e1, dest_names=[])


def test_special_files_are_refused_for_copy(tmp_path):
    root = make_tree(tmp_path / "ctx", {"ok/file": "x", "run/readme": "r"})
    os.mkfifo(root / "run" / "pipe")
    os.mknod(root / "run" / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    ctx = Context(root)
    assert "run/pipe" not in by_path(ctx.files())
    assert [e.path for e in ctx.select(["ok"])] == ["ok", "ok/file"]
    assert [e.path for e in ctx.select(["run/readme"])] == ["run/readme"]
    for sources, what in [(["run"], "'run/null', a character device"),
                          (["."], "'run/null', a character device"),
                          (["run/pipe"], "'run/pipe', a fifo"),
                          (["run/p*"], "'run/pipe', a fifo")]:
        with pytest.raises(ContextError, match=what):
            ctx.select(sources)


def test_file_gone_before_it_is_read_names_it(tmp_path):
    root = make_tree(tmp_path / "ctx", {"keep": "k", "gone": "g"})
    ctx = Context(root)
    ctx.select(["keep"])  # scans the tree, reads only keep
    os.unlink(root / "gone")
    with pytest.raises(ContextError, match="'gone'.*No such file"):
        ctx.select(["gone"])


# -- select ---------------------------------------------------------------------------------------


@pytest.fixture
def src_tree(tmp_path):
    return make_tree(tmp_path / "ctx", {
        "a.txt": "a", "b.txt": "b", "c.md": "c", "ab.txt": "ab", "weird[1].txt": "w",
        "src/x/main.py": "m", "src/y/main.py": "m2", "src/y/z/main.py": "m3",
        "src/readme.txt": "r", "node_modules/pkg/index.js": "i", "linkdir -> src": "",
    })


def paths(entries):
    return [e.path for e in entries]


def test_select_globs_do_not_cross_slashes(src_tree):
    ctx = Context(src_tree)
    assert paths(ctx.select(["*.txt"])) == ["a.txt", "ab.txt", "b.txt", "weird[1].txt"]
    assert paths(ctx.select(["?.txt"])) == ["a.txt", "b.txt"]
    assert paths(ctx.select(["[ab].txt"])) == ["a.txt", "b.txt"]
    assert paths(ctx.select(["[^a].txt"])) == ["b.txt"]
    assert paths(ctx.select(["weird[[]1].txt"])) == ["weird[1].txt"]
    assert paths(ctx.select(["weird[1].txt"])) == []  # a glob, as in BuildKit
    assert paths(ctx.select(["src/*/main.py"])) == ["src/x/main.py", "src/y/main.py"]
    assert paths(ctx.select(["nothing*"])) == []  # an empty wildcard is not an error


def test_select_directory_means_subtree(src_tree):
    ctx = Context(src_tree)
    assert paths(ctx.select(["src/y"])) == ["src/y", "src/y/main.py", "src/y/z",
                                           "src/y/z/main.py"]
    assert paths(ctx.select(["s*"])) == paths(ctx.select(["src"]))
    # Overlapping sources come back once, sorted.
    assert paths(ctx.select(["src/y/z", "src/y", "a.txt"])) == [
        "a.txt", "src/y", "src/y/main.py", "src/y/z", "src/y/z/main.py"]


def test_select_cleans_leading_slash_and_dot(src_tree):
    ctx = Context(src_tree)
    want = paths(ctx.select(["src/x"]))
    for spelling in ["/src/x", "./src/x", "src/x/", "src//x", "src/y/../x", "///src/./x/."]:
        assert paths(ctx.select([spelling])) == want, spelling
    assert paths(ctx.select(["."])) == paths(ctx.files()) == paths(ctx.select(["/"]))


def test_select_refuses_paths_outside_the_context(src_tree):
    ctx = Context(src_tree)
    for source in ["..", "../x", "src/../../x", "/../etc/passwd", "./.."]:
        with pytest.raises(ContextError, match="outside the build context"):
            ctx.select([source])


def test_select_missing_and_through_symlink(src_tree):
    ctx = Context(src_tree)
    with pytest.raises(ContextError, match="no such file"):
        ctx.select(["a.txt", "missing.txt"])
    with pytest.raises(ContextError, match="'linkdir' is a symlink"):
        ctx.select(["linkdir/x/main.py"])
    assert ctx.select(["linkdir"])[0].kind == "symlink"


def test_ignored_files_are_neither_selected_nor_hashed(src_tree):
    (src_tree / "node_modules" / "huge.bin").write_bytes(b"\0" * 3_000_000)
    (src_tree / "secret.key").write_bytes(b"k" * 500_000)
    ignore = IgnoreMatcher(["node_modules", "*.key", "src/**/main.py", "!src/y/z/main.py"])
    ctx = Context(src_tree, ignore=ignore)
    everything = paths(ctx.files())
    assert "secret.key" not in everything
    assert not [p for p in everything if p.startswith("node_modules")]
    assert ctx.stats["dirs_pruned"] == 1  # node_modules: no '!' can reach into it
    assert "src/y/z/main.py" in everything and "src/x/main.py" not in everything
    assert ctx.stats["bytes_hashed"] < 1000
    with pytest.raises(ContextError, match="excluded by the ignore file"):
        ctx.select(["secret.key"])
    with pytest.raises(ContextError, match="excluded by the ignore file"):
        ctx.select(["node_modules/pkg"])
    assert paths(ctx.select(["*.key"])) == []
    assert paths(ctx.select(["src/y"])) == ["src/y", "src/y/z", "src/y/z/main.py"]


def test_excluded_directory_kept_only_for_what_it_reincludes(tmp_path):
    root = make_tree(tmp_path / "ctx", {"docs/a.md": "a", "docs/README.md": "r",
                                        "docs/img/x.png": "x", "docs/empty/": ""})
    ctx = Context(root, ignore=IgnoreMatcher(["docs", "!docs/README.md"]))
    assert paths(ctx.files()) == ["docs", "docs/README.md"]
    ctx = Context(root, ignore=IgnoreMatcher(["docs", "!docs/nothing-here"]))
    assert paths(ctx.files()) == []


def test_walker_agrees_with_brute_force_matching(tmp_path):
    """Random trees and pattern lists: the pruning walker keeps exactly what matching every
    path would keep (plus the directories that hold kept paths)."""
    rng = random.Random(11)
    names = ["a", "b", "src", "x.go", "y.txt", "keep", ".git"]
    pieces = ["a", "b", "src", "*", "**", "*.go", "keep", "[ab]", "?", ".git", "*.txt"]
    for trial in range(25):
        root = tmp_path / f"t{trial}"
        all_paths: set[str] = set()
        for _ in range(25):
            parts = [rng.choice(names) for _ in range(rng.randint(1, 4))]
            for i in range(1, len(parts) + 1):
                all_paths.add("/".join(parts[:i]))
        dirs = {p.rpartition("/")[0] for p in all_paths} - {""}
        make_tree(root, {p + ("/" if p in dirs else ""): "x" for p in sorted(all_paths)})
        patterns = [("!" if rng.random() < 0.4 else "")
                    + "/".join(rng.choice(pieces) for _ in range(rng.randint(1, 3)))
                    for _ in range(rng.randint(1, 4))]
        m = IgnoreMatcher(patterns)
        kept = {p for p in all_paths if not m.matches(p)}
        expected = kept | {p for p in dirs if any(k.startswith(p + "/") for k in kept)}
        assert set(paths(Context(root, ignore=m).files())) == expected, patterns


# -- the stat cache -------------------------------------------------------------------------------


def test_rescan_with_cache_reads_no_file(aged, tmp_path):
    cache = tmp_path / "cache" / "ctx.json"
    first = Context(aged["warm"], cache_path=cache)
    entries = first.files()
    files = [e for e in entries if e.kind == "file"]
    assert first.stats["files_hashed"] == len(files) == 5
    first.save_cache()
    assert os.listdir(cache.parent) == ["ctx.json"]  # no temp file left behind

    second = Context(aged["warm"], cache_path=cache)
    assert second.files() == entries
    assert second.stats["files_hashed"] == 0 and second.stats["bytes_hashed"] == 0
    assert second.stats["cache_hits"] == len(files)
    assert any("\udcff" in e.path for e in files)  # an undecodable name survives the cache


def test_select_with_cache_reads_nothing_and_counts_only_what_it_used(aged, tmp_path):
    cache = tmp_path / "ctx.json"
    first = Context(aged["warm"], cache_path=cache)
    first.select(["app"])
    first.save_cache()  # only what was hashed is known
    second = Context(aged["warm"], cache_path=cache)
    assert paths(second.select(["app/main.py"])) == ["app/main.py"]
    assert second.stats == {**second.stats, "files_hashed": 0, "cache_hits": 1}
    second.select(["README.md"])
    assert second.stats["files_hashed"] == 1


def test_changed_file_same_size_is_rehashed(aged, tmp_path):
    root, cache = aged["changed"], tmp_path / "ctx.json"
    first = Context(root, cache_path=cache)
    before = by_path(first.files())
    first.save_cache()

    (root / "app" / "util.py").write_text("X = 2\n")  # same size; mtime moves on
    second = Context(root, cache_path=cache)
    after = by_path(second.files())
    assert second.stats["files_hashed"] == 1
    assert second.stats["cache_hits"] == 3
    assert after["app/util.py"].digest == "sha256:" + hashlib.sha256(b"X = 2\n").hexdigest()
    assert after["app/util.py"].digest != before["app/util.py"].digest
    assert second.digest_of(list(after.values())) != first.digest_of(list(before.values()))


def test_racy_entries_are_not_trusted(aged, tmp_path):
    """A file written just before the cache is saved may change again within the same
    timestamp tick without its stat changing; such an entry must not be saved."""
    root, cache = aged["racy"], tmp_path / "ctx.json"
    fresh = root / "fresh.txt"
    fresh.write_text("one\n")
    first = Context(root, cache_path=cache)
    first.files()
    first.save_cache()
    saved = json.loads(cache.read_text())["entries"]
    assert "fresh.txt" not in saved and "app/main.py" in saved

    # Same size, and the mtime put back exactly: only a re-read can notice.
    st = os.stat(fresh)
    fresh.write_text("two\n")
    os.utime(fresh, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = Context(root, cache_path=cache)
    assert by_path(second.files())["fresh.txt"].digest == (
        "sha256:" + hashlib.sha256(b"two\n").hexdigest())
    assert second.stats["files_hashed"] == 1 and second.stats["cache_hits"] == 4


def test_old_mtime_with_fresh_ctime_is_still_racy(aged, tmp_path):
    root, cache = aged["ctime"], tmp_path / "ctx.json"
    target = root / "README.md"
    target.write_text("# s\n")
    os.utime(target, ns=(0, 10**18))  # an mtime from 2001: only the ctime says "just now"
    first = Context(root, cache_path=cache)
    first.files()
    first.save_cache()
    assert "README.md" not in json.loads(cache.read_text())["entries"]
    second = Context(root, cache_path=cache)
    second.files()
    assert second.stats["files_hashed"] == 1


def test_a_bad_or_foreign_cache_is_ignored(aged, tmp_path):
    root, cache = aged["robust"], tmp_path / "ctx.json"
    good = Context(root).files()
    for content in [b"", b"\0\1garbage", b"[]", b'{"format": "other"}',
                    json.dumps({"format": "kiln-context-stat-cache", "version": 99,
                                "root": str(root), "entries": {}}).encode()]:
        cache.write_bytes(content)
        ctx = Context(root, cache_path=cache)
        assert ctx.files() == good
        assert ctx.stats["cache_hits"] == 0
    ctx.save_cache()
    # A valid cache for another context directory is not used for this one.
    other = tmp_path / "other"
    other.mkdir()
    os.rename(root, other / "robust")
    try:
        moved = Context(other / "robust", cache_path=cache)
        moved.files()
        assert moved.stats["cache_hits"] == 0
    finally:
        os.rename(other / "robust", root)


def test_poisoned_cache_entry_with_wrong_stat_is_not_used(aged, tmp_path):
    root, cache = aged["robust"], tmp_path / "ctx.json"
    ctx = Context(root, cache_path=cache)
    ctx.files()
    ctx.save_cache()
    doc = json.loads(cache.read_text())
    doc["entries"]["README.md"][0] += 1  # a size that is not the file's
    doc["entries"]["app/util.py"][5] = "0" * 64
    doc["entries"]["app/util.py"][3] += 1  # another inode
    doc["entries"]["app/main.py"][5] = "../../not-a-digest"
    cache.write_text(json.dumps(doc))
    again = Context(root, cache_path=cache)
    e = by_path(again.files())
    assert again.stats["files_hashed"] == 3
    assert e["app/main.py"].digest.startswith("sha256:") and "not" not in e["app/main.py"].digest
    assert e["app/util.py"].digest == "sha256:" + hashlib.sha256(b"X = 1\n").hexdigest()


def test_three_thousand_files_cached_rescan(aged, tmp_path):
    root, cache = aged["big"], tmp_path / "big.json"
    t0 = time.perf_counter()
    first = Context(root, cache_path=cache)
    entries = first.files()
    first.save_cache()
    cold = time.perf_counter() - t0
    assert first.stats["files_hashed"] == BIG_FILES

    t0 = time.perf_counter()
    second = Context(root, cache_path=cache)
    again = second.files()
    warm = time.perf_counter() - t0
    assert again == entries
    assert second.stats["files_hashed"] == 0 and second.stats["cache_hits"] == BIG_FILES
    print(f"\n{BIG_FILES} files: first scan + hash + save {cold * 1000:.1f} ms, "
          f"cached rescan {warm * 1000:.1f} ms")
    assert warm < 1.0, f"cached rescan took {warm:.3f} s"


def test_hash_ahead_leaves_copy_nothing_to_read(tmp_path):
    import threading

    root = make_tree(tmp_path / "ctx", {f"d{i % 3}/f{i}": f"{i}\n" * i for i in range(30)})
    ctx = Context(root)
    ctx.hash_ahead(threading.Lock(), threading.Event())
    assert ctx.stats["files_hashed"] == 30
    entries = ctx.select(["."])
    assert ctx.stats["files_hashed"] == 30  # COPY read nothing again
    assert ctx.digest_of(entries) == tree_digest(root)


def test_hash_ahead_stops_and_leaves_errors_to_copy(tmp_path, monkeypatch):
    import threading

    import builder.context as context_module

    root = make_tree(tmp_path / "ctx", {"a": "a", "b": "b", "c": "c"})
    stop = threading.Event()
    stop.set()
    ctx = Context(root)
    ctx.hash_ahead(threading.Lock(), stop)
    assert ctx.stats["files_hashed"] == 0
    monkeypatch.setattr(context_module, "HASH_AHEAD_BYTES", 2)  # more than it reads ahead
    ctx.hash_ahead(threading.Lock(), threading.Event())
    assert ctx.stats["files_hashed"] == 0
    monkeypatch.undo()
    ctx = Context(root)
    ctx._scan()
    (root / "a").unlink()  # gone after the scan: hash_ahead says nothing, COPY does
    ctx.hash_ahead(threading.Lock(), threading.Event())
    with pytest.raises(ContextError, match="'a'"):
        ctx.select(["."])
