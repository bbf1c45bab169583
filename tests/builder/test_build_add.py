"""ADD (local archives, URLs) and COPY (heredocs, --parents, --exclude, --link) end to end."""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import http.server
import io
import json
import lzma
import os
import tarfile
import threading
from pathlib import Path

import pytest
import zstandard

from tests.builder.conftest import build_context as _ctx
from tests.conftest import user_xattrs_work

NO_PROXY = {"NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}


def _run(kb, image: str, script: str) -> str:
    return kb("run", "--rm", image, "sh", "-c", script).out


def _tar(entries: list[tuple]) -> bytes:
    """(name, kind, data, extra) -> a PAX tar; kind: file dir sym hard."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, data, *extra in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_000_000_000
            ti.uid, ti.gid = 1234, 4321
            if kind == "file":
                ti.size, ti.mode = len(data), 0o640
                if extra:
                    ti.pax_headers = extra[0]
                t.addfile(ti, io.BytesIO(data))
                continue
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o750
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, data
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, data
            t.addfile(ti)
    return buf.getvalue()


ARCHIVE = _tar([("pkg", "dir", None), ("pkg/f.txt", "file", b"content\n",
                                       {"SCHILY.xattr.user.kiln": "yes"}),
                ("pkg/hard", "hard", "pkg/f.txt"), ("pkg/sym", "sym", "f.txt"),
                (".wh.not-a-whiteout", "file", b"plain\n"), ("./pkg/../top.txt", "file", b"t\n")])

COMPRESSED = {"a.tar": ARCHIVE, "a.tar.gz": gzip.compress(ARCHIVE),
              "a.tar.bz2": bz2.compress(ARCHIVE), "a.tar.xz": lzma.compress(ARCHIVE),
              "a.tar.zst": zstandard.ZstdCompressor().compress(ARCHIVE)}


# -- local archives ---------------------------------------------------------------------------
def test_add_extracts_tar_gzip_bzip2_xz_and_zstd_archives(kb, broot, tmp_path):
    lines = ["FROM busybox", "RUN mkdir -p /x/tar && echo kept > /x/tar/existing"]
    lines += [f"ADD {name} /x/{name.replace('.', '_')[2:]}" for name in COMPRESSED]
    lines.append("ADD --chown=65534:65534 a.tar.gz /owned/")
    ctx = _ctx(tmp_path, "\n".join(lines) + "\n", COMPRESSED)
    kb("build", "-t", "arch:1", str(ctx))
    for sub in ("tar", "tar_gz", "tar_bz2", "tar_xz", "tar_zst"):
        out = _run(kb, "arch:1", f"cd /x/{sub} && cat pkg/f.txt .wh.not-a-whiteout top.txt && "
                   "stat -c '%a %u %g %Y %h' pkg/f.txt pkg && readlink pkg/sym && "
                   "stat -c %i pkg/f.txt pkg/hard | uniq | wc -l")
        assert out == ("content\nplain\nt\n640 1234 4321 1000000000 2\n750 1234 4321 "
                       "1000000000 2\nf.txt\n1\n"), sub
    assert _run(kb, "arch:1", "cat /x/tar/existing") == "kept\n"  # extraction merges
    assert _run(kb, "arch:1", "stat -c '%u %g' /owned/pkg/f.txt /owned/pkg") == \
        "65534 65534\n65534 65534\n"
    if user_xattrs_work(broot.parent):  # the archive's xattrs are kept, best effort as docker
        diff_id = json.loads(kb("inspect", "arch:1").out)[0]["Layers"][-1]["DiffID"]
        f = broot / "layers" / diff_id.split(":")[1] / "diff" / "owned" / "pkg" / "f.txt"
        assert os.getxattr(f, "user.kiln") == b"yes"


def test_only_tar_archives_are_extracted(kb, tmp_path):
    lone = gzip.compress(b"just text, no tar\n")
    files = {"notes.txt.gz": lone, "empty.tar": b"", "fake.tar.gz": b"\x1f\x8bnot gzip",
             "dir/inner.tar": ARCHIVE}
    cf = ("FROM busybox\nADD notes.txt.gz empty.tar fake.tar.gz /v/\nADD dir/ /d/\n"
          "COPY a.tar /copied.tar\n")
    ctx = _ctx(tmp_path, cf, {**files, "a.tar": ARCHIVE})
    kb("build", "-t", "verb:1", str(ctx))
    out = _run(kb, "verb:1", "cd /v && md5sum notes.txt.gz fake.tar.gz && wc -c < empty.tar && "
               "md5sum /d/inner.tar /copied.tar")
    md5 = {name: hashlib.md5(data).hexdigest() for name, data in files.items()}
    assert out.split() == [md5["notes.txt.gz"], "notes.txt.gz", md5["fake.tar.gz"],
                           "fake.tar.gz", "0", md5["dir/inner.tar"], "/d/inner.tar",
                           md5["dir/inner.tar"], "/copied.tar"]


@pytest.mark.parametrize("entries,reason", [
    ([("../../escaped", "file", b"x")], "outside of the destination"),
    ([("a/../../escaped", "file", b"x")], "outside of the destination"),
    ([("up", "sym", "../../../..")], "points outside of the image's root"),
    ([("h", "hard", "../../etc/passwd")], "outside of the destination"),
], ids=["dotdot", "nested-dotdot", "relative-symlink", "hardlink"])
def test_hostile_archive_is_refused(kb, tmp_path, entries, reason):
    ctx = _ctx(tmp_path, "FROM busybox\nADD evil.tar /x/\n", {"evil.tar": _tar(entries)})
    p = kb("build", str(ctx), check=False)
    assert p.returncode == 125 and "Containerfile:2" in p.err and reason in p.err
    assert not (tmp_path / "escaped").exists() and not Path("/escaped").exists()


def test_absolute_symlink_in_archive_stays_inside_the_destination(kb, tmp_path):
    evil = _tar([("root", "sym", "/"), ("root/etc/kiln-add-escape", "file", b"pwned\n"),
                 ("etc2", "sym", "/etc"), ("etc2/kiln-add-escape2", "file", b"pwned\n")])
    ctx = _ctx(tmp_path, "FROM busybox\nADD evil.tar /x/\n", {"evil.tar": evil})
    kb("build", "-t", "conf:1", str(ctx))
    out = _run(kb, "conf:1", "cat /x/etc/kiln-add-escape /x/etc/kiln-add-escape2; "
               "ls /etc/kiln-add-escape* 2>/dev/null | wc -l")
    assert out == "pwned\npwned\n0\n"
    assert not os.path.exists("/etc/kiln-add-escape")
    assert not os.path.exists("/etc/kiln-add-escape2")


# -- URLs -------------------------------------------------------------------------------------
@pytest.fixture
def http_dir(tmp_path):
    """A local HTTP server (a thread on 127.0.0.1) serving tmp_path/www; yields (base URL,
    the list of requests it saw)."""
    www = tmp_path / "www"
    www.mkdir()
    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            seen.append(f"{self.command} {self.path} {args[1] if len(args) > 1 else ''}")

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", www, seen
    finally:
        server.shutdown()
        server.server_close()


def test_add_url_with_checksum(kb, tmp_path, http_dir):
    base, www, seen = http_dir
    (www / "tool.txt").write_text("downloaded\n")
    os.utime(www / "tool.txt", (1_600_000_000, 1_600_000_000))
    (www / "a.tar.gz").write_bytes(COMPRESSED["a.tar.gz"])
    good = hashlib.sha256(b"downloaded\n").hexdigest()
    cf = (f"FROM busybox\nADD --checksum=sha256:{good} {base}/tool.txt /opt/\n"
          f"ADD {base}/a.tar.gz /archive.tgz\nADD --chmod=755 {base}/tool.txt /bin/tool\n")
    ctx = _ctx(tmp_path, cf)
    kb("build", "-t", "url:1", str(ctx), env=NO_PROXY)
    out = _run(kb, "url:1", "stat -c '%a %Y' /opt/tool.txt /bin/tool && cat /opt/tool.txt && "
               "md5sum < /archive.tgz")
    assert out.split("\n")[:3] == ["600 1600000000", "755 1600000000", "downloaded"]
    assert out.split()[-2] == hashlib.md5(COMPRESSED["a.tar.gz"]).hexdigest()  # not extracted
    # a rebuild: the checksummed step asks nothing, the others get 304 Not Modified
    seen.clear()
    p = kb("build", "-t", "url:1", str(ctx), env=NO_PROXY)
    assert p.err.count("CACHED") == 3
    assert all(" 304" in s for s in seen) and len(seen) == 2, seen  # not 3: one asked nothing

    bad = "0" * 64
    (ctx / "Containerfile").write_text(f"FROM busybox\nADD --checksum=sha256:{bad} "
                                       f"{base}/tool.txt /opt/\n")
    p = kb("build", str(ctx), env=NO_PROXY, check=False)
    assert p.returncode == 125 and "Containerfile:2" in p.err
    assert f"{base}/tool.txt" in p.err and f"sha256:{bad}" in p.err and good in p.err
    (ctx / "Containerfile").write_text(f"FROM busybox\nADD {base}/missing.txt /opt/\n")
    p = kb("build", str(ctx), env=NO_PROXY, check=False)
    assert p.returncode == 125 and "404" in p.err


def test_add_unpack_flag_both_ways(kb, tmp_path, http_dir):
    """ADD --unpack (Dockerfile 1.17): false copies a local archive as a file, true (or the
    flag alone) extracts a downloaded one, which ADD otherwise copies as it is."""
    base, www, _ = http_dir
    (www / "a.tar.gz").write_bytes(COMPRESSED["a.tar.gz"])
    (www / "a.tar").write_bytes(ARCHIVE)
    cf = ("FROM busybox\nADD --unpack=false a.tar.gz /raw/\nADD --unpack=true a.tar /x/\n"
          "ADD --unpack a.tar.gz /y/\n"
          f"ADD {base}/a.tar.gz /remote/\nADD --unpack=true {base}/a.tar.gz /remote-x/\n"
          f"ADD --unpack --chown=5:6 {base}/a.tar /remote-y/\n")
    ctx = _ctx(tmp_path, cf, {"a.tar.gz": COMPRESSED["a.tar.gz"], "a.tar": ARCHIVE})
    kb("build", "-q", "-t", "unpack:1", str(ctx), env=NO_PROXY)
    out = _run(kb, "unpack:1", "md5sum < /raw/a.tar.gz; md5sum < /remote/a.tar.gz; "
               "cat /x/pkg/f.txt /y/pkg/f.txt /remote-x/pkg/f.txt; "
               "stat -c '%n %u:%g' /remote-y/pkg/f.txt /remote-y/top.txt; ls /raw; ls /remote")
    digest = hashlib.md5(COMPRESSED["a.tar.gz"]).hexdigest()
    assert out.split("\n") == [f"{digest}  -", f"{digest}  -", "content", "content", "content",
                               "/remote-y/pkg/f.txt 5:6", "/remote-y/top.txt 5:6",
                               "a.tar.gz", "a.tar.gz", ""]
    (ctx / "Containerfile").write_text("FROM busybox\nADD --unpack=false a.tar /raw/\n")
    kb("build", "-q", "-t", "unpack:2", str(ctx))  # not the cached step that extracted it
    assert _run(kb, "unpack:2", "ls /raw") == "a.tar\n"
    for cf, why in (("COPY --unpack=false a.tar /d/\n", "unknown flag --unpack for COPY"),
                    ("ADD --unpack=maybe a.tar /d/\n", "expects true or false")):
        (ctx / "Containerfile").write_text("FROM busybox\n" + cf)
        p = kb("build", str(ctx), check=False)
        assert p.returncode == 125 and f"{ctx}/Containerfile:2" in p.err and why in p.err, p.err


def test_checksum_needs_one_url_source(kb, tmp_path):
    ctx = _ctx(tmp_path, f"FROM busybox\nADD --checksum=sha256:{'a' * 64} f /f\n", {"f": "x"})
    p = kb("build", str(ctx), check=False)
    assert p.returncode == 125 and "URL" in p.err
    (ctx / "Containerfile").write_text(f"FROM busybox\nCOPY --checksum=sha256:{'a' * 64} f /f\n")
    assert kb("build", str(ctx), check=False).returncode == 125


# -- COPY heredocs, --parents, --exclude, --link ------------------------------------------------
def test_copy_heredocs_with_and_without_expansion(kb, tmp_path):
    cf = ("FROM busybox\nARG WHO=world\nENV GREETING=hello\n"
          "COPY <<EOF /greeting\n$GREETING ${WHO} \"quoted\" '$WHO' \\$WHO\nEOF\n"
          "COPY --chmod=0755 <<'EOF' <<two /docs/\n#!/bin/sh\necho raw $WHO\nEOF\n"
          "second ${WHO:-x}\ntwo\n"
          "ADD <<-EOF /tabs.txt\n\tindented $WHO\n\tEOF\n")
    ctx = _ctx(tmp_path, cf)
    kb("build", "--build-arg", "WHO=kiln", "-t", "hd:1", str(ctx))
    out = _run(kb, "hd:1", "cat /greeting /docs/EOF /docs/two /tabs.txt; "
               "stat -c %a /greeting /docs/EOF")
    assert out == ("hello kiln \"quoted\" 'kiln' $WHO\n#!/bin/sh\necho raw $WHO\n"
                   "second kiln\nindented kiln\n644\n755\n")
    assert _run(kb, "hd:1", "/docs/EOF") == "raw\n"
    p = kb("build", "--build-arg", "WHO=kiln", "-t", "hd:1", str(ctx))
    assert p.err.count("CACHED") == 3
    kb("build", "--build-arg", "WHO=other", "-t", "hd:2", str(ctx))
    assert _run(kb, "hd:2", "cat /greeting") == "hello other \"quoted\" 'other' $WHO\n"
    (ctx / "Containerfile").write_text("FROM busybox\nCOPY <<one <<two /not-a-dir\na\none\n"
                                       "b\ntwo\n")
    p = kb("build", str(ctx), check=False)
    assert p.returncode == 125 and "end with a /" in p.err


def test_copy_parents_exclude_and_link(kb, tmp_path):
    files = {"x/y/a.txt": "a", "x/y/b.md": "b", "z/c.txt": "c", "root.txt": "r",
             "root.md": "m", "src/keep.go": "k", "src/gen/skip.go": "s"}
    cf = ("FROM busybox\n"
          "COPY --parents x/y/*.txt z/c.txt /p/\n"
          "COPY --parents ./x/./y/a.txt /pivot/\n"
          "COPY --exclude=*.md --exclude=z --exclude=src . /ex/\n"
          "COPY --exclude=gen src/ /src/\n"
          "COPY --exclude=*.md root.* /globbed/\n"
          "COPY --link root.txt /linked\n")
    ctx = _ctx(tmp_path, cf, files)
    os.chmod(ctx / "x", 0o700)
    kb("build", "-t", "par:1", str(ctx))
    out = _run(kb, "par:1", "cd / && find p pivot ex src globbed linked | sort; "
               "stat -c %a /p/x")
    assert out.split() == [
        "ex", "ex/Containerfile", "ex/root.txt", "ex/x", "ex/x/y", "ex/x/y/a.txt",
        "ex/x/y/b.md",  # *.md matches at the top only, as in .dockerignore
        "globbed", "globbed/root.txt", "linked",
        "p", "p/x", "p/x/y", "p/x/y/a.txt", "p/z", "p/z/c.txt",
        "pivot", "pivot/y", "pivot/y/a.txt", "src", "src/keep.go", "700"]
    # an excluded file is no part of the step's cache key
    (ctx / "root.md").write_text("changed")
    p = kb("build", "-t", "par:1", str(ctx))
    assert p.err.count("CACHED") == 6
