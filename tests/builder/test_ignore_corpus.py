"""moby/patternmatcher's own test tables (../shared/corpora/dockerignore), read in place."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from builder.ignore import IgnoreError, IgnoreMatcher, clean_path, parse_ignore_content

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpora" / "dockerignore"

if not (CORPUS / "cases.json").is_file():
    pytest.skip(f"dockerignore corpus not found at {CORPUS} (it lives beside the checkout, in "
                "shared/corpora)", allow_module_level=True)

CASES = json.loads((CORPUS / "cases.json").read_text())
PARSING = json.loads((CORPUS / "pattern_parsing.json").read_text())
COMPILE = json.loads((CORPUS / "compile_cases.json").read_text())


def test_corpus_has_every_case():
    assert len(CASES) == 138
    assert sum(c["error"] for c in CASES) == 18
    assert len(PARSING["new_cases"]) == 7
    assert len(PARSING["readall_cases"]) == 2
    assert len(COMPILE["cases"]) == 21


@pytest.mark.parametrize("case", CASES,
                         ids=[f"{i}:{c['patterns']}:{c['path']}" for i, c in enumerate(CASES)])
def test_match_case(case):
    if case["error"]:
        with pytest.raises(IgnoreError):
            IgnoreMatcher(case["patterns"]).matches(case["path"])
        return
    matcher = IgnoreMatcher(case["patterns"])
    assert matcher.matches(case["path"]) is case["match"]
    assert matcher.matches(case["path"]) is case["match"]  # memoised parents give the same


def test_pattern_error_surfacing_at_match_time_repeats():
    matcher = IgnoreMatcher(["[Local-Only]/"])  # filepath.Match accepts it; matching cannot
    for _ in range(3):
        with pytest.raises(IgnoreError, match="Local-Only"):
            matcher.matches("x")


@pytest.mark.parametrize("case", PARSING["new_cases"], ids=lambda c: c["source"])
def test_new_case(case):
    if case["error"]:
        with pytest.raises(IgnoreError):
            IgnoreMatcher(case["patterns"])
        return
    matcher = IgnoreMatcher(case["patterns"])
    if "pattern_count" in case:
        assert len(matcher.patterns) == case["pattern_count"]
    if "exclusions" in case:
        assert matcher.has_exclusions is case["exclusions"]


@pytest.mark.parametrize("case", PARSING["readall_cases"], ids=lambda c: c["source"])
def test_readall_case(case):
    content = None if case["content"] is None else case["content"].encode()
    assert parse_ignore_content(content) == case["expected"]


# compile_cases.json gives upstream's strategy per pattern. Rather than peek at ours, compare
# behaviour: every pattern must answer like upstream's regexp / prefix / suffix / exact rule on a
# set of probe paths built from the pattern's own pieces.
def _upstream_rule(case):
    pattern, kind = case["pattern"], case["matchType"]
    if kind == "exactMatch":
        return lambda path: path == pattern
    if kind == "prefixMatch":
        return lambda path: path.startswith(pattern[:-2])
    if kind == "suffixMatch":
        suffix = pattern[2:]
        return lambda path: path.endswith(suffix) or (suffix[:1] == "/" and path == suffix[1:])
    regex = re.compile(case["regexp"], re.DOTALL)
    return lambda path: regex.search(path) is not None


def _probes(pattern: str) -> list[str]:
    words = [w for w in re.split(r"[*?\[\]/^\\-]+", pattern) if w] + ["x", "file", "dir", "a"]
    probes = {pattern, pattern.replace("*", ""), pattern.replace("**/", ""),
              pattern.replace("*", "zz"), pattern.replace("?", "Z"),
              re.sub(r"\[\^?(.)[^\]]*\]", r"\1", pattern), re.sub(r"\[[^\]]*\]", "z", pattern)}
    for w in words:
        for v in words:
            probes |= {w, f"{w}/{v}", f"{w}{v}", f"d/{w}", f"d/e/{w}", f"{w}/d/{v}", f"{w}.txt",
                       f"d/{w}.txt", f"{w}/{v}/x.txt", f"my{w}", f"d/my{w}"}
    # Only the paths a context walker produces: relative, clean, not the root.
    return sorted(p for p in probes if p not in ("", ".") and clean_path(p) == p
                  and not p.startswith(("/", "../")))


@pytest.mark.parametrize("case", COMPILE["cases"], ids=lambda c: c["pattern"])
def test_compile_table_behaviour(case):
    rule = _upstream_rule(case)
    matcher = IgnoreMatcher([case["pattern"]])
    for path in _probes(case["pattern"]):
        # Single pattern: excluded iff the pattern matches the path or one of its parents.
        parts = path.split("/")
        expected = any(rule("/".join(parts[:i])) for i in range(1, len(parts) + 1))
        assert matcher.matches(path) is expected, path
