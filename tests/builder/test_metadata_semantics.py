"""ENV, ARG, LABEL, EXPOSE, CMD/ENTRYPOINT and USER as Docker (BuildKit) gives them.

What decides each (moby/buildkit frontend/dockerfile/dockerfile2llb):

* ENV and LABEL: ``dispatch`` expands every word of the instruction with the environment as
  it was before the instruction, then dispatchEnv/dispatchLabel set them all; so
  ``ENV A=new B=$A`` gives B the old A.
* ARG is left out of that expansion: dispatchArg expands each default in turn, after the
  pairs before it on the line are set, so ``ARG A=1 B=$A`` gives B=1 (and so do global ARGs,
  buildMetaArgs).
* EXPOSE: parsePortSpecs (convert_expose.go) writes one ``port/proto`` key per port of a
  range, lowercases the protocol (tcp, udp or sctp), checks and drops an address and host
  ports, and fails on anything else.
* ENTRYPOINT sets Cmd to null only when no CMD was set in the same stage
  (``if !d.cmd.IsSet``); that flag is the stage's own, not inherited from a parent stage.
* A RUN step as a named USER gets the groups that list it in the image's /etc/group, and its
  primary group (executor/oci GetUser + ensureAdditionalGids), as ``docker run -u`` does.
"""

from __future__ import annotations

import json

import pytest

from tests.builder.conftest import build_context as _ctx


def _config(kb, name: str) -> dict:
    return json.loads(kb("inspect", name).out)[0]["Config"]


def _env(kb, name: str) -> dict[str, str]:
    return dict(e.partition("=")[::2] for e in _config(kb, name)["Env"])


# -- ENV, LABEL, ARG ----------------------------------------------------------------------
def test_env_line_expands_every_word_with_the_values_before_it(kb, tmp_path):
    cf = ("FROM busybox\nENV A=old K=KEY\n"
          "ENV A=new B=$A C=${B:-unset} $K=$K K=changed\n"
          "RUN echo \"$A $B $C $KEY $K\" > /seen\n")
    ctx = _ctx(tmp_path, cf)
    kb("build", "-q", "-t", "envline:1", str(ctx))
    env = _env(kb, "envline:1")
    assert (env["A"], env["B"], env["C"], env["KEY"], env["K"]) == (
        "new", "old", "unset", "KEY", "changed")
    assert kb("run", "--rm", "envline:1", "cat", "/seen").out == "new old unset KEY changed\n"
    # the next line sees them all
    (ctx / "Containerfile").write_text(cf + "ENV D=$B$A\n")
    kb("build", "-q", "-t", "envline:2", str(ctx))
    assert _env(kb, "envline:2")["D"] == "oldnew"


def test_label_line_expands_with_the_env_before_it(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nENV A=env\nLABEL A=label B=$A C=${C:-none}\n")
    kb("build", "-q", "-t", "labelline:1", str(ctx))
    assert _config(kb, "labelline:1")["Labels"] == {"A": "label", "B": "env", "C": "none"}


def test_arg_line_sees_the_pairs_before_it_on_the_line(kb, tmp_path):
    cf = ("ARG G1=g G2=${G1}2\nFROM busybox\nARG G2\nARG A=1 B=$A C=${B}x\n"
          "RUN echo \"$G2 $A $B $C\" > /args\n")
    ctx = _ctx(tmp_path, cf)
    kb("build", "-q", "-t", "argline:1", str(ctx))
    assert kb("run", "--rm", "argline:1", "cat", "/args").out == "g2 1 1 1x\n"
    # a --build-arg for A is what B sees
    kb("build", "-q", "--build-arg", "A=7", "-t", "argline:2", str(ctx))
    assert kb("run", "--rm", "argline:2", "cat", "/args").out == "g2 7 7 7x\n"


# -- EXPOSE -------------------------------------------------------------------------------
def test_expose_ranges_protocols_and_addresses(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nARG P=7000-7001\n"
                         "EXPOSE 80 53/udp 443/TCP 8000-8002 9/sctp $P/UDP\n"
                         "EXPOSE 0.0.0.0:1234-1235:3333-3334/tcp [::1]:80:8080 ::::81 80/tcp\n")
    kb("build", "-q", "-t", "expose:1", str(ctx))
    ports = _config(kb, "expose:1")["ExposedPorts"]
    assert sorted(ports) == sorted([
        "80/tcp", "53/udp", "443/tcp", "8000/tcp", "8001/tcp", "8002/tcp", "9/sctp",
        "7000/udp", "7001/udp", "3333/tcp", "3334/tcp", "8080/tcp", "81/tcp"])
    assert set(map(json.dumps, ports.values())) == {"{}"}


@pytest.mark.parametrize("spec, message", [
    ("80/foo", "EXPOSE 80/foo: invalid protocol 'foo' (tcp, udp or sctp)"),
    ("70000", "EXPOSE 70000: invalid port '70000'"),
    ("http", "EXPOSE http: invalid port 'http'"),
    ("80-70", "EXPOSE 80-70: invalid port range '80-70' (its end is below its start)"),
    ("1-2-3", "EXPOSE 1-2-3: invalid port '1-2-3'"),
    ("/tcp", "EXPOSE /tcp: no port given"),
    ("localhost:80:80", "EXPOSE localhost:80:80: invalid IP address 'localhost'"),
    ("1-3:5-6", "EXPOSE 1-3:5-6: the port ranges 5-6 and 1-3 differ in size"),
])
def test_expose_refuses_what_docker_refuses_with_file_and_line(kb, tmp_path, spec, message):
    ctx = _ctx(tmp_path, f"FROM busybox\nEXPOSE 22 {spec}\n")
    p = kb("build", "-q", "-t", "badexpose:1", str(ctx), check=False)
    assert p.returncode == 125, p.err
    assert f"kiln: error: {ctx / 'Containerfile'}:2: {message}" in p.err, p.err
    assert "Traceback" not in p.err
    assert kb("images", check=False).out.count("badexpose") == 0


# -- CMD and ENTRYPOINT -------------------------------------------------------------------
def test_entrypoint_keeps_a_cmd_set_earlier_in_its_stage(kb, tmp_path):
    ctx = _ctx(tmp_path, 'FROM busybox\nCMD ["arg"]\nENTRYPOINT ["/bin/echo"]\n')
    kb("build", "-q", "-t", "cmdfirst:1", str(ctx))
    cfg = _config(kb, "cmdfirst:1")
    assert (cfg["Entrypoint"], cfg["Cmd"]) == (["/bin/echo"], ["arg"])
    assert kb("run", "--rm", "cmdfirst:1").out == "arg\n"
    # shell forms, with the SHELL of the stage
    (ctx / "Containerfile").write_text('FROM busybox\nSHELL ["/bin/sh", "-ec"]\n'
                                       "CMD echo cmd\nENTRYPOINT echo ep\n")
    kb("build", "-q", "-t", "cmdfirst:2", str(ctx))
    cfg = _config(kb, "cmdfirst:2")
    assert cfg["Cmd"] == ["/bin/sh", "-ec", "echo cmd"]
    assert cfg["Entrypoint"] == ["/bin/sh", "-ec", "echo ep"]


def test_entrypoint_clears_a_cmd_inherited_from_a_parent_stage(kb, tmp_path):
    cf = ('FROM busybox AS parent\nCMD ["from-parent"]\nENTRYPOINT ["/bin/echo"]\n'
          'FROM parent AS child\nENTRYPOINT ["/bin/echo", "child"]\n'
          'FROM parent AS own\nCMD ["own"]\nENTRYPOINT ["/bin/echo", "own"]\n')
    ctx = _ctx(tmp_path, cf)
    kb("build", "-q", "--target", "parent", "-t", "cmdstage:parent", str(ctx))
    assert _config(kb, "cmdstage:parent")["Cmd"] == ["from-parent"]
    kb("build", "-q", "--target", "child", "-t", "cmdstage:child", str(ctx))
    cfg = _config(kb, "cmdstage:child")
    assert cfg["Entrypoint"] == ["/bin/echo", "child"] and cfg.get("Cmd") is None
    assert kb("run", "--rm", "cmdstage:child").out == "child\n"
    kb("build", "-q", "-t", "cmdstage:own", str(ctx))
    assert _config(kb, "cmdstage:own")["Cmd"] == ["own"]
    assert kb("run", "--rm", "cmdstage:own").out == "own own\n"


def test_entrypoint_after_cmd_rebuilds_to_the_same_image(kb, tmp_path):
    ctx = _ctx(tmp_path, 'FROM busybox\nCMD ["a"]\nENTRYPOINT ["/bin/echo"]\n')
    first = kb("build", "-q", "-t", "cmdcache:1", str(ctx)).out.strip()
    assert _config(kb, "cmdcache:1")["Cmd"] == ["a"]
    assert kb("build", "-q", "-t", "cmdcache:1", str(ctx)).out.strip() == first
    assert _config(kb, "cmdcache:1")["Cmd"] == ["a"]  # a cached ENTRYPOINT keeps it too
    # ENTRYPOINT before CMD: the same config, another history
    (ctx / "Containerfile").write_text('FROM busybox\nENTRYPOINT ["/bin/echo"]\nCMD ["a"]\n')
    kb("build", "-q", "-t", "cmdcache:2", str(ctx))
    assert _config(kb, "cmdcache:2")["Cmd"] == ["a"]


# -- USER ---------------------------------------------------------------------------------
def test_run_as_named_user_gets_its_groups_from_the_image(kb, tmp_path):
    cf = ("FROM busybox\n"
          "RUN echo 'app:x:1001:1002:app:/home/app:/bin/sh' >> /etc/passwd && "
          "printf 'grp:x:1002:\\nextra:x:3000:other,app\\nnot:x:3001:other\\n' >> /etc/group\n"
          "RUN id > /id-root\n"
          "USER app\nRUN id > /tmp/id-app\n"
          "USER app:extra\nRUN id > /tmp/id-app-extra\n"
          "USER 1001:1002\nRUN id > /tmp/id-numeric\n"
          "USER 4242\nRUN id > /tmp/id-unknown\n")
    ctx = _ctx(tmp_path, cf)
    kb("build", "-q", "-t", "groups:1", str(ctx))
    out = kb("run", "--rm", "-u", "0", "groups:1", "cat", "/id-root", "/tmp/id-app",
             "/tmp/id-app-extra", "/tmp/id-numeric", "/tmp/id-unknown").out
    assert out.splitlines() == [
        "uid=0(root) gid=0(root) groups=0(root)",
        "uid=1001(app) gid=1002(grp) groups=1002(grp),3000(extra)",
        "uid=1001(app) gid=3000(extra) groups=3000(extra)",
        "uid=1001(app) gid=1002(grp) groups=1002(grp)",
        "uid=4242 gid=0(root) groups=0(root)",
    ]
    # kiln run -u gives the same groups as the build's RUN (docker run does too)
    assert kb("run", "--rm", "-u", "app", "groups:1", "id").out.strip() == out.splitlines()[1]
