"""ENV, ARG, LABEL, EXPOSE, CMD/ENTRYPOINT and USER as Docker (BuildKit) gives them.

What decides each (moby/buildkit frontend/dockerfile/dockerfile2llb):

* ENV and LABEL: ``dispatch`` expands every word of the instruction with the environment as
  it was before the instruction, then dispatchEnv/dispatchLabel set them all; so
  ``ENV A=new B=$A`` gives B the old A.
* ARG is left out of that expansion: dispatchArg expands each default in turn, after the
  pairs before it on the line are set, so ``ARG A=1 B=$A`` gives B=1 (and so do global ARGs,
  buildMetaArgs).
"""

from __future__ import annotations

import json

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
