"""Ignore files: which one applies, how it is read, '!' re-inclusion and subtree pruning."""

from __future__ import annotations

import os
import random
import threading

import pytest

from builder.ignore import (
    MAX_IGNORE_FILE_BYTES,
    IgnoreError,
    IgnoreMatcher,
    find_ignore_file,
    parse_ignore_content,
    read_ignore_file,
)

# -- which file ------------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path):
    ctx = tmp_path / "ctx"
    (ctx / "build").mkdir(parents=True)
    (ctx / "Containerfile").write_text("FROM scratch\n")
    (ctx / "build" / "app.Containerfile").write_text("FROM scratch\n")
    return ctx


def test_no_ignore_file_means_no_patterns(project):
    assert read_ignore_file(project) == []
    assert read_ignore_file(project, project / "Containerfile") == []


def test_containerignore_beats_dockerignore(project):
    (project / ".dockerignore").write_text("from-dockerignore\n")
    assert read_ignore_file(project) == ["from-dockerignore"]
    (project / ".containerignore").write_text("from-containerignore\n")
    assert read_ignore_file(project) == ["from-containerignore"]
    assert find_ignore_file(project) == project / ".containerignore"


def test_file_beside_the_containerfile_beats_the_context_root(project):
    (project / ".containerignore").write_text("root\n")
    (project / ".dockerignore").write_text("root-docker\n")
    containerfile = project / "build" / "app.Containerfile"
    (project / "build" / "app.Containerfile.dockerignore").write_text("beside\n")
    assert read_ignore_file(project, containerfile) == ["beside"]
    (project / "build" / "app.Containerfile.containerignore").write_text("beside-container\n")
    assert read_ignore_file(project, containerfile) == ["beside-container"]
    # Another Containerfile does not pick up app.Containerfile's ignore file.
    assert read_ignore_file(project, project / "Containerfile") == ["root"]


def test_dangling_symlink_counts_as_absent(project):
    (project / ".containerignore").symlink_to("nowhere")
    (project / ".dockerignore").write_text("real\n")
    assert read_ignore_file(project) == ["real"]


def test_reading_rules(project):
    content = (b"\xef\xbb\xbf# a comment on line 1 after the BOM\r\n"
               b"node_modules/\r\n"
               b"  # not a comment\n"
               b"/abs/./path//x/\n"
               b"\n"
               b"   \t\n"
               b"!  /keep/../kept\n"
               b"a/b/../../..\n"
               b"last-without-newline")
    (project / ".dockerignore").write_bytes(content)
    assert read_ignore_file(project) == [
        "node_modules", "# not a comment", "abs/path/x", "!kept", "..", "last-without-newline"]


def test_a_lone_bang_makes_the_matcher_fail():
    patterns = parse_ignore_content(b"*.o\n!\n")
    assert patterns == ["*.o", "!"]
    with pytest.raises(IgnoreError, match="illegal exclusion"):
        IgnoreMatcher(patterns)


def test_bad_pattern_is_an_error_naming_it():
    with pytest.raises(IgnoreError, match=r"src/\[a-"):
        IgnoreMatcher(["ok", "src/[a-"])


def test_oversized_ignore_file_is_refused(project):
    with open(project / ".dockerignore", "wb") as f:
        f.truncate(MAX_IGNORE_FILE_BYTES + 1)
    with pytest.raises(IgnoreError, match="larger than"):
        read_ignore_file(project)


def test_overlong_line_is_refused_like_go_scanner(project):
    (project / ".dockerignore").write_bytes(b"ok\n" + b"x" * 70_000 + b"\n")
    with pytest.raises(IgnoreError, match="line 2"):
        read_ignore_file(project)


def test_ignore_file_that_is_a_directory_is_an_error(project):
    (project / ".dockerignore").mkdir()
    with pytest.raises(IgnoreError, match="not a regular file"):
        read_ignore_file(project)


def test_ignore_file_that_is_a_fifo_does_not_hang(project):
    os.mkfifo(project / ".dockerignore")
    result: list = []

    def read():
        try:
            read_ignore_file(project)
        except IgnoreError as e:
            result.append(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "reading a fifo .dockerignore blocked"
    assert result and "not a regular file" in str(result[0])


# -- matching ---------------------------------------------------------------------------------


def test_exception_under_an_excluded_directory():
    m = IgnoreMatcher(["docs", "!docs/README.md"])
    assert m.matches("docs")
    assert m.matches("docs/guide.md")
    assert m.matches("docs/sub/README.md")
    assert not m.matches("docs/README.md")
    assert not m.matches("other.md")


def test_later_pattern_excludes_again():
    m = IgnoreMatcher(["**", "!util/docker/web", "util/docker/web/foo"])
    assert not m.matches("util/docker/web")
    assert not m.matches("util/docker/web/bar")
    assert m.matches("util/docker/web/foo")
    assert m.matches("util/docker/web/foo/deeper")
    assert m.matches("elsewhere")


def test_docker_quirks_kept():
    assert IgnoreMatcher(["**file"]).matches("dir/myfile")  # suffix, not component-aware
    assert not IgnoreMatcher(["abc/**"]).matches("abc")
    assert IgnoreMatcher(["docs/"]).matches("docs")  # a *file* named docs too
    assert IgnoreMatcher(["a*"]).matches("ab/c")  # a matching parent excludes the child
    assert not IgnoreMatcher(["*.go"]).matches(".")
    assert not IgnoreMatcher(["/foo"]).matches("foo")  # the file reader strips the '/'
    assert IgnoreMatcher(parse_ignore_content(b"/foo\n")).matches("foo")
    # New() cleans before it looks at '!': "!a/../b" collapses to "b", an exclusion no more.
    assert IgnoreMatcher(["!a/../b"]).matches("b")


def test_deliberate_differences_are_literal():
    assert IgnoreMatcher(["a^b*"]).matches("a^bc")
    assert IgnoreMatcher(["a\\d"]).matches("ad")
    assert not IgnoreMatcher(["a\\d"]).matches("a5")


def test_may_match_inside():
    assert not IgnoreMatcher(["docs"]).may_match_inside("docs")
    assert IgnoreMatcher(["docs", "!docs/README.md"]).may_match_inside("docs")
    assert not IgnoreMatcher(["docs", "!docs/README.md"]).may_match_inside("docs/sub")
    assert IgnoreMatcher(["docs", "!docs/**/README.md"]).may_match_inside("docs/sub")
    assert IgnoreMatcher(["build", "!*/keep"]).may_match_inside("build")
    assert not IgnoreMatcher(["build", "!other/keep"]).may_match_inside("build")
    assert not IgnoreMatcher(["build", "!build"]).may_match_inside("other")
    # The exception comes before the pattern that finally excludes the directory: no use.
    assert not IgnoreMatcher(["!docs/README.md", "docs"]).may_match_inside("docs")
    assert not IgnoreMatcher(["docs", "!docs/README.md", "docs"]).may_match_inside("docs")
    assert IgnoreMatcher(["**", "!**/*.go"]).may_match_inside("a/b")
    assert IgnoreMatcher(["*", "!a?c/x"]).may_match_inside("abc")
    assert not IgnoreMatcher(["*", "!a?c/x"]).may_match_inside("ab")
    assert IgnoreMatcher(["*", "![ab]/x"]).may_match_inside("b")
    assert not IgnoreMatcher(["*", "![^ab]/x"]).may_match_inside("b")


# -- randomized: pruning never hides a path the matcher would keep -----------------------------

_NAMES = ["a", "b", "ab", "src", "x.go", "y.txt", ".git", "README.md", "keep"]
_PIECES = ["a", "b", "ab", "src", "*", "?", "**", "*.go", "*.txt", ".git", "README.md", "keep",
           "[ab]", "[^a]*", "a*", "x.*", "s?c"]


def _random_tree(rng: random.Random) -> list[str]:
    paths: set[str] = set()
    for _ in range(60):
        depth = rng.randint(1, 4)
        parts = [rng.choice(_NAMES) for _ in range(depth)]
        for i in range(1, depth + 1):
            paths.add("/".join(parts[:i]))
    return sorted(paths)


def _random_patterns(rng: random.Random) -> list[str]:
    patterns = []
    for _ in range(rng.randint(1, 5)):
        pattern = "/".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 3)))
        patterns.append(("!" if rng.random() < 0.4 else "") + pattern)
    return patterns


def test_may_match_inside_never_prunes_an_included_path():
    rng = random.Random(4)
    pruned = kept_open = 0
    for _ in range(400):
        tree = _random_tree(rng)
        patterns = _random_patterns(rng)
        m = IgnoreMatcher(patterns)
        for d in tree:
            if not m.matches(d):
                continue
            below = [p for p in tree if p.startswith(d + "/")]
            if not below:
                continue
            if m.may_match_inside(d):
                kept_open += 1
            else:
                pruned += 1
                included = [p for p in below if not m.matches(p)]
                assert not included, (patterns, d, included)
    # The check is only worth something if both answers came up often.
    assert pruned > 1000 and kept_open > 50, (pruned, kept_open)


def test_may_match_inside_is_exact_for_literal_exceptions():
    rng = random.Random(7)
    for _ in range(300):
        tree = _random_tree(rng)
        target = rng.choice(tree)
        m = IgnoreMatcher(["*", "!" + target])
        for d in tree:
            if m.matches(d):
                assert m.may_match_inside(d) == target.startswith(d + "/"), (target, d)
