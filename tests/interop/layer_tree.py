"""The root filesystem an image's layer tars make, computed from the tars alone.

The build corpus compares what kiln and buildah built without unpacking either image on
disk: each layer tar is read once (cached by diff_id, so the shared busybox base layer is
hashed once for the whole corpus) and applied in memory as the OCI image spec's
"Applying Changesets" says: an entry replaces what its path held unless both are
directories (then only the metadata changes), ``.wh.<name>`` deletes ``<name>`` of the
layers below, ``.wh..wh..opq`` empties its directory of what the layers below put there,
and a hardlink entry names the inode of its target. Reading the tars also sees what an
extraction on this host could lose: xattrs the filesystem does not keep, owners, devices.

``tests/interop/test_build_corpus.py::test_layer_tree_equals_umoci`` checks this model
against umoci's real extraction of a layered image full of awkward entries.
"""

from __future__ import annotations

import base64
import hashlib
import posixpath
import tarfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import BinaryIO, NamedTuple

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"

_KINDS = {
    tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.CONTTYPE: "file",
    tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo",
}


@dataclass(frozen=True)
class Node:
    """One path of a merged tree. ``data``: a file's sha256 (16 hex digits), a symlink's
    target, a device's "major,minor". ``inode`` only groups hardlinks (see ``view``)."""

    kind: str
    mode: int  # the permission bits with setuid/setgid/sticky (07777)
    uid: int
    gid: int
    size: int = 0
    data: str = ""
    xattrs: tuple[tuple[str, str], ...] = ()
    inode: int = 0


class Entry(NamedTuple):
    """A path of a merged tree as the corpus compares it (mtimes are not part of it)."""

    kind: str  # file dir symlink char block fifo
    mode: str  # "0755", "4755": permission bits with setuid/setgid/sticky
    uid: int
    gid: int
    size: int
    data: str  # see Node
    xattrs: tuple[tuple[str, str], ...]  # (name, text or "hex:...")
    links: tuple[str, ...]  # the other names of a file's inode: its hardlink group


@dataclass(frozen=True)
class Op:
    """One tar entry, parsed: what applying it does."""

    path: str
    whiteout: str | None = None  # "opaque" or "file"
    node: Node | None = None
    link_to: str | None = None  # a hardlink entry: the path whose inode it names


def norm(name: str) -> str:
    """A tar name as a tree path: relative, no "./", no trailing "/", root is ""."""
    path = posixpath.normpath("/" + name).lstrip("/")
    return "" if path == "." else path


def _xattr_value(raw: bytes) -> str:
    try:
        text = raw.decode()
        if text.isprintable():
            return text
    except UnicodeDecodeError:
        pass
    return "hex:" + raw.hex()


def _xattrs(member: tarfile.TarInfo) -> tuple[tuple[str, str], ...]:
    out = []
    for key, value in member.pax_headers.items():
        # tarfile decodes PAX values as UTF-8 with surrogateescape: encode them back
        raw = value.encode("utf-8", "surrogateescape")
        if key.startswith("SCHILY.xattr."):
            out.append((key[len("SCHILY.xattr."):], _xattr_value(raw)))
        elif key.startswith("LIBARCHIVE.xattr."):
            from urllib.parse import unquote

            out.append((unquote(key[len("LIBARCHIVE.xattr."):]),
                        _xattr_value(base64.b64decode(raw + b"=" * (-len(raw) % 4)))))
    return tuple(sorted(out))


def parse_layer(stream: BinaryIO) -> list[Op]:
    """A layer tar (uncompressed) as the list of what its entries do, in tar order."""
    ops: list[Op] = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for m in tar:
            path = norm(m.name)
            base = posixpath.basename(path)
            if base == OPAQUE:
                ops.append(Op(posixpath.dirname(path), whiteout="opaque"))
                continue
            if base.startswith(WHITEOUT):
                ops.append(Op(posixpath.join(posixpath.dirname(path), base[len(WHITEOUT):]),
                              whiteout="file"))
                continue
            if m.type == tarfile.LNKTYPE:
                ops.append(Op(path, link_to=norm(m.linkname)))
                continue
            kind = _KINDS.get(m.type)
            if kind is None:
                raise ValueError(f"layer entry {m.name!r} has a tar type {m.type!r} "
                                 "no image layer should hold")
            data, size = "", 0
            if kind == "file":
                f = tar.extractfile(m)
                h = hashlib.sha256()
                assert f is not None
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
                data = h.hexdigest()[:16]
            elif kind == "symlink":
                data = m.linkname
            elif kind in ("char", "block"):
                data = f"{m.devmajor},{m.devminor}"
            ops.append(Op(path, node=Node(kind, m.mode & 0o7777, m.uid, m.gid, size, data,
                                          _xattrs(m))))
    return ops


class LayerCache:
    """Parsed layers by diff_id, shared by the corpus's threads."""

    def __init__(self) -> None:
        self._ops: dict[str, list[Op]] = {}
        self._lock = threading.Lock()

    def ops(self, diff_id: str, opener: Callable[[], BinaryIO]) -> list[Op]:
        with self._lock:
            hit = self._ops.get(diff_id)
        if hit is None:
            with opener() as stream:
                hit = parse_layer(stream)
            with self._lock:
                self._ops[diff_id] = hit
        return hit


class Tree:
    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {"": Node("dir", 0o755, 0, 0)}
        self._next_inode = 1

    def _inode(self) -> int:
        self._next_inode += 1
        return self._next_inode

    def _remove(self, path: str, keep: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """``path`` and what is below it, but for the paths in ``keep``."""
        prefix = path + "/" if path else ""
        for p in [p for p in self.nodes if (p == path or p.startswith(prefix)) and p]:
            if p not in keep:
                del self.nodes[p]

    def _parents(self, path: str) -> None:
        parent = posixpath.dirname(path)
        if parent and parent not in self.nodes:
            self._parents(parent)
            self.nodes[parent] = Node("dir", 0o755, 0, 0, inode=self._inode())

    def apply(self, ops: Iterable[Op]) -> None:
        added: set[str] = set()  # what this layer put: its opaque dirs keep them
        for op in ops:
            if op.whiteout == "opaque":
                prefix = op.path + "/" if op.path else ""
                for p in [p for p in self.nodes if p and p.startswith(prefix) and p not in added]:
                    del self.nodes[p]
                continue
            if op.whiteout == "file":
                self._remove(op.path, keep=added)
                continue
            if op.link_to is not None:
                target = self.nodes.get(op.link_to)
                if target is None or target.kind == "dir":
                    raise ValueError(f"hardlink {op.path!r} -> {op.link_to!r}: no such file")
                node = target
            else:
                assert op.node is not None
                node = replace(op.node, inode=self._inode())
            old = self.nodes.get(op.path)
            if old is not None and not (old.kind == "dir" and node.kind == "dir"):
                self._remove(op.path, keep=added - {op.path})
            self._parents(op.path)
            self.nodes[op.path] = node
            added.add(op.path)

    def view(self) -> dict[str, Entry]:
        """Absolute path ("/" for the root) -> its Entry."""
        names: dict[int, list[str]] = {}
        for p, n in self.nodes.items():
            if n.kind != "dir":
                names.setdefault(n.inode, []).append(p)
        out = {}
        for p, n in sorted(self.nodes.items()):
            links = tuple(sorted("/" + q for q in names.get(n.inode, ()) if q != p)) \
                if n.kind != "dir" else ()
            out["/" + p] = Entry(n.kind, f"{n.mode:04o}", n.uid, n.gid, n.size, n.data,
                                 n.xattrs, links)
        return out


def merged_view(layers: Iterable[list[Op]]) -> dict[str, Entry]:
    tree = Tree()
    for ops in layers:
        tree.apply(ops)
    return tree.view()
