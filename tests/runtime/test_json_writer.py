"""runtime.json_writer, which writes state.json on kiln run's path: what it writes must
read back as the value it was given, through the json module every reader uses."""

from __future__ import annotations

import json

import pytest

from runtime.json_writer import dumps

AWKWARD = [
    "", "plain", 'quote " and backslash \\', "new\nline\ttab\rcr\b\f", "\x00\x01\x1f\x7f",
    "héllo wörld", "日本語", "emoji \U0001f600", "lone \udcff surrogate from argv bytes",
    "\ud800", "</script>", "\u2028\u2029",
]


@pytest.mark.parametrize("text", AWKWARD)
def test_strings_read_back_as_written(text):
    assert json.loads(dumps(text)) == text
    assert json.loads(dumps({text: [text]})) == {text: [text]}


def test_a_state_record_reads_back_and_matches_the_json_module():
    record = {"id": "ab" * 32, "name": "kiln-abababababab", "image": "sha256:" + "0" * 64,
              "image_name": "busybox", "command": ["sh", "-c", "echo 'hi' \"there\""],
              "created": 1795433233.923825, "status": "running", "pid": 4194303,
              "exit_code": None, "finished": None, "flags": [True, False, 0, -1, 1e-300]}
    assert json.loads(dumps(record)) == record
    assert dumps(record) == json.dumps(record, ensure_ascii=False).encode()


def test_what_json_cannot_hold_is_refused():
    for bad in (float("nan"), float("inf"), b"bytes", {1: "int key"}, {"s": {1, 2}}):
        with pytest.raises((TypeError, ValueError)):
            dumps(bad)
