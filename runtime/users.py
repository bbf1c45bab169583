"""``-u name|uid[:group|gid]`` resolved the way docker and runc do, from the image's files.

Called inside the container (after pivot_root), so /etc/passwd is the
image's and cannot point anywhere else; reads are bounded all the same.
"""

from __future__ import annotations

from runtime.spec import FrozenRecord
from store.errors import KilnError

MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel: never a real id
MAX_FILE = 4 << 20


class ExecUser(FrozenRecord):
    uid: int
    gid: int
    additional_gids: tuple[int, ...]
    home: str

    def __init__(self, uid: int, gid: int, additional_gids: tuple[int, ...] = (),
                 home: str = "/"):
        self._set(uid=uid, gid=gid, additional_gids=additional_gids, home=home)


def _read_db(path: str) -> list[list[str]]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise KilnError(f"cannot read {path} in the container: {e.strerror}") from None
    if len(data) > MAX_FILE:
        raise KilnError(f"{path} in the container is larger than {MAX_FILE} bytes")
    rows = []
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def _parse_id(text: str, what: str) -> int | None:
    if not text.isdigit():
        if text.startswith("-") and text[1:].isdigit():
            raise KilnError(f"{what} {text} is negative")
        return None
    value = int(text)
    if value > MAX_ID:
        raise KilnError(f"{what} {text} is out of range (at most {MAX_ID})")
    return value


def _group_id(name_or_id: str, groups: list[list[str]]) -> int:
    parsed = _parse_id(name_or_id, "group ID")
    if parsed is not None:
        return parsed
    for row in groups:
        if len(row) >= 3 and row[0] == name_or_id:
            gid = _parse_id(row[2], "group ID")
            if gid is not None:
                return gid
    raise KilnError(f"unable to find group {name_or_id}: no matching entries in group file")


def resolve_user(spec: str, *, passwd: str = "/etc/passwd", group: str = "/etc/group",
                 extra_groups: tuple[str, ...] = ()) -> ExecUser:
    user_part, _, group_part = (spec or "").partition(":")
    users = _read_db(passwd)
    uid = _parse_id(user_part, "user ID") if user_part else 0
    name = None
    gid = 0
    home = "/"
    entry = None
    for row in users:
        if len(row) < 4:
            continue
        if (uid is None and row[0] == user_part) or (uid is not None and row[2] == str(uid)):
            entry = row
            break
    if uid is None and entry is None:
        raise KilnError(f"unable to find user {user_part}: no matching entries in passwd file")
    if entry is not None:
        name = entry[0]
        uid = _parse_id(entry[2], "user ID")
        parsed_gid = _parse_id(entry[3], "group ID")
        if uid is None or parsed_gid is None:
            raise KilnError(f"bad passwd entry for {entry[0]!r}")
        gid = parsed_gid
        home = entry[5] if len(entry) > 5 and entry[5] else "/"
    groups = _read_db(group)
    if group_part:
        gid = _group_id(group_part, groups)
    # the primary group is a supplementary one too, as Docker and BuildKit set them up
    # (containerd's ensureAdditionalGids, moby's getUser): `id` shows groups=<gid>,...
    additional: list[int] = [gid]
    if name is not None and not group_part:
        for row in groups:
            if len(row) >= 4 and name in row[3].split(","):
                g = _parse_id(row[2], "group ID")
                if g is not None and g not in additional:
                    additional.append(g)
    for g in extra_groups:
        parsed = _group_id(g, groups)
        if parsed not in additional:
            additional.append(parsed)
    assert uid is not None
    return ExecUser(uid, gid, tuple(additional), home)
