"""COPY --chown as Docker (BuildKit) makes it, on real builds.

--chown (BuildKit solver/llbsolver/file/user_linux.go readUser): a numeric user alone is
also the group; a user name gives its uid and primary gid from the image's /etc/passwd; a
name that is not there gives 0, with a warning from kiln.
"""

from __future__ import annotations

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
