"""A pip install (not editable) carries every package of the source tree."""

from __future__ import annotations

import tomllib

from tests.conftest import PROJECT


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((PROJECT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = set()
    for top in ("kiln", "store", "builder", "runtime", "registry_client"):
        for init in (PROJECT / top).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(PROJECT).parts))
    assert found == listed
