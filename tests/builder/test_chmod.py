"""COPY --chmod values as BuildKit reads them: octal up to 07777, or a symbolic mode in the
grammar of BSD's setmode(3) (tonistiigi/dchapes-mode), applied to each file's own mode."""

from __future__ import annotations

import pytest

from builder.chmod import ChmodError, parse_chmod


@pytest.mark.parametrize("text, mode, is_dir, want", [
    ("0755", 0o600, False, 0o755),
    ("755", 0o600, True, 0o755),
    ("4755", 0o644, False, 0o4755),
    ("0", 0o644, False, 0),
    ("u+x,g-r", 0o644, False, 0o704),       # the corpus case 029
    ("u-w+x", 0o644, False, 0o544),         # several ops in one clause
    ("ug+rw,o-rwx", 0o777, False, 0o770),
    ("u=rwx,go=rx", 0, False, 0o755),
    ("a+rwx", 0, False, 0o777),
    ("go=", 0o777, False, 0o700),
    ("go=u-w", 0o755, False, 0o755),        # copy the user's bits, then clear write
    ("g=u", 0o640, False, 0o660),
    ("+X", 0o644, False, 0o644),            # X: only where some x is, or on a directory
    ("+X", 0o744, False, 0o755),
    ("+X", 0o644, True, 0o755),
    ("a=rX", 0o755, True, 0o444),           # BSD ignores X after '=' (and after '-')
    ("=rw,+X", 0o700, False, 0o755),        # no who: masked by Docker's umask 022
    ("+w", 0o444, False, 0o644),
    ("u+s", 0o755, False, 0o4755),
    ("o+s", 0o755, False, 0o755),           # "other" has no set-id bit
    ("+t", 0o755, True, 0o1755),
    ("o+t", 0o755, True, 0o755),
    ("g+s,o-x", 0o2751, True, 0o2750),      # keeps the bits it does not touch
])
def test_modes(text, mode, is_dir, want):
    assert parse_chmod(text).apply(mode, is_dir) == want


def test_directories_the_copy_creates():
    assert parse_chmod("0700").created_dir_mode == 0o700
    assert parse_chmod("2750").created_dir_mode == 0o750  # Go's os.Mkdir: permission bits
    assert parse_chmod("u+x").created_dir_mode == 0o755   # only an octal --chmod applies


@pytest.mark.parametrize("text, why", [
    ("", "empty mode"),
    ("u", "the mode ends"),
    ("x", "found 'x' at character 1"),
    ("u+x,", "a clause must follow ','"),
    ("u+x,,g-r", "found ',' at character 5"),
    ("u+q", "found 'q' at character 3"),
    ("u+x g-r", "found ' ' at character 4"),
    ("8", "only the digits 0-7"),
    ("0755 ", "only the digits 0-7"),
    ("7x", "only the digits 0-7"),
    ("17777", "above 07777"),
])
def test_bad_modes_say_why(text, why):
    with pytest.raises(ChmodError) as e:
        parse_chmod(text)
    assert why in str(e.value)
