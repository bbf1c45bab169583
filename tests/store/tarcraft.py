"""Hand-made tar bytes for extractor tests, hostile ones included.

tarfile refuses to write many of the things a hostile layer contains (NUL in a
PAX path, a wrong checksum, an absurd size field), so headers are built here
field by field. Also: a snapshot of a directory tree, to prove nothing changed.
"""

from __future__ import annotations

import hashlib
import os
import stat

BLOCK = 512


def octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def base256(value: int, width: int) -> bytes:
    """GNU base-256 numeric field (for values octal cannot hold, or negative ones)."""
    if value < 0:
        raw = (value + (1 << (8 * width))).to_bytes(width, "big")
        return b"\xff" + raw[1:]
    return b"\x80" + value.to_bytes(width - 1, "big")


def _field(value: bytes, width: int) -> bytes:
    assert len(value) <= width, (value, width)
    return value + b"\0" * (width - len(value))


def header(
    name: bytes,
    *,
    typeflag: bytes = b"0",
    size: int = 0,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 1_600_000_000,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
    prefix: bytes = b"",
    magic: bytes = b"ustar\x0000",
    size_field: bytes | None = None,
    uid_field: bytes | None = None,
    checksum: int | None = None,
) -> bytes:
    """One 512-byte header block. ``checksum`` overrides the computed one."""
    block = b"".join(
        [
            _field(name, 100),
            octal(mode, 8),
            uid_field if uid_field is not None else octal(uid, 8),
            octal(gid, 8),
            size_field if size_field is not None else octal(size, 12),
            octal(mtime, 12),
            b" " * 8,
            typeflag,
            _field(linkname, 100),
            magic,
            _field(b"root", 32),
            _field(b"root", 32),
            octal(devmajor, 8),
            octal(devminor, 8),
            _field(prefix, 155),
            b"\0" * 12,
        ]
    )
    assert len(block) == BLOCK
    chk = sum(block) if checksum is None else checksum
    return block[:148] + b"%06o\0 " % chk + block[156:]


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def member(name: bytes, data: bytes = b"", **kw) -> bytes:
    """A header (size taken from data unless given) followed by its padded data."""
    kw.setdefault("size", len(data))
    return header(name, **kw) + pad(data)


def file(name: bytes, data: bytes = b"", **kw) -> bytes:
    return member(name, data, **kw)


def directory(name: bytes, **kw) -> bytes:
    kw.setdefault("mode", 0o755)
    return header(name, typeflag=b"5", **kw)


def symlink(name: bytes, target: bytes, **kw) -> bytes:
    kw.setdefault("mode", 0o777)
    return header(name, typeflag=b"2", linkname=target, **kw)


def hardlink(name: bytes, target: bytes, **kw) -> bytes:
    return header(name, typeflag=b"1", linkname=target, **kw)


def pax_records(records: list[tuple[bytes, bytes]]) -> bytes:
    out = []
    for key, value in records:
        body = b" " + key + b"=" + value + b"\n"
        n = len(body) + 1
        while len(b"%d" % n) + len(body) != n:
            n += 1
        out.append(b"%d" % n + body)
    return b"".join(out)


def pax(records: list[tuple[bytes, bytes]], *, typeflag: bytes = b"x") -> bytes:
    """A PAX extended ('x') or global ('g') header with its records."""
    data = pax_records(records)
    return member(b"././@PaxHeader", data, typeflag=typeflag)


def gnu_long(value: bytes, typeflag: bytes = b"L") -> bytes:
    """GNU long name ('L') or long link ('K') pseudo-entry."""
    return member(b"././@LongLink", value + b"\0", typeflag=typeflag)


def end() -> bytes:
    return b"\0" * (2 * BLOCK)


def tar(*parts: bytes) -> bytes:
    return b"".join(parts) + end()


# --------------------------------------------------------------------------- snapshots


def snapshot(root: str | os.PathLike, *, exclude: tuple[str, ...] = ()) -> dict:
    """Everything observable about a tree: names, types, modes, owners, sizes,
    mtimes, link counts, contents, symlink targets and xattrs (never following links)."""
    root = os.fspath(root)
    skip = {os.path.abspath(p) for p in exclude}
    out: dict = {}

    def record(path: str) -> None:
        st = os.lstat(path)
        info: dict = {
            "mode": st.st_mode,
            "uid": st.st_uid,
            "gid": st.st_gid,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "nlink": st.st_nlink,
            "rdev": st.st_rdev,
        }
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                info["sha256"] = hashlib.sha256(f.read()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            info["target"] = os.readlink(path)
        try:
            names = sorted(os.listxattr(path, follow_symlinks=False))
            info["xattrs"] = {n: os.getxattr(path, n, follow_symlinks=False) for n in names}
        except OSError:
            pass
        out[os.path.relpath(path, root)] = info

    record(root)
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.abspath(os.path.join(top, d)) not in skip]
        for name in dirs + files:
            path = os.path.join(top, name)
            if os.path.abspath(path) in skip:
                continue
            record(path)
    return out


def file_state(path: str) -> tuple | None:
    """Stat and content digest of one file outside the test tree (e.g. /etc/passwd)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_nlink, digest)
