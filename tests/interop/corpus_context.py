"""Build contexts of the build corpus: a case's committed files plus what git cannot keep.

A case directory (tests/interop/build_corpus/NNN-name/) holds its Containerfile and the
context files git can store. Everything else is declared in the case's ``context.json``, a
list of entries applied in order after the committed files are copied:

    {"path": "p", "type": "file", "text": "...", "mode": "4755", "uid": 1000, "gid": 50,
     "xattrs": {"user.k": "v", "user.bin": "hex:00ff"}, "caps": "cap_net_raw=ep"}
    {"path": "p", "type": "file", "size": 3000000}     pseudo-random bytes (seeded by path)
    {"path": "p.gz", "type": "file", "text": "...", "gzip": true}   gzip-compressed contents
    {"path": "p", "type": "dir", "mode": "1777"}
    {"path": "p", "type": "symlink", "target": "../x"}
    {"path": "p", "type": "hardlink", "target": "other/file"}
    {"path": "p", "type": "fifo"}
    {"path": "p", "mode": "0600"}                      no type: change what is there
    {"path": "a.tar.gz", "type": "tar", "compression": "gz", "members": [...]}

``caps`` sets security.capability with setcap (Debian's libcap2-bin). A tar's members use
the same keys (file, dir, symlink, hardlink; mode, uid, gid, xattrs as PAX SCHILY.xattr);
its compression is none, gz, bz2 or xz. Committed files get mode 0644 (0755 when git
marks them executable), directories 0755, all owned by 0:0, whatever the checkout's
umask and user: only context.json says otherwise.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

# what a case directory holds that is not part of its build context
CASE_FILES = ("context.json", "case.toml")


def _random_bytes(seed: str, size: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(seed.encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64  # 2 KiB per hash: cheap, and incompressible enough across blocks
    return bytes(out[:size])


def _xattr_bytes(value: str) -> bytes:
    return bytes.fromhex(value[4:]) if value.startswith("hex:") else value.encode()


def _content(entry: dict) -> bytes:
    data = b""
    if "text" in entry:
        data = entry["text"].encode()
    elif "size" in entry:
        data = _random_bytes(entry["path"], entry["size"])
    if entry.get("gzip"):
        import gzip

        data = gzip.compress(data, mtime=0)
    return data


def _apply_meta(path: Path, entry: dict) -> None:
    if "uid" in entry or "gid" in entry:
        st = os.lstat(path)
        os.lchown(path, entry.get("uid", st.st_uid), entry.get("gid", st.st_gid))
    if "mode" in entry:  # after chown: chown clears setuid/setgid
        os.chmod(path, int(entry["mode"], 8))
    for name, value in entry.get("xattrs", {}).items():
        os.setxattr(path, name, _xattr_bytes(value), follow_symlinks=False)
    if "caps" in entry:
        subprocess.run(["setcap", entry["caps"], str(path)], check=True, capture_output=True)


def _make(root: Path, entry: dict) -> None:
    path = root / entry["path"]
    kind = entry.get("type")
    if kind is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            raise ValueError(f"context.json: {entry['path']} already exists")
    if kind == "file":
        path.write_bytes(_content(entry))
        os.chmod(path, 0o644)
    elif kind == "dir":
        path.mkdir()
        os.chmod(path, 0o755)
    elif kind == "symlink":
        os.symlink(entry["target"], path)
    elif kind == "hardlink":
        os.link(root / entry["target"], path)
    elif kind == "fifo":
        os.mkfifo(path, 0o644)
    elif kind == "tar":
        path.write_bytes(make_tar(entry["members"], entry.get("compression", "none")))
        os.chmod(path, 0o644)
    elif kind is not None:
        raise ValueError(f"context.json: {entry['path']}: unknown type {kind!r}")
    _apply_meta(path, entry)


def make_tar(members: list[dict], compression: str) -> bytes:
    buf = io.BytesIO()
    mode = {"none": "w", "gz": "w:gz", "bz2": "w:bz2", "xz": "w:xz"}[compression]
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m["path"])
            info.mtime = 1_600_000_000
            info.uid, info.gid = m.get("uid", 0), m.get("gid", 0)
            kind = m.get("type", "file")
            data = b""
            if kind == "file":
                data = _content(m)
                info.size = len(data)
                info.mode = 0o644
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, m["target"], 0o777
            elif kind == "hardlink":
                info.type, info.linkname, info.mode = tarfile.LNKTYPE, m["target"], 0o644
            else:
                raise ValueError(f"context.json tar member {m['path']}: unknown type {kind!r}")
            if "mode" in m:
                info.mode = int(m["mode"], 8)
            info.pax_headers = {f"SCHILY.xattr.{k}": _xattr_bytes(v).decode("utf-8",
                                                                            "surrogateescape")
                                for k, v in m.get("xattrs", {}).items()}
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return buf.getvalue()


def _normalise(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            os.lchown(p, 0, 0)
            if os.path.islink(p):
                continue
            if os.path.isdir(p):
                os.chmod(p, 0o755)
            else:
                os.chmod(p, 0o755 if st.st_mode & 0o100 else 0o644)
    os.chmod(root, 0o755)


def materialise(case_dir: Path, dest: Path, *, leave_out: tuple[str, ...] = ()) -> Path:
    """The build context of ``case_dir`` at ``dest`` (which must not exist)."""
    skip = set(CASE_FILES) | set(leave_out)
    shutil.copytree(case_dir, dest, symlinks=True,
                    ignore=lambda d, names: [n for n in names
                                             if Path(d) == case_dir and n in skip])
    _normalise(dest)
    spec = case_dir / "context.json"
    if spec.is_file():
        for entry in json.loads(spec.read_text()):
            _make(dest, entry)
    return dest
