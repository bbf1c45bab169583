"""A no-op rebuild without the build: the image the same build made last time.

Rebuilding an unchanged Containerfile over an unchanged context hits the cache at every
step, and most of its time is then Python starting the builder (parser, stages, engine,
store documents) rather than work. A build that made nothing new (every step a cache hit,
no cache record written, nothing pulled or downloaded) leaves a memo, and the next build
with the same inputs takes its image from it without loading the builder.

The memo's key is what a build reads besides the store and the context: its parameters
but the names it gives the result (-t, --iidfile), the working directory, the environment
variables kiln reads (KILN_*, SOURCE_DATE_EPOCH, where the config file is, those that
``--build-arg NAME`` takes), kiln's config file, and the bytes of the Containerfile and the
ignore file.
The memo holds the image (manifest, config and layer digests, each checked to be in the
store), every image reference the build looked up in the store with what it resolved to
(or that it did not), the digest of every file the ignore file lets into the context when
the build read the context, and what the build printed, which is printed again. A build
that could pull (--pull=always|newer), downloads (ADD of a URL without --checksum), writes
--output, squashes, signs or verifies signatures, reads stdin, or runs with --no-cache
neither writes nor reads one;
``kiln prune --build-cache`` drops them with the step cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

MEMO_FORMAT = 1
MAX_MEMO = 16 << 20
_NAMES_ONLY = ("tags", "iidfile")  # what a build calls its result: not what it makes
_ENVIRONMENT = ("SOURCE_DATE_EPOCH", "HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME")


def key(params: dict, store) -> str | None:
    """The memo key of a `kiln build` with ``params`` (as kiln.build_run takes them), or
    None for a build that must run."""
    p = params
    if (p["no_cache"] or p["outputs"] or p["pull_policy"] in ("always", "newer")
            or p["sign_key"] or p["verify_keys"] or p["signature_policy"]
            or p["squash"] or not p["layers"] or p.get("cache_to")
            or p["context"] == "-" or p["containerfile"] == "-"):
        return None
    from builder.context import default_containerfile
    from builder.ignore import find_ignore_file
    from kiln.config import config_path

    context = os.path.abspath(p["context"])
    containerfile = p["containerfile"] or default_containerfile(context)
    if containerfile is None:
        return None
    ignore = find_ignore_file(context, containerfile)
    h = hashlib.sha256(b"kiln-build-memo\0")
    # the environment a build reads: kiln's own settings, SOURCE_DATE_EPOCH, where the
    # config file is, and the variables `--build-arg NAME` (no value) takes
    env = {k: v for k, v in os.environ.items()
           if k.startswith("KILN_") or k in _ENVIRONMENT}
    for arg in p["build_args"]:
        if "=" not in arg:
            env["arg:" + arg] = os.environ.get(arg)
    h.update(json.dumps([MEMO_FORMAT, sorted((k, v) for k, v in p.items()
                                             if k not in _NAMES_ONLY),
                         os.getcwd(), sorted(env.items()), str(store.root), context,
                         os.path.abspath(containerfile), str(ignore)],
                        default=repr).encode())
    for path in (containerfile, ignore, config_path()):
        h.update(b"\0" + _content_digest(path).encode())
    return h.hexdigest()


def _content_digest(path) -> str:
    if path is None:
        return "-"
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return "-"


def _path(store, memo_key: str) -> str:
    return os.path.join(str(store.root), "cache", "builds", memo_key + ".json")


def context_digest(ctx) -> str:
    """One digest over every file, directory and symlink of the context ``ctx`` (a
    builder.context.Context) lets in, through its stat cache (a file unchanged since it was
    hashed is not read), which is saved."""
    digest = ctx.digest_of(ctx.files())
    ctx.save_cache()
    return digest


def unchanged_since(fingerprint) -> bool:
    """Whether every entry of a context fingerprint (Context.fingerprint) still has its
    stat key: then the context is the one it was taken of, without walking it, matching
    it against the ignore file or hashing anything."""
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("entries"), list):
        return False
    root = fingerprint.get("root")
    if not isinstance(root, str) or not os.path.isabs(root):
        return False
    lstat, join = os.lstat, os.path.join
    try:
        for rel, size, mtime, ctime, ino, dev in fingerprint["entries"]:
            st = lstat(join(root, rel)) if rel else lstat(root)
            if (st.st_size != size or st.st_mtime_ns != mtime or st.st_ctime_ns != ctime
                    or st.st_ino != ino or st.st_dev != dev):
                return False
    except (OSError, TypeError, ValueError):
        return False
    return True


def _load(store, memo_key: str) -> dict | None:
    try:
        with open(_path(store, memo_key), "rb") as f:
            rec = json.loads(f.read(MAX_MEMO))
        if rec.get("format") != MEMO_FORMAT:
            return None
        image = rec["image"]
        rec["blobs"] = [image["digest"], rec["config"], *rec["layers"]]
        if (not all(isinstance(b, str) for b in rec["blobs"])
                or not isinstance(rec["refs"], dict) or not isinstance(rec["said"], list)):
            return None
        return rec
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _index_identity(store) -> list[int] | None:
    try:
        st = os.stat(os.path.join(str(store.root), "index.json"))
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def replay_quick(handle, params: dict, memo_key: str, started: float) -> str | None:
    """The replay without the store's model (``handle``: runtime.containers.StoreHandle;
    call with the store lock held shared): when index.json is the very file the last
    replay left, every name the build looked up resolves as it did then and every tag
    asked for is already there, so only the blobs' presence and the context are checked.
    None when that does not hold: replay() then does the full check."""
    rec = _load(handle, memo_key)
    if (rec is None or rec.get("index") is None or rec["index"] != _index_identity(handle)
            or not set(params["tags"]) <= set(rec.get("tagged") or ())
            or (not params["tags"] and rec.get("tagged") != [])):
        return None
    blobs_dir = os.path.join(handle.root, "blobs")
    for digest in rec["blobs"]:
        algorithm, _, hexdigest = digest.partition(":")
        if algorithm != "sha256" or not os.path.isfile(os.path.join(blobs_dir, algorithm,
                                                                     hexdigest)):
            return None
    if rec.get("context") is not None and not unchanged_since(rec.get("fingerprint")):
        return None
    return _finish(rec, params, started)


def replay(store, params: dict, memo_key: str, started: float) -> str | None:
    """If the memo of ``memo_key`` still holds, do what its build did (print its output,
    name the image, write --iidfile) and return the image ID; else None. ``started``:
    time.monotonic() when the build began, for the time it reports."""
    rec = _load(store, memo_key)
    if rec is None:
        return None
    from store.documents import Descriptor
    from store.errors import KilnError, NotFoundError

    try:
        if not all(store.has_blob(b) for b in rec["blobs"]):
            return None
        for name, digest in rec["refs"].items():
            try:
                now = store.resolve(name).digest
            except NotFoundError:
                now = None
            if now != digest:
                return None
        context_checked = False
        if rec.get("context") is not None and not unchanged_since(rec.get("fingerprint")):
            from builder.context import open_build_context

            ctx = open_build_context(store.cache_dir, params["context"],
                                     rec.get("containerfile"))
            if rec["context"] != context_digest(ctx):
                return None
            rec["fingerprint"] = ctx.fingerprint()  # the next no-op need not walk it
            context_checked = True
        image = rec["image"]
        desc = Descriptor(image["mediaType"], image["digest"], image["size"])
    except (KilnError, OSError, KeyError, TypeError, ValueError):
        return None
    for tag in params["tags"]:
        store.tag(tag, desc)
    if not params["tags"]:
        store.keep_untagged(desc)
    # what replay_quick needs to trust this next time: the index as it is now (every name
    # looked up resolves as above, these tags are set) and the context's fingerprint
    index, tagged = _index_identity(store), sorted(params["tags"])
    if context_checked or rec.get("index") != index or rec.get("tagged") != tagged:
        rec["index"], rec["tagged"] = index, tagged
        _write(_path(store, memo_key), {k: v for k, v in rec.items() if k != "blobs"})
    return _finish(rec, params, started)


def _finish(rec: dict, params: dict, started: float) -> str:
    import time

    if not params["quiet"]:
        sys.stderr.write("".join(line + "\n" for line in rec["said"]))
    image_id = rec["config"]
    if params["iidfile"]:
        with open(params["iidfile"], "w") as f:
            f.write(image_id)
    if not params["quiet"]:
        tags = ", ".join(params["tags"]) or "no tag"
        sys.stderr.write(f"--> {image_id[7:19]} ({tags}) in "
                         f"{time.monotonic() - started:.2f}s\n")
        sys.stderr.flush()
    return image_id


def save(store, memo_key: str, *, image: dict, config: str, layers: list[str],
         refs: dict[str, str | None], context: str | None, containerfile: str | None,
         said: list[str], fingerprint: dict | None = None, tagged: list[str] | None = None,
         ) -> None:
    """Called once the build has named its image: the index as it is now is what
    replay_quick may trust (``tagged``: the tags it set; [] for an untagged image)."""
    path = _path(store, memo_key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write(path, {"format": MEMO_FORMAT, "image": image, "config": config, "layers": layers,
                  "refs": refs, "context": context, "containerfile": containerfile,
                  "said": said, "fingerprint": fingerprint,
                  "index": _index_identity(store) if tagged is not None else None,
                  "tagged": tagged})


def _write(path: str, rec: dict) -> None:
    from store.fsutil import replace_file  # not atomic_write: no tempfile in a no-op

    replace_file(path, json.dumps(rec, separators=(",", ":")).encode())
