"""COPY --chown, --chmod and hardlinks as Docker (BuildKit) makes them, on real builds.

--chown (BuildKit solver/llbsolver/file/user_linux.go readUser): a numeric user alone is
also the group; a user name gives its uid and primary gid from the image's /etc/passwd; a
name that is not there gives 0, with a warning from kiln. --chmod: octal, or symbolic
(tonistiigi/dchapes-mode, BSD setmode) applied to each file's mode; the directories the
copy creates take an octal mode (fsutil#228, Docker 28.1). Hardlinks: BuildKit's copier
(fsutil copy.go, its inodes map) links the files of one source that are one inode.
"""

from __future__ import annotations

import os

from tests.builder.conftest import build_context as _ctx

USERS = ("RUN echo 'app:x:1000:2000::/home/app:/bin/sh' >> /etc/passwd && "
         "echo 'grp:x:3000:' >> /etc/group\n")


def _stat(kb, image: str, *paths: str) -> list[str]:
    out = kb("run", "--rm", image, "stat", "-c", "%n %04a %u:%g", *paths).out
    return out.splitlines()


# -- --chown ------------------------------------------------------------------------------------
def test_chown_with_a_numeric_user_alone_gives_it_as_the_group_too(kb, tmp_path):
    cf = ("FROM busybox\n" + USERS + "COPY --chown=1234 a.txt /o/\n"
          "COPY --chown=app a.txt /named/\n"
          "COPY --chown=app:grp a.txt /both/\n"
          "COPY --chown=1234:grp a.txt /idgroup/\n")
    kb("build", "-q", "-t", "chown-uid:1", str(_ctx(tmp_path, cf, {"a.txt": "a\n"})))
    assert _stat(kb, "chown-uid:1", "/o", "/o/a.txt", "/named/a.txt", "/both/a.txt",
                 "/idgroup/a.txt") == [
        "/o 0755 1234:1234", "/o/a.txt 0644 1234:1234",  # the uid is the gid (as BuildKit)
        "/named/a.txt 0644 1000:2000",                    # the user's primary group
        "/both/a.txt 0644 1000:3000", "/idgroup/a.txt 0644 1234:3000"]


def test_chown_to_names_the_image_lacks_gives_0_with_a_warning(kb, tmp_path):
    cf = ("FROM busybox\n" + USERS + "COPY --chown=nosuchuser:nosuchgroup a.txt /o/\n"
          "COPY --chown=app:nosuchgroup a.txt /p/\n"
          "FROM scratch AS bare\nCOPY --chown=app a.txt /a.txt\n"
          "FROM busybox\nCOPY --from=0 /o /o\nCOPY --from=0 /p /p\nCOPY --from=bare /a.txt /s\n")
    ctx = _ctx(tmp_path, cf, {"a.txt": "a\n"})
    p = kb("build", "-t", "chown-missing:1", str(ctx))
    # one line each (after the stage's prefix, as stages build at once), naming its line
    warnings = [line[line.index("[Warning]"):].replace(f"{ctx}/", "")
                for line in p.err.splitlines() if "[Warning]" in line]
    assert sorted(warnings) == sorted([
        "[Warning] Containerfile:3: COPY --chown: no user nosuchuser in /etc/passwd, using 0",
        "[Warning] Containerfile:3: COPY --chown: no group nosuchgroup in /etc/group, using 0",
        "[Warning] Containerfile:4: COPY --chown: no group nosuchgroup in /etc/group, "
        "using 2000",
        "[Warning] Containerfile:6: COPY --chown: no user app in /etc/passwd, using 0"]), p.err
    assert _stat(kb, "chown-missing:1", "/o/a.txt", "/p/a.txt", "/s") == [
        "/o/a.txt 0644 0:0", "/p/a.txt 0644 1000:2000", "/s 0644 0:0"]


def test_chown_errors_name_the_containerfile_line(kb, tmp_path):
    cf = "FROM busybox\nRUN rm /etc/passwd && mkdir /etc/passwd\nCOPY --chown=app a.txt /o/\n"
    ctx = _ctx(tmp_path, cf, {"a.txt": "a\n"})
    p = kb("build", str(ctx), check=False)
    assert p.returncode == 125
    assert f"kiln: error: {ctx}/Containerfile:3: COPY --chown: cannot read /etc/passwd in " \
        "the image: Is a directory" in p.err, p.err
    assert "Traceback" not in p.err


def test_owners_and_modes_whatever_the_directory_and_the_umask(kb, tmp_path):
    """The copy skips the chown and chmod that would change nothing: a setgid directory
    (whose group new files take), special bits and kiln's umask must not leak through."""
    cf = ("FROM busybox\nRUN mkdir -m 2775 /sg && chgrp 50 /sg\n"
          "COPY a.txt /sg/plain\nCOPY --chown=0:50 a.txt /sg/group50\n"
          "COPY --chown=0:0 a.txt /sg/root\nCOPY --chmod=0777 a.txt /sg/open\n"
          "COPY --chmod=4755 a.txt /suid\nCOPY --chown=0:50 --chmod=2755 a.txt /sgid\n"
          "COPY a.txt /new/dir/\n")
    ctx = _ctx(tmp_path, cf, {"a.txt": "a\n"})
    old_umask = os.umask(0o077)  # kiln's, inherited
    try:
        kb("build", "-q", "-t", "owners:1", str(ctx))
    finally:
        os.umask(old_umask)
    assert _stat(kb, "owners:1", "/sg/plain", "/sg/group50", "/sg/root", "/sg/open", "/suid",
                 "/sgid", "/new", "/new/dir", "/new/dir/a.txt") == [
        "/sg/plain 0644 0:0", "/sg/group50 0644 0:50", "/sg/root 0644 0:0",
        "/sg/open 0777 0:0", "/suid 4755 0:0", "/sgid 2755 0:50",
        "/new 0755 0:0", "/new/dir 0755 0:0", "/new/dir/a.txt 0644 0:0"]


# -- --chmod ------------------------------------------------------------------------------------
def test_chmod_octal_gives_its_mode_to_the_directories_the_copy_creates(kb, tmp_path):
    cf = ("FROM busybox\nRUN mkdir -m 0750 /existing\n"
          "COPY --chmod=0700 a.txt /secret/deep/a.txt\n"
          "COPY --chmod=755 b.txt /secret/deep/b.txt\n"
          "COPY --chown=7:8 --chmod=0711 a.txt /m/tool\n"
          "COPY --chmod=0600 a.txt /existing/new/\n"
          "COPY --chmod=0640 dir /tree/sub/\n")
    ctx = _ctx(tmp_path, cf, {"a.txt": "a\n", "b.txt": "b\n", "dir/f": "f\n"})
    kb("build", "-q", "-t", "chmod-dirs:1", str(ctx))
    assert _stat(kb, "chmod-dirs:1", "/secret", "/secret/deep", "/secret/deep/a.txt",
                 "/secret/deep/b.txt", "/m", "/m/tool", "/existing", "/existing/new",
                 "/existing/new/a.txt", "/tree", "/tree/sub", "/tree/sub/f") == [
        "/secret 0700 0:0", "/secret/deep 0700 0:0",  # made by the first COPY, as it says
        "/secret/deep/a.txt 0700 0:0", "/secret/deep/b.txt 0755 0:0",
        "/m 0711 7:8", "/m/tool 0711 7:8",
        "/existing 0750 0:0",  # what was there stays as it was
        "/existing/new 0600 0:0", "/existing/new/a.txt 0600 0:0",
        "/tree 0640 0:0", "/tree/sub 0640 0:0", "/tree/sub/f 0640 0:0"]


def test_chmod_symbolic_applies_to_each_file_and_directory(kb, tmp_path):
    cf = ("FROM busybox\nCOPY --chmod=u+x,g-r a.txt /m/a.txt\n"
          "COPY --chmod=g+w,o-r,+X tree /t/\n")
    ctx = _ctx(tmp_path, cf, {"a.txt": "a\n", "tree/plain": "p\n", "tree/tool": "t\n",
                              "tree/sub/f": "f\n"})
    os.chmod(ctx / "a.txt", 0o644)
    os.chmod(ctx / "tree/plain", 0o644)
    os.chmod(ctx / "tree/tool", 0o700)
    os.chmod(ctx / "tree/sub", 0o700)
    os.chmod(ctx / "tree/sub/f", 0o604)
    kb("build", "-q", "-t", "chmod-sym:1", str(ctx))
    assert _stat(kb, "chmod-sym:1", "/m", "/m/a.txt", "/t", "/t/plain", "/t/tool", "/t/sub",
                 "/t/sub/f") == [
        "/m 0755 0:0",  # a symbolic mode leaves the directories the copy makes 0755
        "/m/a.txt 0704 0:0",
        "/t 0755 0:0",
        "/t/plain 0660 0:0",  # no x anywhere: +X adds none
        "/t/tool 0731 0:0",   # x for the owner: +X adds it for all (as the umask lets)
        "/t/sub 0731 0:0",    # a directory: +X adds it
        "/t/sub/f 0620 0:0"]


def test_bad_chmod_is_an_error_at_its_line(kb, tmp_path):
    for value, why in (("u+q", "found 'q' at character 3"), ("0758", "only the digits 0-7"),
                       ("17777", "above 07777"), ("u+x,", "a clause must follow ','")):
        cf = f"FROM busybox\nCOPY --chmod={value} a.txt /a\n"
        ctx = _ctx(tmp_path, cf, {"a.txt": "a\n"})
        p = kb("build", str(ctx), check=False)
        assert p.returncode == 125, p.err
        assert f"kiln: error: {ctx}/Containerfile:2: invalid --chmod '{value}'" in p.err, p.err
        assert why in p.err


# -- hardlinks ----------------------------------------------------------------------------------
def _links(kb, image: str, *paths: str) -> list[str]:
    """Each path with its link count and an id of its inode that is the same for the paths
    that are one inode (the first path of that inode)."""
    out = kb("run", "--rm", image, "stat", "-c", "%n %h %i", *paths).out
    first: dict[str, str] = {}
    rows = []
    for line in out.splitlines():
        name, count, inode = line.split()
        rows.append(f"{name} {count} {first.setdefault(inode, name)}")
    return rows


def test_copy_keeps_the_hardlinks_within_one_source(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox AS src\n"
               "RUN mkdir -p /out/d && echo x > /out/a && ln /out/a /out/b && ln /out/a /out/d/c\n"
               "FROM busybox\nCOPY tree /tree\nCOPY --from=src /out /copied\n"
               "COPY tree/a tree/b /sep/\nCOPY tree/* /glob/\n",
               {"tree/a": "a\n", "tree/sub/c": "c\n", "tree/other": "o\n"})
    os.link(ctx / "tree/a", ctx / "tree/b")
    os.link(ctx / "tree/sub/c", ctx / "tree/sub/d")
    kb("build", "-q", "-t", "links:1", str(ctx))
    assert _links(kb, "links:1", "/tree/a", "/tree/b", "/tree/sub/c", "/tree/sub/d",
                  "/tree/other", "/copied/a", "/copied/b", "/copied/d/c") == [
        "/tree/a 2 /tree/a", "/tree/b 2 /tree/a",
        "/tree/sub/c 2 /tree/sub/c", "/tree/sub/d 2 /tree/sub/c",
        "/tree/other 1 /tree/other",
        "/copied/a 3 /copied/a", "/copied/b 3 /copied/a", "/copied/d/c 3 /copied/a"]
    # each source, and each match of a wildcard, is a copy of its own (as BuildKit's)
    assert _links(kb, "links:1", "/sep/a", "/sep/b", "/glob/a", "/glob/b") == [
        "/sep/a 1 /sep/a", "/sep/b 1 /sep/b", "/glob/a 1 /glob/a", "/glob/b 1 /glob/b"]


def test_linking_context_files_is_a_change_the_copy_sees(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nCOPY tree /tree\n", {"tree/a": "same\n",
                                                            "tree/b": "same\n"})
    kb("build", "-q", "-t", "relink:1", str(ctx))
    assert _links(kb, "relink:1", "/tree/a", "/tree/b") == ["/tree/a 1 /tree/a",
                                                            "/tree/b 1 /tree/b"]
    os.unlink(ctx / "tree/b")
    os.link(ctx / "tree/a", ctx / "tree/b")  # same names, modes and contents: now one inode
    p = kb("build", "-t", "relink:2", str(ctx))
    assert "CACHED" not in p.err, p.err  # the COPY ran again
    assert _links(kb, "relink:2", "/tree/a", "/tree/b") == ["/tree/a 2 /tree/a",
                                                            "/tree/b 2 /tree/a"]
