"""--userns=auto: each container in a user namespace of its own, on a private id range.

As podman's ``--userns=auto``: the ranges that /etc/subuid and /etc/subgid give the
name ``kiln`` (no such user need exist) are cut into blocks, one per container for as
long as the container exists (its writable layer keeps files owned by the block's ids),
so the container's root is an unprivileged uid on the host and no two containers share
ids. The image's layers are not copied or chowned: each is an idmapped mount (the
kernel shows a file of uid N on disk as the block's first id + N through it), and the
overlay is mounted, by kiln as root, on those. A kernel or filesystem without idmapped
mounts is a clear error naming --userns=host; kiln never falls back silently.
"""

from __future__ import annotations

import os

from store.errors import KilnError

RANGE_OWNER = "kiln"
DEFAULT_SIZE = 65536


class UsernsError(KilnError):
    pass


def parse(text: str | None) -> int | None:
    """The size of the range --userns asks for; None for the host's ids."""
    if text in (None, "", "host"):
        return None
    kind, _, options = text.partition(":")
    if kind != "auto":
        raise UsernsError(f"invalid --userns {text!r}: host or auto[:size=N]")
    size = DEFAULT_SIZE
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        if key != "size" or not value.isdigit() or not 1 <= int(value) <= 1 << 31:
            raise UsernsError(f"invalid --userns {text!r}: the option is size=N "
                              "(1 to 2147483648 ids)")
        size = int(value)
    return size


def subordinate_ranges(path: str, owners: tuple[str, ...]) -> list[tuple[int, int]]:
    """The ``owner:start:count`` ranges of /etc/subuid or /etc/subgid for any of
    ``owners`` (a name, or a uid written as a number), in file order."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 20).splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in owners:
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if start > 0 and count > 0:
            out.append((start, count))
    return out


def allocate(size: int, taken: list[tuple[int, int]], *, subuid: str = "/etc/subuid",
             subgid: str = "/etc/subgid") -> tuple[int, int]:
    """The lowest block of ``size`` ids in kiln's ranges (of both files) that overlaps no
    ``taken`` block. The caller holds the lock under which the taken blocks were listed."""
    uids = subordinate_ranges(subuid, (RANGE_OWNER,))
    gids = subordinate_ranges(subgid, (RANGE_OWNER,))
    if not uids or not gids:
        raise UsernsError(f"--userns=auto needs a range for {RANGE_OWNER!r} in {subuid} and "
                          f"{subgid}, e.g. the line '{RANGE_OWNER}:1000000000:1000000000' "
                          "in both")

    def inside(first: int, ranges) -> bool:
        return any(s <= first and first + size <= s + n for s, n in ranges)

    for start, count in sorted(uids):
        first = start
        while first + size <= start + count:
            clash = [(s, n) for s, n in taken if s < first + size and first < s + n]
            if not clash:
                if inside(first, gids):
                    return first, size
                first += size
                continue
            first = max(s + n for s, n in clash)
    raise UsernsError(f"no free block of {size} ids left in the {RANGE_OWNER!r} ranges of "
                      f"{subuid} and {subgid} (each container keeps its block until kiln rm)")


def open_namespace(first: int, size: int) -> int:
    """A new user namespace mapping ids 0..size-1 to ``first``..: an fd of it (the process
    made to create it is gone when this returns)."""
    from runtime import syscalls as sc

    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(done_w)
            sc.unshare(sc.CLONE_NEWUSER)
            os.write(ready_w, b"u")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"u":
            raise UsernsError("cannot make a user namespace (user.max_user_namespaces?)")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(f"0 {first} {size}\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)


