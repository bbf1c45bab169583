"""kiln's Containerfile parser: behaviour beyond BuildKit's corpus (see test_parser_corpus.py)."""

from __future__ import annotations

import random

import pytest

from builder.parser import (
    MAX_FILE_SIZE,
    MAX_LOGICAL_LINE,
    MAX_PHYSICAL_LINE,
    Dockerfile,
    Heredoc,
    ParseError,
    dump,
    parse,
    parse_file,
    parse_flags,
)
from store.errors import KilnError


def only(text: str, **kw):
    df = parse(text, **kw)
    assert len(df.instructions) == 1, df.instructions
    return df.instructions[0]


def error_of(text, path="Containerfile", **kw) -> str:
    with pytest.raises(ParseError) as err:
        parse(text, path, **kw)
    assert isinstance(err.value, KilnError)
    return str(err.value)


# ------------------------------------------------------------------ directives


def test_backtick_escape_directive():
    df = parse("# escape=`\nFROM scratch\nRUN dir C:\\ `\n  && echo done\nCOPY a\\b c\\\n")
    assert df.escape == "`"
    assert df.directives == {"escape": "`"}
    run, copy = df.instructions[1:]
    assert run.args == ("dir C:\\   && echo done",)
    assert (run.line, run.end_line) == (3, 4)
    # a trailing backslash is plain text under the backtick escape
    assert copy.args == ("a\\b", "c\\")


def test_directives_syntax_and_check_recorded_and_key_case_insensitive():
    df = parse("# SYNTAX = docker/dockerfile:1.7 \n#check=skip=all\n\nFROM scratch\n")
    assert df.directives == {"syntax": "docker/dockerfile:1.7", "check": "skip=all"}
    assert df.escape == "\\"


@pytest.mark.parametrize("text", [
    "FROM scratch\n# escape=`\nRUN a \\\n b\n",          # after an instruction
    "# hello\n# escape=`\nFROM scratch\nRUN a \\\n b\n",  # after an ordinary comment
    "\n# escape=`\nFROM scratch\nRUN a \\\n b\n",         # after a blank line
    "# unknown=1\n# escape=`\nFROM scratch\nRUN a \\\n b\n",  # after an unknown key
])
def test_directives_only_count_at_the_very_top(text):
    df = parse(text)
    assert df.escape == "\\"
    assert "escape" not in df.directives
    assert df.instructions[-1].args == ("a  b",)


def test_repeated_directive_is_an_error_with_its_line():
    assert error_of("# escape=`\n# escape=\\\nFROM x\n", "df").startswith(
        "df:2: only one escape parser directive can be used")


def test_invalid_escape_value():
    assert error_of("# escape=x\nFROM x\n").startswith("Containerfile:1: invalid escape token")


# ------------------------------------------------------------------ lines


def test_bom_is_stripped_from_bytes_and_str():
    for text in (b"\xef\xbb\xbf# escape=`\nFROM a\n", "\ufeff# escape=`\nFROM a\n"):
        df = parse(text)
        assert df.escape == "`"
        assert df.instructions[0].args == ("a",)


def test_crlf_lines():
    text = b"FROM a\r\nRUN one \\\r\n  two\r\nRUN <<EOF\r\nbody\r\nEOF\r\nENV K=v\r\n"
    df = parse(text)
    assert [i.cmd for i in df.instructions] == ["FROM", "RUN", "RUN", "ENV"]
    assert df.instructions[0].args == ("a",)
    assert df.instructions[1].args == ("one   two",)
    heredoc = df.instructions[2].heredocs[0]
    assert heredoc.name == "EOF"
    assert heredoc.content == "body\r\n"  # bodies are kept byte for byte, as BuildKit does
    assert df.instructions[3].key_values() == (("K", "v"),)


def test_continuation_with_comment_and_blank_lines_inside():
    text = ("FROM a\nRUN apt-get update \\\n# a comment\n\n    # indented comment\n"
            "  && make \\\n\n  && true\nUSER me\n")
    df = parse(text)
    run = df.instructions[1]
    assert run.args == ("apt-get update   && make   && true",)
    assert (run.line, run.end_line) == (2, 8)
    assert df.instructions[2].line == 9
    assert len(df.warnings) == 1 and "Containerfile:2:" in df.warnings[0]


def test_comment_ending_in_escape_does_not_continue():
    df = parse("FROM a\n# note \\\nRUN b\n")
    assert [i.cmd for i in df.instructions] == ["FROM", "RUN"]


def test_instructions_are_case_insensitive():
    df = parse("from alpine AS build\nRun echo hi\ncOpY --From=build a b\n")
    assert [i.cmd for i in df.instructions] == ["FROM", "RUN", "COPY"]
    assert df.instructions[0].args == ("alpine", "AS", "build")
    assert df.instructions[2].flags == ("--From=build",)
    assert dump(df) == ('(from "alpine" "AS" "build")\n(run "echo hi")\n'
                        '(copy ["--From=build"] "a" "b")')


def test_original_and_lines():
    df = parse("\n\n  FROM a\nRUN x \\\n  y\n")
    assert df.instructions[0].original == "FROM a"
    assert df.instructions[1].original == "RUN x   y"
    assert [(i.line, i.end_line) for i in df.instructions] == [(3, 3), (4, 5)]
    assert df.instructions[1].location == "Containerfile:4"


def test_no_variable_expansion_in_parser():
    df = parse("FROM ${BASE:-alpine}\nENV A=$HOME B=\"x y\"\nRUN echo $A\n")
    assert df.instructions[0].args == ("${BASE:-alpine}",)
    assert df.instructions[1].key_values() == (("A", "$HOME"), ("B", '"x y"'))
    assert df.instructions[2].args == ("echo $A",)


# ------------------------------------------------------------------ args per instruction


def test_exec_and_shell_forms():
    df = parse('FROM a\nCMD ["a", "b c"]\nCMD a "b c"\nENTRYPOINT []\nSHELL ["/bin/sh", "-c"]\n'
               "RUN\n")
    cmd_exec, cmd_shell, entry, shell, run = df.instructions[1:]
    assert (cmd_exec.args, cmd_exec.json) == (("a", "b c"), True)
    assert (cmd_shell.args, cmd_shell.json) == (('a "b c"',), False)
    assert (entry.args, entry.json) == ((), True)
    assert (shell.args, shell.json) == (("/bin/sh", "-c"), True)
    assert (run.args, run.json) == ((), False)


def test_env_label_arg_representation():
    df = parse('FROM a\nENV PATH /usr/bin:$PATH extra\nENV A=1 B="two words"\n'
               'LABEL "com.example.x"=y z=\nARG V\nARG W=1 X="a b"\n')
    legacy, env, label, arg1, arg2 = df.instructions[1:]
    assert legacy.legacy_form and legacy.args == ("PATH", "/usr/bin:$PATH extra")
    assert not env.legacy_form and env.key_values() == (("A", "1"), ("B", '"two words"'))
    assert label.key_values() == (('"com.example.x"', "y"), ("z", ""))
    assert arg1.args == ("V",)
    assert arg2.args == ("W=1", 'X="a b"')


def test_env_without_equals_in_later_word_fails():
    assert "can't find =" in error_of("FROM a\nENV A=1 B\n")


def test_healthcheck_forms():
    df = parse('FROM a\nHEALTHCHECK NONE\nHEALTHCHECK --interval=5s CMD curl -f x\n'
               'HEALTHCHECK CMD ["true"]\n')
    none, shell, exe = df.instructions[1:]
    assert none.args == ("NONE",)
    assert (shell.flags, shell.args, shell.json) == (("--interval=5s",), ("CMD", "curl -f x"),
                                                     False)
    assert (exe.args, exe.json) == (("CMD", "true"), True)


def test_flags_are_split_like_buildkit():
    inst = only('COPY --chown="a b" --from=x\\=y -- --not-a-flag /d\n')
    assert inst.flags == ("--chown=a b", "--from=x=y")
    assert inst.args == ("--not-a-flag", "/d")


@pytest.mark.parametrize("text, args, is_json", [
    ("CMD ['a', 'b']", ("['a', 'b']",), False),           # single quotes: shell form
    ('CMD ["a", "b"', ('["a", "b"',), False),             # unterminated: shell form
    ('CMD [NaN]', ("[NaN]",), False),                     # not JSON for Go either
    ('CMD ["a"] trailing', ("a",), True),                 # Go's decoder stops after the array
])
def test_invalid_json_falls_back_like_buildkit(text, args, is_json):
    inst = only(text)
    assert (inst.args, inst.json) == (args, is_json)


def test_json_array_with_non_strings_is_an_error():
    assert error_of('FROM a\nRUN ["a", 1]\n').startswith(
        "Containerfile:2: when using JSON array syntax, arrays must be comprised of strings")


def test_lone_surrogate_escape_in_json_becomes_replacement_character():
    inst = only('CMD ["a\\ud800b", "\\ud83d\\ude00"]')
    assert inst.args == ("a\ufffdb", "\U0001f600")


def test_dump_quotes_like_go():
    df = parse('FROM a\nCMD ["\\u007f", "\\u00a0", "\\ue000", "\\u00e9\\u2665", "\\u0007\\u000b",'
               ' "\\udbff\\udfff"]\n')
    assert dump(df).splitlines()[1] == (
        '(cmd "\\x7f" "\\u00a0" "\\ue000" "\u00e9\u2665" "\\a\\v" "\\U0010ffff")')


# ------------------------------------------------------------------ heredocs


def test_several_heredocs_on_one_line():
    df = parse("FROM a\nRUN <<A <<B\nalpha\nA\nbeta\nB\nUSER x\n")
    run = df.instructions[1]
    assert run.args == ("<<A <<B",)
    assert run.heredocs == (Heredoc("A", "alpha\n", True, False), Heredoc("B", "beta\n", True,
                                                                           False))
    assert (run.line, run.end_line) == (2, 6)
    assert df.instructions[2].line == 7


def test_dash_heredoc_strips_tabs_from_body_and_terminator():
    run = parse("FROM a\nRUN <<-EOF\n\tif true; then\n\t\techo hi\n\tfi\n\tEOF\n").instructions[1]
    assert run.heredocs == (Heredoc("EOF", "if true; then\necho hi\nfi\n", True, True),)


def test_heredoc_terminator_as_last_line_without_newline():
    run = parse("FROM a\nRUN <<EOF\none\n\ntwo\nEOF").instructions[1]
    assert run.heredocs[0].content == "one\n\ntwo\n"
    assert run.end_line == 6


def test_plain_heredoc_keeps_tabs_and_needs_exact_terminator():
    run = parse("FROM a\nRUN <<EOF\n\tx\n\tEOF\nEOF\n").instructions[1]
    assert run.heredocs[0].content == "\tx\n\tEOF\n"


@pytest.mark.parametrize("word, name, expand", [
    ("<<EOF", "EOF", True),
    ("<<'EOF'", "EOF", False),
    ('<<"EOF"', "EOF", False),
    ("<<E'O'F", "EOF", False),
    ("<<-'EOF'", "EOF", False),
])
def test_quoted_delimiter_disables_expansion(word, name, expand):
    run = parse(f"FROM a\nRUN cat {word}\n$HOME\n{name}\n").instructions[1]
    assert (run.heredocs[0].name, run.heredocs[0].expand) == (name, expand)
    assert run.heredocs[0].content == "$HOME\n"


def test_copy_heredoc_to_destination():
    copy = parse("FROM a\nCOPY --chmod=755 <<EOF /usr/local/bin/hello\n#!/bin/sh\necho hi\nEOF\n"
                 ).instructions[1]
    assert copy.flags == ("--chmod=755",)
    assert copy.args == ("<<EOF", "/usr/local/bin/hello")
    assert copy.heredocs == (Heredoc("EOF", "#!/bin/sh\necho hi\n", True, False),)


def test_heredoc_file_descriptor():
    assert parse("FROM a\nRUN 3<<EOF cat /dev/fd/3\nx\nEOF\n").instructions[1].heredocs[0].fd == 3


def test_onbuild_heredoc_attached_to_trigger():
    inst = parse("FROM a\nONBUILD RUN <<EOF\necho hi\nEOF\n").instructions[1]
    assert inst.onbuild is not None and inst.onbuild.cmd == "RUN"
    assert inst.onbuild.heredocs == inst.heredocs == (Heredoc("EOF", "echo hi\n", True, False),)
    assert inst.onbuild.end_line == inst.end_line == 4


def test_heredoc_markers_that_are_not_heredocs():
    df = parse('FROM a\nRUN echo "<<EOF"\nRUN ["sh", "-c", "cat <<EOF"]\nUSER <<EOF\n')
    assert all(i.heredocs == () for i in df.instructions)


def test_unterminated_heredoc_names_file_and_line():
    message = error_of("FROM a\n\nRUN <<EOF\nline\nEOFX\n", "app/Containerfile")
    assert message.startswith("app/Containerfile:3: unterminated heredoc <<EOF")


def test_second_heredoc_unterminated():
    assert error_of("FROM a\nCOPY <<A <<B /d\na\nA\nb\n").startswith(
        "Containerfile:2: unterminated heredoc <<B")


# ------------------------------------------------------------------ errors


def test_unknown_instruction_names_file_and_line():
    message = error_of("FROM a\nRUN x\nRUNN make\n", "ctx/Dockerfile")
    assert message.startswith("ctx/Dockerfile:3: unknown instruction: RUNN")
    assert "did you mean RUN?" in message


def test_non_strict_keeps_unknown_instruction_like_buildkit():
    df = parse("FROM a\nFOO bar\n", strict=False)
    assert df.instructions[1].cmd == "FOO"
    assert dump(df) == '(from "a")\n(foo "")'


@pytest.mark.parametrize("text, reason", [
    ("FROM a\nONBUILD ONBUILD RUN x\n", "chaining ONBUILD"),
    ("FROM a\nONBUILD FROM b\n", "FROM isn't allowed as an ONBUILD trigger"),
    ("FROM a\nonbuild maintainer me\n", "MAINTAINER isn't allowed as an ONBUILD trigger"),
    ("FROM a\nONBUILD\n", "ONBUILD needs an instruction"),
    ("FROM a\nONBUILD FOO\n", "unknown instruction: FOO"),
])
def test_onbuild_rules(text, reason):
    message = error_of(text)
    assert message.startswith("Containerfile:2: ")
    assert reason in message
    parse(text, strict=False)  # BuildKit's parser itself accepts these


def test_onbuild_nesting_is_bounded_even_when_not_strict():
    assert "nested too deeply" in error_of("FROM a\n" + "ONBUILD " * 5000 + "RUN x\n",
                                           strict=False)


@pytest.mark.parametrize("text", ["", "\n\n  \n", "# just\n# comments\n", "# syntax=x\n",
                                  "\\\n", b"\xef\xbb\xbf"])
def test_file_without_instructions(text):
    assert "file with no instructions" in error_of(text)


def test_nul_byte_is_a_clear_error():
    message = error_of(b"FROM a\nRUN echo \x00\n")
    assert message.startswith("Containerfile:2: NUL byte")


def test_invalid_utf8_is_a_clear_error():
    message = error_of(b"FROM a\n\nLABEL x=\xff\xfe\n")
    assert message.startswith("Containerfile:3: invalid UTF-8 (byte 0xff at column 9)")


def test_lone_surrogate_in_str_is_a_clear_error():
    assert error_of("FROM a\nRUN \udcff\n").startswith("Containerfile:2: ")


def test_physical_line_limit_counts_bytes():
    ok = "FROM a\nRUN " + "x" * (MAX_PHYSICAL_LINE - 4) + "\n"
    assert len(only(ok.split("\n", 1)[1]).args[0]) == MAX_PHYSICAL_LINE - 4
    parse(ok)
    too_long = "FROM a\nRUN " + "€" * (MAX_PHYSICAL_LINE // 3) + "\n"  # 65538 bytes
    assert error_of(too_long).startswith(
        "Containerfile:2: dockerfile line greater than max allowed size of 65535")


def test_logical_line_limit():
    chunk = "echo " + "y" * 60000 + " \\\n"
    text = "FROM a\nRUN " + chunk * (MAX_LOGICAL_LINE // 60000 + 1) + "true\n"
    assert error_of(text).startswith("Containerfile:2: instruction longer than")


def test_fuzzed_input_never_raises_anything_but_parse_error():
    rng = random.Random(4)
    alphabet = [b"FROM a", b"RUN", b"COPY", b"ONBUILD", b" ", b"\t", b"\n", b"\r\n", b"\\",
                b"`", b"#", b"# escape=`", b"<<", b"<<-", b"EOF", b"'", b'"', b"[", b"]", b",",
                b"--x=1", b"=", b"\xff", b"\x00", b"\xe2\x82\xac", b"\xef\xbb\xbf", b"ENV",
                b"HEALTHCHECK", b"1", b"{", b"}"]
    outcomes = set()
    for _ in range(400):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        try:
            result = parse(data)
        except ParseError:
            outcomes.add("error")
        else:
            assert isinstance(result, Dockerfile)
            dump(result)
            outcomes.add("ok")
    assert outcomes == {"ok", "error"}


# ------------------------------------------------------------------ parse_file


def test_parse_file_reads_and_names_the_path(tmp_path):
    path = tmp_path / "Containerfile"
    path.write_bytes(b"FROM a\nBOGUS\n")
    with pytest.raises(ParseError) as err:
        parse_file(path)
    assert str(err.value).startswith(f"{path}:2: unknown instruction")
    path.write_bytes(b"FROM a\n")
    df = parse_file(str(path))
    assert df.path == str(path) and df.instructions[0].path == str(path)


def test_parse_file_size_cap_and_missing_file(tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.write(b"FROM a\n")
        f.truncate(MAX_FILE_SIZE + 1)
    assert "larger than" in str(pytest.raises(ParseError, parse_file, big).value)
    missing = tmp_path / "nope"
    assert str(pytest.raises(ParseError, parse_file, missing).value).startswith(
        f"{missing}: cannot read")


# ------------------------------------------------------------------ parse_flags

COPY_FLAGS = {"from": str, "chown": str, "chmod": str, "link": bool, "parents": bool,
              "exclude": list}


def test_parse_flags_values_and_defaults():
    inst = only("COPY --from=build --link --exclude=*.md --exclude=.git --parents=false a b\n")
    assert parse_flags(inst, COPY_FLAGS) == {
        "from": "build", "chown": None, "chmod": None, "link": True, "parents": False,
        "exclude": ["*.md", ".git"]}


def test_parse_flags_int_and_dashed_names():
    inst = only("HEALTHCHECK --retries=3 --interval=5s CMD true\n")
    assert parse_flags(inst, {"--retries": int, "--interval": str, "--timeout": str}) == {
        "retries": 3, "interval": "5s", "timeout": None}


@pytest.mark.parametrize("line, reason", [
    ("COPY --x=1 a b", "unknown flag --x for COPY"),
    ("COPY --from a b", "flag --from needs a value"),
    ("COPY --exclude a b", "flag --exclude needs a value"),
    ("COPY --link=maybe a b", "flag --link expects true or false, not 'maybe'"),
    ("COPY --from=a --from=b a b", "flag --from given more than once"),
    ("COPY --link --link a b", "flag --link given more than once"),
])
def test_parse_flags_errors(line, reason):
    inst = parse(f"FROM a\n{line}\n", "ctx/Containerfile").instructions[1]
    with pytest.raises(ParseError) as err:
        parse_flags(inst, COPY_FLAGS)
    assert str(err.value).startswith(f"ctx/Containerfile:2: {reason}")


def test_parse_flags_bad_int():
    inst = only("HEALTHCHECK --retries=three CMD true\n")
    with pytest.raises(ParseError, match="expects a whole number"):
        parse_flags(inst, {"retries": int})
