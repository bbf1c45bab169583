"""What ``kiln run NAME`` needs from the store, remembered for the names already run.

Resolving a name the full way (the reference grammar, index.json through the strict
document parsers, manifest and config blobs read and verified, each layer unpacked or
found) costs a kiln run more than everything else it does before the container starts,
mostly in importing the store's document model. So once a name has been resolved that
way, its answer is kept in ``containers/.cache/images.marshal``: the manifest digest, the
image config's ``config`` object and the layer dirs, bottom first.

The file is marshal, not JSON: the json package costs more to import than this whole
lookup, and marshal is loaded with the interpreter. marshal trusts what it reads no more
than it must (only plain values are accepted back), and the file is kiln's own, 0600 in
the store's 0700 containers/.cache, beside the layer dirs it names: whoever can write it
can already change any image.

An answer stands while index.json is the very file it was read from (inode, size and
mtime in ns: every tag change writes a new file and renames it into place) and while every
layer dir is still there. Nothing else can change it: manifests and configs are blobs,
named by their digest. Names resolved without the index (a digest whose manifest is only a
blob) are not kept. The caller holds the store lock shared around both ``lookup`` and
what it does with the answer, as around a full resolve, so prune cannot remove the layers
in between.
"""

from __future__ import annotations

import marshal
import os

MAX_NAMES = 64  # answers kept per index.json; the file stays a few KiB
CACHE_FILE = "images.marshal"
MAGIC = b"kiln-images 1\n"


class Answer:
    __slots__ = ("digest", "config", "layers")

    def __init__(self, digest: str, config: dict, layers: list[str]):
        self.digest = digest  # the manifest's
        self.config = config  # the image config's "config" object
        self.layers = layers  # unpacked layer dirs, bottom first


def index_identity(root: str) -> list[int] | None:
    try:
        st = os.stat(os.path.join(root, "index.json"))
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _read(cache_dir: str) -> dict:
    try:
        with open(os.path.join(cache_dir, CACHE_FILE), "rb") as f:
            data = f.read(1 << 20)
        doc = marshal.loads(data[len(MAGIC):]) if data.startswith(MAGIC) else None
    except (OSError, ValueError, EOFError, TypeError):
        return {}
    return doc if isinstance(doc, dict) and _plain(doc) else {}


def _plain(value: object, depth: int = 0) -> bool:
    """Only what JSON could hold: no code objects, sets or bytes from a marshal stream."""
    if depth > 32:
        return False
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v, depth + 1) for v in value)
    return value is None or isinstance(value, (str, int, float))


def lookup(root: str, cache_dir: str, name: str) -> Answer | None:
    """The remembered answer for ``name``, or None when there is none that still stands."""
    identity = index_identity(root)
    doc = _read(cache_dir)
    if identity is None or doc.get("index") != identity:
        return None
    entry = (doc.get("images") or {}).get(name)
    if not isinstance(entry, dict):
        return None
    digest, config, layers = entry.get("digest"), entry.get("config"), entry.get("layers")
    if not (isinstance(digest, str) and isinstance(config, dict) and isinstance(layers, list)
            and all(isinstance(d, str) and os.path.isdir(d) for d in layers)):
        return None
    return Answer(digest, config, layers)


def remember(cache_dir: str, identity: list[int] | None, name: str, answer: Answer) -> None:
    """Keep ``answer`` for ``name``, as read from the index.json of ``identity`` (taken
    before that read and found unchanged after it). Best effort: errors are ignored."""
    if identity is None:
        return
    doc = _read(cache_dir)
    images = doc.get("images") if doc.get("index") == identity else None
    if not isinstance(images, dict) or len(images) >= MAX_NAMES:
        images = {}
    images[name] = {"digest": answer.digest, "config": answer.config,
                    "layers": answer.layers}
    data = MAGIC + marshal.dumps({"index": identity, "images": images})
    from store.fsutil import replace_file

    try:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        replace_file(os.path.join(cache_dir, CACHE_FILE), data, mode=0o600)
    except OSError:
        pass
