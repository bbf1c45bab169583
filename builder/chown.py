"""COPY/ADD --chown=user[:group]: the owner BuildKit gives, from the image's own files.

BuildKit (llb.WithUser, solver/llbsolver/file/user_linux.go readUser): each part that is a
decimal number below 2^32 is an id, anything else a name. A numeric user without a group
also gives the group: ``--chown=1234`` is 1234:1234. A user name takes its uid and primary
gid from the image's /etc/passwd, a group name its gid from /etc/group; a name that is not
there (or a file that is not there) leaves the id as it was, 0 for a user, without an
error. kiln says so in a warning (``Owner.warnings``), as BuildKit does not.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

from store.errors import KilnError

MAX_FILE = 4 << 20  # as runtime.users: an /etc/passwd larger than this is refused
_MAX_ID = 2**32 - 1
_ATOI = re.compile(r"[+-]?[0-9]+")


class ChownError(KilnError):
    pass


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int
    warnings: tuple[str, ...] = ()


def _id(text: str) -> int | None:
    """Go's strconv.ParseUint(text, 10, 32), or None: then it is a name."""
    if not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if value <= _MAX_ID else None


def _file_id(text: str) -> int:
    """An id field of /etc/passwd or /etc/group. runc's parser (which BuildKit uses) takes 0
    for one strconv.Atoi refuses; kiln takes 0 for any that is no valid id either."""
    if not _ATOI.fullmatch(text):
        return 0
    value = int(text)
    return value if 0 <= value <= _MAX_ID else 0


def _rows(root: str, path: str) -> list[list[str]] | None:
    """The lines of ``path`` in the image (symlinks resolved inside ``root``), split on ':';
    None if it is not there."""
    from runtime.rootfs import RootfsError, resolve_in_root

    try:
        host = resolve_in_root(root, path)
    except RootfsError as e:
        raise ChownError(f"cannot read {path} in the image: {e}") from None
    try:
        with open(host, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise ChownError(f"cannot read {path} in the image: {e.strerror}") from None
    if len(data) > MAX_FILE:
        raise ChownError(f"{path} in the image is larger than {MAX_FILE} bytes")
    return [line.strip().split(":") for line in data.decode("utf-8", "replace").splitlines()
            if line.strip()]


def resolve_owner(spec: str, root: str) -> Owner:
    """The uid:gid that ``--chown=spec`` means in the image whose merged root is ``root``."""
    user, has_group, group = spec.partition(":")
    uid = gid = 0
    warnings = []
    user_id = _id(user)
    if user_id is not None:
        uid = gid = user_id
    elif user:
        rows = _rows(root, "/etc/passwd")
        row = next((r for r in rows or () if r[0] == user), None)
        if row is not None:
            uid = _file_id(row[2]) if len(row) > 2 else 0
            gid = _file_id(row[3]) if len(row) > 3 else 0
        else:
            warnings.append(f"no user {user} in /etc/passwd, using 0")
    if has_group and group:
        group_id = _id(group)
        if group_id is not None:
            gid = group_id
        else:
            rows = _rows(root, "/etc/group")
            row = next((r for r in rows or () if r[0] == group), None)
            if row is not None:
                gid = _file_id(row[2]) if len(row) > 2 else 0
            else:
                warnings.append(f"no group {group} in /etc/group, using {gid}")
    return Owner(uid, gid, tuple(warnings))
