"""Here-documents in RUN, COPY and ADD, in every form the Dockerfile reference documents.

The expected contents are BuildKit's (frontend/dockerfile/dockerfile_heredoc_test.go): a RUN
line that is a lone ``<<EOF`` runs the body as the shell's command string, or as a script file
when it starts with ``#!``; any other RUN line goes to the shell with its bodies below it, so
the shell feeds them and expands unquoted ones at run time; COPY writes the body as a file,
expanding an unquoted one with the build's ARG and ENV values.
"""

from __future__ import annotations

from tests.builder.conftest import build_context as _ctx


def _contents(kb, tmp_path, containerfile: str, tag: str, files: list[str], *args: str) -> dict:
    ctx = _ctx(tmp_path, containerfile)
    kb("build", "-q", *args, "-t", tag, str(ctx))
    script = "; ".join(f"printf '%s\\0' \"$(cat {f}; echo .)\"" for f in files)
    out = kb("run", "--rm", tag, "sh", "-c", script).out
    # each value went through $(...; echo .): strip the "." that kept trailing newlines
    return dict(zip(files, (v[:-1] for v in out.split("\0")[:-1]), strict=True))


def test_run_heredoc_fed_to_a_command(kb, tmp_path):
    cf = ("FROM busybox\nARG WHO=arg\nENV FOO=env\nWORKDIR /dest\n"
          "RUN cat <<'EOF' > quoted\n$FOO ${WHO}\nEOF\n"
          'RUN cat <<"EOF" > dquoted\n$FOO\nEOF\n'
          "RUN cat <<EOF > unquoted\n$FOO ${WHO} \\$FOO\nEOF\n"
          "RUN sh <<EOF > stdin\necho \"\\$0 $FOO\"\nEOF\n")
    got = _contents(kb, tmp_path, cf, "hd-cmd:1",
                    ["quoted", "dquoted", "unquoted", "stdin"], "--build-arg", "WHO=kiln")
    # quoted: the shell leaves the body alone; unquoted: it expands it, with ENV and ARG values
    assert got == {"quoted": "$FOO ${WHO}\n", "dquoted": "$FOO\n",
                   "unquoted": "env kiln $FOO\n", "stdin": "sh env\n"}


def test_several_heredocs_on_one_line(kb, tmp_path):
    cf = ("FROM busybox\nWORKDIR /dest\n"
          "RUN <<FILE1 cat > file1 && <<FILE2 cat > file2\nI am\nfirst\nFILE1\nI am\nsecond\n"
          "FILE2\n"
          "RUN cat <<EOF1 | tr '[:upper:]' '[:lower:]' > ./out1; \\\n"
          "\tcat <<EOF2 | tr '[:lower:]' '[:upper:]' > ./out2\nhello WORLD\nEOF1\n"
          "HELLO world\nEOF2\n"
          "RUN <<EOF 3<<IN1 4<<IN2 awk -f -\nBEGIN {\n"
          "\twhile ((getline line < \"/proc/self/fd/3\") > 0)\n"
          "\t\tprint tolower(line) > \"./fd3\"\n"
          "\twhile ((getline line < \"/proc/self/fd/4\") > 0)\n"
          "\t\tprint toupper(line) > \"./fd4\"\n"
          "}\nEOF\nhello WORLD\nIN1\nHELLO world\nIN2\n"
          "COPY <<EOF <<EOF2 double/\nfirst file\nEOF\nsecond file\nEOF2\n")
    got = _contents(kb, tmp_path, cf, "hd-many:1",
                    ["file1", "file2", "out1", "out2", "fd3", "fd4", "double/EOF", "double/EOF2"])
    assert got == {"file1": "I am\nfirst\n", "file2": "I am\nsecond\n",
                   "out1": "hello world\n", "out2": "HELLO WORLD\n",
                   "fd3": "hello world\n", "fd4": "HELLO WORLD\n",
                   "double/EOF": "first file\n", "double/EOF2": "second file\n"}


def test_run_heredoc_script_with_shebang_and_shell_instruction(kb, tmp_path):
    cf = ("FROM busybox\nRUN mkdir /dest\n"
          "RUN <<EOF\n#!/bin/awk -f\nBEGIN {\n\tprint \"hello\" >> \"/dest/awk\"\n"
          "\tprint \"world\" >> \"/dest/awk\"\n}\nEOF\n"
          "RUN <<EOF\n#!/bin/sh\necho \"$0\" > /dest/script\nEOF\n"
          "RUN <<EOF\necho \"i am\" >> /dest/basic\nwhoami >> /dest/basic\nEOF\n"
          "SHELL [\"/bin/awk\"]\nRUN <<EOF\nBEGIN {\n\tprint \"foo\" > \"/dest/fake\"\n}\nEOF\n")
    got = _contents(kb, tmp_path, cf, "hd-bang:1",
                    ["/dest/awk", "/dest/script", "/dest/basic", "/dest/fake"])
    assert got == {"/dest/awk": "hello\nworld\n", "/dest/script": "/dev/pipes/EOF\n",
                   "/dest/basic": "i am\nroot\n", "/dest/fake": "foo\n"}


def test_dash_heredocs_strip_leading_tabs(kb, tmp_path):
    cf = ("FROM busybox\nRUN mkdir /dest\n"
          "COPY <<EOF /dest/foo-copy\n\tfoo\nEOF\n"
          "COPY <<-EOF /dest/bar-copy\n\tbar\nEOF\n"
          "RUN <<EOF\necho \"\n\tfoo\" > /dest/foo-run\nEOF\n"
          "RUN <<-EOF\necho \"\n\tbar\" > /dest/bar-run\nEOF\n"
          "RUN <<-EOF\n#!/bin/sh\necho \"\n\tbar\" > /dest/bar2-run\nEOF\n"
          "RUN <<EOF sh > /dest/foo3-run\necho \"\n\tfoo\"\nEOF\n"
          "RUN <<-EOF sh > /dest/bar3-run\necho \"\n\tbar\"\n\tEOF\n")
    files = ["foo-copy", "bar-copy", "foo-run", "bar-run", "bar2-run", "foo3-run", "bar3-run"]
    got = _contents(kb, tmp_path, cf, "hd-tabs:1", [f"/dest/{f}" for f in files])
    assert got == {"/dest/foo-copy": "\tfoo\n", "/dest/bar-copy": "bar\n",
                   "/dest/foo-run": "\n\tfoo\n", "/dest/bar-run": "\nbar\n",
                   "/dest/bar2-run": "\nbar\n", "/dest/foo3-run": "\n\tfoo\n",
                   "/dest/bar3-run": "\nbar\n"}


def test_copy_heredoc_expansion_quotes_and_backslashes(kb, tmp_path):
    cf = ("FROM busybox\nARG name=world\n"
          "COPY <<EOF /dest/c1\nHello ${name}!\nEOF\n"
          "COPY <<'EOF' /dest/c2\nHello ${name}!\nEOF\n"
          "COPY <<\"EOF\" /dest/c3\nHello ${name}!\nEOF\n"
          "COPY <<EOF /dest/q1\nHello '${name}'!\nEOF\n"
          "COPY <<EOF /dest/q2\nHello \"${name}\"!\nEOF\n"
          "COPY <<'EOF' /dest/qs\nHello \"${name}\"!\nEOF\n"
          "COPY <<EOF /dest/quotefile\n\"quotes in file\"\nEOF\n"
          "COPY <<EOF /dest/slash1\n\\\nEOF\n"
          "COPY <<EOF /dest/slash2\n\\\\\nEOF\n"
          "COPY <<EOF /dest/slash3\n\\$\nEOF\n"
          "COPY <<\"EOF\" /dest/raw1\n\\\nEOF\n"
          "COPY <<\"EOF\" /dest/raw3\n\\$\nEOF\n"
          "RUN <<EOF\nname=\"new world\"\necho \"Hello ${name}!\" > /dest/r2\nEOF\n")
    names = ["c1", "c2", "c3", "q1", "q2", "qs", "quotefile", "slash1", "slash2", "slash3",
             "raw1", "raw3", "r2"]
    got = _contents(kb, tmp_path, cf, "hd-exp:1", [f"/dest/{n}" for n in names])
    assert got == {f"/dest/{k}": v for k, v in {
        "c1": "Hello world!\n", "c2": "Hello ${name}!\n", "c3": "Hello ${name}!\n",
        "q1": "Hello 'world'!\n", "q2": "Hello \"world\"!\n", "qs": "Hello \"${name}\"!\n",
        "quotefile": "\"quotes in file\"\n", "slash1": "\n", "slash2": "\\\n",
        "slash3": "$\n", "raw1": "\\\n", "raw3": "\\$\n", "r2": "Hello new world!\n"}.items()}


def test_copy_heredoc_with_chmod_and_chown(kb, tmp_path):
    cf = ("FROM busybox\nRUN echo user:x:1000:1000::/:/bin/sh >> /etc/passwd && "
          "echo user:x:1000: >> /etc/group && mkdir -p /permfiles\n"
          "COPY --chmod=777 <<EOF /permfiles/all\ndummy content\nEOF\n"
          "COPY --chmod=0644 <<EOF /permfiles/rw\ndummy content\nEOF\n"
          "COPY --chown=user:user <<EOF /permfiles/owned\ndummy content\nEOF\n"
          "ADD --chmod=0700 --chown=12:34 <<EOF /permfiles/added\nadded\nEOF\n")
    ctx = _ctx(tmp_path, cf)
    kb("build", "-q", "-t", "hd-perm:1", str(ctx))
    out = kb("run", "--rm", "hd-perm:1", "stat", "-c", "%n %04a %u:%g",
             "/permfiles/all", "/permfiles/rw", "/permfiles/owned", "/permfiles/added").out
    assert out.splitlines() == ["/permfiles/all 0777 0:0", "/permfiles/rw 0644 0:0",
                                "/permfiles/owned 0644 1000:1000",
                                "/permfiles/added 0700 12:34"]


def test_heredoc_scripts_are_part_of_the_cache_key(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nRUN <<EOF\n#!/bin/sh\necho one > /v\nEOF\n")
    kb("build", "-q", "-t", "hd-key:1", str(ctx))
    (ctx / "Containerfile").write_text("FROM busybox\nRUN <<EOF\n#!/bin/sh\necho two > /v\nEOF\n")
    kb("build", "-q", "-t", "hd-key:2", str(ctx))
    assert kb("run", "--rm", "hd-key:2", "cat", "/v").out == "two\n"
