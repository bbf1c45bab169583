"""kiln's config file: machine-wide defaults for what a flag would otherwise say each time.

    /etc/kiln/kiln.conf as root, $XDG_CONFIG_HOME/kiln/kiln.conf (~/.config/...) otherwise,
    KILN_CONFIG=FILE instead of either. TOML:

    [run]
    pids_limit = 4096    # kiln run without --pids-limit (0 or -1: no limit, Docker's default)
    [build]
    pids_limit = 4096    # every RUN step of kiln build
    [network]
    subnet = "10.89.0.0/16"  # the default bridge network's (made on first use)

Only the commands that use a setting read the file, and tomllib is imported only when
there is one: without it ``kiln run`` pays one failed open.
"""

from __future__ import annotations

import os

from store.errors import KilnError
from store.fsutil import is_host_root  # at import: a caller may drop its uid before asking

SETTINGS: dict[str, dict[str, type]] = {"run": {"pids_limit": int}, "build": {"pids_limit": int},
                                        "network": {"subnet": str}}
_KINDS = {int: "a whole number", str: "a string"}


class ConfigError(KilnError):
    pass


def config_path() -> str:
    if os.environ.get("KILN_CONFIG"):
        return os.environ["KILN_CONFIG"]
    if is_host_root():
        return "/etc/kiln/kiln.conf"
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "kiln", "kiln.conf")


def setting(section: str, key: str):
    """``[section] key`` of the config file; None when it is not set (or there is no file)."""
    return load().get(section, {}).get(key)


def load() -> dict[str, dict]:
    path = config_path()
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
    except FileNotFoundError:
        if os.environ.get("KILN_CONFIG"):
            raise ConfigError(f"KILN_CONFIG={path}: no such file") from None
        return {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    import re
    import tomllib

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        m = re.search(r" \(at line (\d+), column (\d+)\)$", message)
        if m:
            line, message = int(m[1]), f"{message[:m.start()]} (column {m[2]})"
        else:  # "(at end of document)"
            line, message = text.count("\n") + 1, message.replace(" (at end of document)", "")
        raise ConfigError(f"{path}:{line}: {message[:1].lower()}{message[1:]}") from None
    _check(path, text, doc)
    return doc


def _check(path: str, text: str, doc: dict) -> None:
    for section, values in doc.items():
        where = f"{path}:{_line_of(text, section)}"
        known = " or ".join(f"[{s}]" for s in SETTINGS)
        if section not in SETTINGS and not isinstance(values, dict):
            raise ConfigError(f"{where}: {section} is in no section (kiln's settings go "
                              f"under {known})")
        if section not in SETTINGS:
            raise ConfigError(f"{where}: unknown section [{section}] (kiln knows {known})")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: {section} must be a [{section}] table")
        for key, value in values.items():
            where = f"{path}:{_line_of(text, section, key)}"
            kind = SETTINGS[section].get(key)
            if kind is None:
                known = ", ".join(SETTINGS[section])
                raise ConfigError(f"{where}: unknown setting {key!r} in [{section}] "
                                  f"(kiln knows {known})")
            if type(value) is not kind:  # bool is no int here
                raise ConfigError(f"{where}: [{section}] {key} must be {_KINDS[kind]}, not "
                                  f"{value!r}")


def _line_of(text: str, section: str, key: str | None = None) -> int:
    """The line of ``[section]`` (or of ``key =`` in it): TOML's parser keeps no positions."""
    import re

    lines = text.splitlines()
    start = 0
    header = re.compile(r"\s*\[\s*" + re.escape(section) + r"\s*\]\s*(#.*)?$")
    for i, line in enumerate(lines):
        if header.match(line):
            start = i
            if key is None:
                return i + 1
            break
    name = re.escape(key if key is not None else section)
    assign = re.compile(r"\s*(" + name + r'|"' + name + r'")\s*[=.]')
    for i in range(start, len(lines)):
        if assign.match(lines[i]):
            return i + 1
    return start + 1
