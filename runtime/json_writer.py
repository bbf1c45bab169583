"""JSON out for ``kiln run``'s state.json, without importing the json package.

Importing json (its decoder, scanner and encoder, each compiling regular expressions)
costs a kiln run more than a millisecond, and all the run path writes is a flat record of
strings, numbers, None and lists of strings. Readers use json.loads; a test holds
``json.loads(dumps(v)) == v`` for awkward values (quotes, control characters, non-ASCII,
lone surrogates from undecodable argv bytes).
"""

from __future__ import annotations

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b",
            "\f": "\\f"}
_ESCAPES.update({chr(c): f"\\u{c:04x}" for c in range(0x20) if chr(c) not in _ESCAPES})


def _string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif "\ud800" <= ch <= "\udfff":  # a lone surrogate has no UTF-8: escape it
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(value: object) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{value!r} has no JSON form")
        return float.__repr__(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"JSON object keys must be strings, not {k!r}")
            items.append(f"{_string(k)}: {_value(v)}")
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"{type(value).__name__} has no JSON form")


def dumps(value: object) -> bytes:
    """``value`` as UTF-8 JSON: json.dumps(value, ensure_ascii=False) but for lone
    surrogates, which come out escaped (as ensure_ascii=True has them) instead of failing."""
    return _value(value).encode("utf-8")
