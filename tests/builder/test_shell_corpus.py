"""BuildKit's own shell-lexer test data, replayed against builder.shell.

Reads ../shared/corpora/buildkit-shell in place (see its FORMAT.md): envVarTest (ProcessWord),
wordsTest (ProcessWords) and the tables transcribed from lex_test.go.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.shell import (
    ExpansionError,
    env_from_list,
    expand_with_lookups,
    expand_with_matches,
    expand_word,
    expand_words,
)

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpora" / "buildkit-shell"

if not CORPUS.is_dir():
    pytest.skip(f"{CORPUS} is absent: BuildKit shell corpus NOT run", allow_module_level=True)


def _load(name: str) -> dict:
    return json.loads((CORPUS / name).read_text(encoding="utf-8"))


ENV_VAR = _load("envVarTest.json")
WORDS = _load("wordsTest.json")
TABLES = _load("process_cases.json")

# kiln runs on Linux: "W" lines are BuildKit's Windows-only expectations (case-insensitive keys).
LINUX_ENV_VAR_CASES = [c for c in ENV_VAR["cases"] if c["platform"] in ("A", "U")]
WINDOWS_ENV_VAR_CASES = [c for c in ENV_VAR["cases"] if c["platform"] == "W"]


def test_corpus_has_the_expected_number_of_cases():
    platforms = [c["platform"] for c in ENV_VAR["cases"]]
    assert (len(platforms), platforms.count("A"), platforms.count("U"), platforms.count("W")) == (
        230, 226, 2, 2)
    assert len(WORDS["cases"]) == 24
    counts = {key: len(TABLES[key]["cases"]) for key in (
        "process_with_matches", "platform_release_name", "mandatory_env_vars", "envs_from_slice")}
    assert counts == {"process_with_matches": 47, "platform_release_name": 3,
                      "mandatory_env_vars": 6, "envs_from_slice": 7}
    assert sum(counts.values()) == 63


def test_corpus_uses_the_default_lexer_options():
    for data in (ENV_VAR, WORDS, TABLES):
        options = dict(data["lexer_options"])
        assert options.pop("escapeToken") == "\\"
        assert not any(options.values()), options


def _go_trim(text: str) -> str:
    return text.strip(" \t\n\v\f\r\x85\xa0")


def test_env_var_json_matches_the_raw_upstream_file():
    """Re-parse envVarTest as the Go harness does, so a transcription slip cannot hide."""
    parsed = []
    raw = (CORPUS / "envVarTest").read_text(encoding="utf-8")
    for number, line in enumerate(raw.split("\n")[:-1], start=1):
        if line.startswith("#") or not _go_trim(line):
            continue
        platform, source, expected = (_go_trim(part) for part in _go_trim(line).split("|"))
        failing = expected == "error"
        parsed.append({"line": number, "platform": platform, "input": source, "error": failing,
                       "expected": None if failing else expected})
    assert parsed == ENV_VAR["cases"]


def test_words_json_matches_the_raw_upstream_file():
    parsed, env = [], []
    raw = (CORPUS / "wordsTest").read_text(encoding="utf-8")
    for number, line in enumerate(raw.split("\n")[:-1], start=1):
        if line.startswith("#"):
            continue
        if line.startswith("ENV "):
            env.append(line[3:].lstrip(" "))
            continue
        source, expected = line.split("|")
        words = expected.lstrip(" ").split(",")
        failing = words == ["error"]
        parsed.append({"line": number, "env": list(env), "input": _go_trim(source),
                       "error": failing, "expected": None if failing else words})
    assert parsed == WORDS["cases"]


@pytest.mark.parametrize("case", LINUX_ENV_VAR_CASES, ids=lambda c: f"envVarTest:{c['line']}")
def test_env_var_case(case):
    if case["error"]:
        with pytest.raises(ExpansionError):
            expand_word(case["input"], ENV_VAR["env"])
    else:
        assert expand_word(case["input"], ENV_VAR["env"]) == case["expected"]


def test_windows_only_cases_are_the_case_insensitive_lookups_kiln_does_not_do():
    assert [c["input"] for c in WINDOWS_ENV_VAR_CASES] == ["he$pwd.", "안녕$pwd."]
    for case in WINDOWS_ENV_VAR_CASES:
        assert expand_word(case["input"], ENV_VAR["env"]) != case["expected"]
        assert expand_word(case["input"], ENV_VAR["env"]) == case["expected"].replace("/home", "")


@pytest.mark.parametrize("case", WORDS["cases"], ids=lambda c: f"wordsTest:{c['line']}")
def test_words_case(case):
    env = env_from_list(case["env"])
    if case["error"]:
        with pytest.raises(ExpansionError):
            expand_words(case["input"], env)
    else:
        assert expand_words(case["input"], env) == case["expected"]


@pytest.mark.parametrize(
    "case", TABLES["process_with_matches"]["cases"], ids=lambda c: c["input"])
def test_process_with_matches(case):
    if case["expectedErr"]:
        with pytest.raises(ExpansionError):
            expand_with_lookups(case["input"], case["envs"])
        return
    result = expand_with_lookups(case["input"], case["envs"])
    assert result.value == case["expected"]
    assert result.matched == set(case["matches"])
    assert result.unmatched == set(case["unmatched"])
    assert expand_with_matches(case["input"], case["envs"]) == (
        case["expected"], set(case["matches"]))
    assert expand_word(case["input"], case["envs"]) == case["expected"]


@pytest.mark.parametrize("case", TABLES["platform_release_name"]["cases"],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c["envs"].items()))
def test_platform_release_name(case):
    assert expand_with_matches(case["input"], case["envs"])[0] == case["expected"]


@pytest.mark.parametrize("case", TABLES["mandatory_env_vars"]["cases"],
                         ids=lambda c: f"{c['input']}-{sorted(c['envs'])}-{c['envs'].get('VAR')}")
def test_mandatory_env_vars(case):
    if case["expectedErr"]:
        with pytest.raises(ExpansionError, match=case["errorContains"]):
            expand_word(case["input"], case["envs"])
    else:
        assert expand_word(case["input"], case["envs"]) == case["expected"]


@pytest.mark.parametrize("case", TABLES["envs_from_slice"]["cases"],
                         ids=lambda c: f"{c['env']}->{c['lookup']}")
def test_envs_from_slice(case):
    env = env_from_list(case["env"])
    assert env.get(case["lookup"], "") == case["expected"]
    # "foo" with no "=" is set (to ""), not absent: ${foo-x} must give "".
    assert (case["lookup"] in env) == any(e.split("=")[0] == case["lookup"] for e in case["env"])
