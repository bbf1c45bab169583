"""COPY source globs as BuildKit matches them, from the context and from a stage alike.

BuildKit (fsutil's ResolveWildcards) splits a source before its first component with a wildcard,
takes the leading part as a literal directory and matches the rest with Go's filepath.Match:
``*`` stays within one component (``**`` is ``*``), ``\\`` escapes, an empty match is allowed
(AllowEmptyWildcard) but the directory must exist. ``--parents`` sources are include patterns
instead, where ``**`` spans directories (BuildKit's dockerfile_parents_test.go).
"""

from __future__ import annotations

from tests.builder.conftest import build_context as _ctx

TREE = {
    "foo": "foo\n",
    "e/a/b/csub/one.txt": "1\n", "e/a/dsub/two.txt": "2\n", "e/x/y/z/wsub/three.txt": "3\n",
    "x[1]": "bracket\n", "x1": "plain\n", "a?b": "question\n", "aXb": "other\n",
    "order/a/f": "from a\n", "order/a-b/f": "from a-b\n", "empty/.keep": "",
}

# The same tree in a stage, for COPY --from (the context is copied into /ctx first).
STAGE = "FROM busybox AS st\nCOPY . /ctx/\nRUN mkdir /ctx/void\n"


def _tree(kb, tmp_path, containerfile: str, tag: str, where: str) -> list[str]:
    ctx = _ctx(tmp_path, containerfile, TREE)
    kb("build", "-q", "-t", tag, str(ctx))
    out = kb("run", "--rm", tag, "sh", "-c", f"cd / && find {where} | sort").out
    return out.split()


def _fails(kb, tmp_path, containerfile: str) -> str:
    ctx = _ctx(tmp_path, containerfile, TREE, name="bad")
    p = kb("build", str(ctx), check=False)
    assert p.returncode == 125 and "Traceback" not in p.err, p.err
    return p.err


def test_empty_wildcard_next_to_an_existing_source_is_allowed(kb, tmp_path):
    cf = (STAGE + "FROM busybox\nCOPY foo nomatch* /d/\n"
          "COPY --from=st /ctx/foo /ctx/nomatch* /ds/\n")
    assert _tree(kb, tmp_path, cf, "glob-empty:1", "d ds") == ["d", "d/foo", "ds", "ds/foo"]


def test_copy_whose_every_wildcard_matches_nothing_copies_nothing(kb, tmp_path):
    # BuildKit's AllowEmptyWildcard (moby/moby#42600): no error, and no destination made
    for n, cf in enumerate(["FROM busybox\nCOPY nomatch* e/nomatch* e/a/*/none* /none/\n",
                            STAGE + "FROM busybox\nCOPY --from=st /ctx/void/* /none/\n"]):
        ctx = _ctx(tmp_path, cf, TREE, name=f"ctx{n}")
        kb("build", "-q", "-t", f"glob-none:{n}", str(ctx))
        p = kb("run", "--rm", f"glob-none:{n}", "ls", "-d", "/none", check=False)
        assert p.returncode != 0 and "No such file" in p.err + p.out


def test_wildcard_below_a_missing_directory_is_an_error(kb, tmp_path):
    # BuildKit walks the wildcard's directory and fails on lstat (moby/buildkit#2933)
    err = _fails(kb, tmp_path, "FROM busybox\nCOPY foo nodir/* /d/\n")
    assert "Containerfile:2" in err and "'nodir': no such directory" in err
    err = _fails(kb, tmp_path, STAGE + "FROM busybox\nCOPY --from=st /ctx/nodir/*.txt /d/\n")
    assert "ctx/nodir: no such file or directory in stage st" in err


def test_double_star_is_one_component_and_stage_agrees_with_context(kb, tmp_path):
    cf = (STAGE + "FROM busybox\nCOPY e/**/**/*sub/*.txt /g/\n"
          "COPY --from=st /ctx/e/**/**/*sub/*.txt /gs/\n"
          "COPY e/**/*sub /dirs/\nCOPY --from=st /ctx/e/**/*sub /dirss/\n")
    assert _tree(kb, tmp_path, cf, "glob-star:1", "g gs dirs dirss") == [
        "dirs", "dirs/two.txt", "dirss", "dirss/two.txt", "g", "g/one.txt", "gs", "gs/one.txt"]


def test_matches_are_copied_in_walk_order(kb, tmp_path):
    # filepath.Walk visits order/a/f before order/a-b/f ('a' is a prefix), so a-b's lands last
    cf = (STAGE + "FROM busybox\nCOPY order/*/f /d/\nCOPY --from=st /ctx/order/*/f /ds/\n")
    ctx = _ctx(tmp_path, cf, TREE)
    kb("build", "-q", "-t", "glob-order:1", str(ctx))
    out = kb("run", "--rm", "glob-order:1", "cat", "/d/f", "/ds/f").out
    assert out == "from a-b\nfrom a-b\n"


def test_backslash_escapes_a_wildcard_character(kb, tmp_path):
    # The Dockerfile's own escape removes one backslash: \\[ reaches the matcher as \[ .
    cf = (STAGE + "FROM busybox\n"
          "COPY x\\\\[1\\\\]* /esc/\nCOPY --from=st /ctx/x\\\\[1\\\\]* /escs/\n"
          "COPY a\\\\?b* /q/\nCOPY --from=st /ctx/a\\\\?b* /qs/\n"
          "COPY x[[]1] /class/\n")
    assert _tree(kb, tmp_path, cf, "glob-esc:1", "esc escs q qs class") == [
        "class", "class/x[1]", "esc", "esc/x[1]", "escs", "escs/x[1]",
        "q", "q/a?b", "qs", "qs/a?b"]


def test_escaped_wildcard_alone_is_a_literal_name(kb, tmp_path):
    # Without an unescaped wildcard BuildKit takes the path as it is, backslash included
    err = _fails(kb, tmp_path, "FROM busybox\nCOPY \"a\\?b\" /lit/\n")
    assert "no such file or directory in the build context" in err


def test_parents_double_star_spans_directories(kb, tmp_path):
    cf = (STAGE + "FROM busybox\nCOPY --parents e/**/*.txt /par/\n"
          "COPY --from=st --parents /ctx/./e/**/*sub /pars/\n")
    want = ["e", "e/a", "e/a/b", "e/a/b/csub", "e/a/b/csub/one.txt", "e/a/dsub",
            "e/a/dsub/two.txt", "e/x", "e/x/y", "e/x/y/z", "e/x/y/z/wsub",
            "e/x/y/z/wsub/three.txt"]
    got = _tree(kb, tmp_path, cf, "glob-par:1", "par pars")
    assert got == ["par"] + [f"par/{p}" for p in want] + ["pars"] + [f"pars/{p}" for p in want]


def test_parents_wildcard_pivots(kb, tmp_path):
    # BuildKit's testCopyRelativeParents, targets "wildcard", "doublewildcard", "doubleinputs"
    cf = ("FROM busybox AS base\nWORKDIR /test\nRUN mkdir -p a/b/c/d/e a/b2/c/d/e a/b/c2/d/e "
          "a/b/c2/d/e2 && touch a/b/c/d/foo a/b/c/d/e/bay a/b2/c/d/e/bar a/b/c2/d/e/baz "
          "a/b/c2/d/e2/baz\n"
          "FROM busybox\n"
          "COPY --from=base --parents /test/a/./*/c /w/\n"
          "COPY --from=base --parents /test/a/b*/./c/**/e /dw/\n"
          "COPY --from=base --parents /test/a/b/c*/./d/**/baz /test/a/b*/./c/**/bar /di/\n")
    got = _tree(kb, tmp_path, cf, "glob-pivot:1", "w dw di")
    for path in ["w/b/c/d/e", "w/b2/c/d/e/bar", "dw/c/d/e", "dw/c/d/e/bay", "dw/c/d/e/bar",
                 "di/d/e/baz", "di/d/e2/baz", "di/c/d/e/bar"]:
        assert path in got, (path, got)
    assert "di/d/e/bay" not in got and "dw/c/d/foo" not in got


# -- the matcher itself -----------------------------------------------------------------------
def test_split_and_match_as_fsutil_does():
    from builder.globs import has_wildcards, match_parents, match_wildcards, split_wildcards

    assert split_wildcards("e/a/*/x?.txt") == ("e/a", "*/x?.txt")
    assert split_wildcards("a\\?b/c*") == ("a\\?b", "c*")  # an escaped one is no wildcard
    assert split_wildcards("plain/path") == ("plain/path", "")
    assert not has_wildcards("a\\*b") and has_wildcards("a\\\\*b")
    kinds = {"d": "dir", "d/x": "dir", "d/x/y": "file", "d/x/x": "file", "d/xy": "file",
             "f": "file"}
    kind = kinds.get
    assert match_wildcards("plain", kinds, kind) is None
    assert match_wildcards("d/[x/]*", kinds, kind) == ["d/x", "d/xy"]  # '/' only in a class
    assert match_wildcards("f/*", kinds, kind) == []  # a file has nothing below it
    assert match_parents("d/./**/y", kinds, kind) == [("d/x/y", "d")]
    assert match_parents("*/./x", kinds, kind) == [("d/x", "d")]
    # a matched directory is taken whole: nothing below it is matched again
    assert match_parents("**/x", kinds, kind) == [("d/x", "")]


def test_a_wildcard_below_a_symlinked_directory_matches_where_it_leads(kb, tmp_path):
    """BuildKit follows the fixed part's symlinks (inside the source root) before matching,
    in the context and in a stage alike."""
    import os

    ctx = _ctx(tmp_path, "FROM busybox AS st\nCOPY e /e\nRUN ln -s e/a /lnk\n"
                         "FROM busybox\nCOPY lnk/*sub/ /c/\nCOPY --from=st lnk/*sub/ /s/\n",
               TREE)
    os.symlink("e/a", ctx / "lnk")
    kb("build", "-q", "-t", "globlink:1", str(ctx))
    out = kb("run", "--rm", "globlink:1", "sh", "-c", "cd / && find c s | sort").out.split()
    assert out == ["c", "c/two.txt", "s", "s/two.txt"]
