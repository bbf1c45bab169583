"""BuildKit's own parser test data (../shared/corpora/buildkit-parser), read in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.parser import (
    ParseError,
    chomp_heredoc_content,
    dump,
    heredocs_in_line,
    parse,
    parse_heredoc_word,
    parse_json_array,
    split_words,
)

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpora" / "buildkit-parser"
if not (CORPUS / "FORMAT.md").is_file():
    pytest.skip(f"BuildKit parser corpus missing at {CORPUS}: conformance tests NOT run",
                allow_module_level=True)

# Counts stated in ../shared/corpora/README.md; a glob mistake must not pass silently.
EXPECTED_POSITIVE = 33
EXPECTED_NEGATIVE = 4

POSITIVE = sorted(d.name for d in CORPUS.iterdir() if (d / "result").is_file())
NEGATIVE = sorted(d.name for d in (CORPUS / "_negative").iterdir() if d.is_dir())
HEREDOC = json.loads((CORPUS / "_extra" / "heredoc_cases.json").read_text())
MISC = json.loads((CORPUS / "_extra" / "misc_cases.json").read_text())
NEGATIVE_REASONS = {
    "empty_dockerfile": "file with no instructions",
    "only_comments": "file with no instructions",
    "env_no_value": "ENV must have two arguments",
    "shykes-nested-json": "arrays must be comprised of strings only",
}


def test_case_counts_match_the_corpus():
    assert len(POSITIVE) == EXPECTED_POSITIVE
    assert len(NEGATIVE) == EXPECTED_NEGATIVE
    # every top-level directory is either a positive case or a '_' support directory
    others = [d.name for d in CORPUS.iterdir()
              if d.is_dir() and not d.name.startswith("_") and d.name not in POSITIVE]
    assert others == []
    assert sorted(NEGATIVE_REASONS) == NEGATIVE


@pytest.mark.parametrize("case", POSITIVE)
def test_dump_matches_buildkit(case):
    source = CORPUS / case / "Dockerfile"
    expected = (CORPUS / case / "result").read_bytes().decode("utf-8")
    assert dump(parse(source.read_bytes(), str(source))) + "\n" == expected


@pytest.mark.parametrize("case", NEGATIVE)
def test_negative_case_fails(case):
    with pytest.raises(ParseError) as err:
        parse((CORPUS / "_negative" / case / "Dockerfile").read_bytes(), case)
    assert NEGATIVE_REASONS[case] in str(err.value)
    assert str(err.value).startswith(f"{case}:")


def test_line_numbers():
    expected = json.loads((CORPUS / "_line-numbers" / "expected.json").read_text())
    df = parse((CORPUS / "_line-numbers" / "Dockerfile").read_bytes())
    got = [{"StartLine": i.line, "EndLine": i.end_line} for i in df.instructions]
    assert got == expected["children"]
    assert (df.instructions[0].line, df.instructions[-1].end_line) == (
        expected["root"]["StartLine"], expected["root"]["EndLine"])
    assert df.escape == "\\"
    assert df.directives == {"escape": "\\"}
    # the misc table repeats the same expectation in another shape
    table = MISC["line_numbers"]["expected"]
    assert [[c["StartLine"], c["EndLine"]] for c in got] == table["children"]


# ------------------------------------------------------------------ heredocs


def _as_table(doc):
    return {"Name": doc.name, "FileDescriptor": doc.fd, "Expand": doc.expand,
            "Chomp": doc.chomp}


def test_extracts_heredocs():
    case = HEREDOC["extracts_heredoc"]
    # the case holds `USER <<INVALID` + `INVALID`: an unknown instruction, which BuildKit's
    # parser keeps and kiln's strict mode refuses; the table is checked in BuildKit's mode.
    df = parse(case["dockerfile"], strict=False)
    expected = case["expected_heredocs"]
    assert len(df.instructions) == len(expected) + 1
    for inst, want in zip(df.instructions[1:], expected, strict=True):
        if want is None:
            assert inst.heredocs == (), inst.original
            continue
        assert [_as_table(d) for d in inst.heredocs] == [
            {k: w[k] for k in ("Name", "FileDescriptor", "Expand", "Chomp")} for w in want]
        # kiln stores the body ready to use: <<- bodies have their leading tabs removed
        assert [d.content for d in inst.heredocs] == [
            chomp_heredoc_content(w["Content"]) if w["Chomp"] else w["Content"] for w in want]
    with pytest.raises(ParseError, match=r"^Containerfile:9: unknown instruction: INVALID"):
        parse(case["dockerfile"])


def test_json_form_never_holds_heredocs():
    df = parse(HEREDOC["json_form_never_heredoc"]["dockerfile"])
    assert [i.json for i in df.instructions[1:4]] == [True, True, True]
    assert all(i.heredocs == () for i in df.instructions[1:4])


def test_chomp_helper():
    case = HEREDOC["chomp_helper"]
    assert chomp_heredoc_content(case["input"]) == case["expected"]


@pytest.mark.parametrize("word", HEREDOC["parse_heredoc_word"]["valid"])
def test_heredoc_word_valid(word):
    doc = parse_heredoc_word(word)
    assert doc is not None and doc.name == "EOF"


@pytest.mark.parametrize("word", HEREDOC["parse_heredoc_word"]["invalid"])
def test_heredoc_word_invalid(word):
    with pytest.raises(ValueError):
        parse_heredoc_word(word)


@pytest.mark.parametrize("word", HEREDOC["parse_heredoc_word"]["not_heredoc"])
def test_heredoc_word_not_a_heredoc(word):
    assert parse_heredoc_word(word) is None


@pytest.mark.parametrize("case", HEREDOC["heredocs_from_line"]["cases"],
                         ids=lambda c: c["line"])
def test_heredocs_from_line(case):
    assert [d.name for d in heredocs_in_line(case["line"])] == case["names"]


# ------------------------------------------------------------------ misc tables


def test_empty_continuation_warnings():
    case = MISC["empty_continuation_warnings"]
    df = parse(case["dockerfile"])
    expected = case["expected"]
    assert len(df.warnings) == expected["warning_count"]
    for warning, parts in zip(df.warnings, expected["warnings_short_contains"], strict=True):
        for part in parts:
            assert part in warning
    assert expected["warning0_detail0_contains"] in df.warnings[0]
    # comment lines inside a continuation are skipped silently
    assert df.instructions[-2].args == ("non-indented    after-comment",)
    assert df.instructions[-1].args == ("indented     comment",)


def test_line_too_long():
    case = MISC["line_too_long"]
    fill = case["fill"]["char"] * case["fill"]["count"]
    with pytest.raises(ParseError) as err:
        parse(case["dockerfile_template"].replace("%s", fill))
    assert case["expected_error"] in str(err.value)
    assert str(err.value).startswith("Containerfile:3: ")


@pytest.mark.parametrize("case", MISC["parse_words"]["cases"], ids=lambda c: c["input"])
def test_parse_words(case):
    assert split_words(case["input"]) == case["expect"]


@pytest.mark.parametrize("case", MISC["json_arrays"]["valid"], ids=lambda c: c["input"])
def test_json_arrays_valid(case):
    assert parse_json_array(case["input"]) == tuple(case["expect"])
    inst = parse("CMD " + case["input"]).instructions[0]
    assert inst.json and inst.args == tuple(case["expect"])


@pytest.mark.parametrize("text", MISC["json_arrays"]["invalid_not_string_array"])
def test_json_arrays_not_strings_fail(text):
    with pytest.raises(ValueError, match="strings only"):
        parse_json_array(text)
    with pytest.raises(ParseError, match=r"^Containerfile:1: .*strings only"):
        parse("CMD " + text)


def test_table_sizes():
    """The transcribed tables still hold what this file was written against."""
    assert len(HEREDOC["extracts_heredoc"]["expected_heredocs"]) == 27
    words = HEREDOC["parse_heredoc_word"]
    assert (len(words["valid"]), len(words["invalid"]), len(words["not_heredoc"])) == (9, 4, 7)
    assert len(HEREDOC["heredocs_from_line"]["cases"]) == 10
    assert len(MISC["parse_words"]["cases"]) == 8
    assert len(MISC["json_arrays"]["valid"]) == 8
    assert len(MISC["json_arrays"]["invalid_not_string_array"]) == 8
