"""RUN --mount: parsing (BuildKit's syntax), cache-key parts, and the host side of each mount.

Types, as BuildKit's Dockerfile frontend documents them:

* ``bind`` (the default): a path of the build context (after the ignore file), of another
  stage, or of an image, read-only unless ``rw``; writes to a ``rw`` bind are thrown away.
  A symlink as ``source`` resolves inside the root it belongs to.
* ``cache``: a directory under ``<store>/cache-mounts/<sha256 of id>/`` that outlives the
  build (and ``--no-cache``); ``sharing=shared|private|locked``; ``mode/uid/gid`` apply when
  it is created, ``from``/``source`` seed it then.
* ``tmpfs``: a tmpfs, ``size=`` bounded.
* ``secret``: ``kiln build --secret id=x,src=FILE|env=VAR``, bind-mounted read-only from a
  0400 file in the step's work dir (``/run/secrets/<id>`` by default) and/or put in an env
  var (``env=``). Its value reaches no layer, history entry or cache key: only its id does.

Nothing here mounts anything: the runtime does, in the step's sandbox (``runtime.rootfs``).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import hashlib
import os
import posixpath
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from store.errors import KilnError
from store.fsutil import write_all

MOUNT_TYPES = ("bind", "cache", "tmpfs", "secret", "ssh")
SHARING_MODES = ("shared", "private", "locked")
MAX_SECRET_BYTES = 500 << 10  # BuildKit's limit for one secret
MAX_PRIVATE_CACHES = 64  # private cache mounts of one id in use at once
_KEYS = ("type", "from", "source", "src", "target", "dst", "destination", "readonly", "ro",
         "readwrite", "rw", "id", "sharing", "required", "mode", "uid", "gid", "size", "env")
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


class MountError(KilnError):
    pass


@dataclass(frozen=True)
class MountSpec:
    type: str
    target: str  # absolute in the container; "" for a secret given only as an env var
    source: str = ""
    from_: str | None = None
    readonly: bool = True
    id: str = ""  # cache id, or the secret's id
    sharing: str = "shared"
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    required: bool = False
    size: int | None = None  # tmpfs bytes
    env: str | None = None  # secret as an environment variable

    def describe(self) -> dict:
        """What the cache key sees of this mount: its settings, never a secret's value."""
        return {k: v for k, v in (
            ("type", self.type), ("target", self.target), ("source", self.source),
            ("from", self.from_), ("readonly", self.readonly), ("id", self.id),
            ("sharing", self.sharing if self.type == "cache" else None), ("mode", self.mode),
            ("uid", self.uid), ("gid", self.gid), ("required", self.required or None),
            ("size", self.size), ("env", self.env)) if v is not None and v != ""}


# -- parsing ---------------------------------------------------------------------------------
def _bool(key: str, value: str) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise MountError(f"invalid value for {key}: {value}")


def _number(key: str, value: str, base: int) -> int:
    try:
        n = int(value, base)
    except ValueError:
        raise MountError(f"invalid value {value} for {key}") from None
    if n < 0 or n > 0xFFFFFFFF:
        raise MountError(f"invalid value {value} for {key}")
    return n


_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtTpP]?)([iI]?[bB]?)")


def parse_size(text: str) -> int:
    """A RAM size as docker's units.RAMInBytes reads it: 64m, 1g, 512MiB, 1048576 (binary)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise MountError(f"invalid value for size: {text}")
    power = " kmgtp".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * (1024 ** power))


def parse_mount(text: str, expand: Callable[[str], str], *, workdir: str = "/") -> MountSpec:
    """One ``--mount=`` value (CSV ``key=value`` fields, values expanded with ``expand``)."""
    try:
        fields = next(csv.reader([text], skipinitialspace=False), [])
    except csv.Error as e:
        raise MountError(f"failed to parse csv mounts: {e}") from None
    kind = "bind"
    values: dict[str, object] = {}
    ro_auto = True
    for fld in fields:
        key, eq, value = fld.partition("=")
        key = key.lower()
        if not eq:
            if key in ("readonly", "ro"):
                values["readonly"], ro_auto = True, False
            elif key in ("readwrite", "rw"):
                values["readonly"], ro_auto = False, False
            elif key == "required":
                if kind not in ("secret", "ssh"):
                    raise MountError(f"unexpected key '{key}' for mount type '{kind}'")
                values["required"] = True
            else:
                raise MountError(f"invalid field '{fld}' must be a key=value pair")
            continue
        value = expand(value)
        if key == "type":
            kind = value.lower()
            if kind not in MOUNT_TYPES:
                raise MountError(f"unsupported mount type {value!r} (one of "
                                 f"{', '.join(MOUNT_TYPES)})")
        elif key == "from":
            values["from_"] = value
        elif key in ("source", "src"):
            values["source"] = value
        elif key in ("target", "dst", "destination"):
            values["target"] = value
        elif key in ("readonly", "ro"):
            values["readonly"], ro_auto = _bool(key, value), False
        elif key in ("readwrite", "rw"):
            values["readonly"], ro_auto = not _bool(key, value), False
        elif key == "required":
            if kind not in ("secret", "ssh"):
                raise MountError(f"unexpected key '{key}' for mount type '{kind}'")
            values["required"] = _bool(key, value)
        elif key == "size":
            if kind != "tmpfs":
                raise MountError(f"unexpected key '{key}' for mount type '{kind}'")
            values["size"] = parse_size(value)
        elif key == "id":
            values["id"] = value
        elif key == "sharing":
            if value.lower() not in SHARING_MODES:
                raise MountError(f"unsupported sharing value {value!r} (one of "
                                 f"{', '.join(SHARING_MODES)})")
            values["sharing"] = value.lower()
        elif key == "mode":
            values["mode"] = _number(key, value, 8)
        elif key in ("uid", "gid"):
            values[key] = _number(key, value, 10)
        elif key == "env":
            if kind != "secret":
                raise MountError(f"unexpected key '{key}' for mount type '{kind}'")
            values["env"] = value
        else:
            raise MountError(f"unexpected key '{key}' in '{fld}' (known: {', '.join(_KEYS)})")
    return _validate(kind, values, ro_auto, workdir)


def _validate(kind: str, v: dict, ro_auto: bool, workdir: str) -> MountSpec:
    if kind == "ssh":
        raise MountError("RUN --mount=type=ssh is not supported by kiln yet")
    if kind not in ("secret", "cache") and any(k in v for k in ("mode", "uid", "gid")):
        raise MountError(f"mode, uid and gid are not allowed for {kind!r} type mounts")
    if "sharing" in v and kind != "cache":
        raise MountError(f"invalid cache sharing set for {kind} mount")
    if ro_auto:
        v["readonly"] = kind not in ("cache", "tmpfs")
    target = str(v.pop("target", ""))
    if kind == "secret":
        if v.get("from_"):
            raise MountError("secret mount should not have a from")
        source, ident = str(v.pop("source", "")), str(v.get("id", ""))
        if source and ident:
            raise MountError("both source and id can't be set")
        ident = source or ident
        if not ident:
            if not target:
                raise MountError("invalid secret mount: one of source, target, id required")
            ident = posixpath.basename(target.rstrip("/"))
        v["id"] = ident
        if not target and not v.get("env"):
            target = "/run/secrets/" + posixpath.basename(ident)
    elif not target:
        raise MountError(f"a {kind} mount needs target=<path in the container>")
    if target:
        target = posixpath.normpath(posixpath.join("/", workdir, target))
        if target == "/":
            raise MountError(f"invalid mount target {target!r}")
    if kind == "cache" and not v.get("id"):
        v["id"] = target  # BuildKit: the id defaults to the target
    return MountSpec(type=kind, target=target, **v)


def check_secrets(specs: list[MountSpec], secrets: dict[str, dict[str, str]]) -> None:
    """A ``required`` secret that the build was not given fails the step, even when cached."""
    for m in specs:
        if m.type == "secret" and m.required and read_secret(m.id, secrets) is None:
            raise MountError(f"secret {m.id!r} is required but was not given (kiln build "
                             f"--secret id={m.id},src=FILE or id={m.id},env=VAR)")


def read_secret(ident: str, secrets: dict[str, dict[str, str]]) -> bytes | None:
    given = secrets.get(ident)
    if given is None:
        return None
    if "env" in given:
        value = os.environ.get(given["env"])
        return None if value is None else os.fsencode(value)
    path = given.get("src", "")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_BYTES + 1)
    except OSError as e:
        raise MountError(f"secret {ident!r}: cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_SECRET_BYTES:
        raise MountError(f"secret {ident!r}: {path} is larger than {MAX_SECRET_BYTES} bytes")
    return data


# -- the host side ---------------------------------------------------------------------------
@dataclass
class PreparedMounts:
    """What the sandbox gets (``binds``, ``tmpfs``, ``env``) and what the step must undo."""

    binds: list = field(default_factory=list)
    tmpfs: list = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    secret_files: list[str] = field(default_factory=list)
    _locks: list[int] = field(default_factory=list)
    _caches: dict[str, str] = field(default_factory=dict)  # id -> dir, locked once per step

    def forget_secrets(self) -> None:
        """Once the sandbox has bind-mounted them, the files need not exist on disk."""
        while self.secret_files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.secret_files.pop())

    def release(self) -> None:
        self.forget_secrets()
        while self._locks:
            os.close(self._locks.pop())  # closing drops the flock


@dataclass(frozen=True)
class BindSource:
    """Where a bind mount's files come from, decided before the cache check."""

    kind: str  # context | layers
    entries: list | None = None  # context entries (builder.context.ContextFile), sorted
    base: str = ""  # for context: the source path relative to the context root
    layers: tuple[str, ...] = ()  # for layers: the stage's or image's layer dirs


def cache_mount_dir(store_root: str, ident: str, n: int = 0) -> str:
    name = hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()
    return os.path.join(store_root, "cache-mounts", name if n == 0 else f"{name}.{n}")


@contextlib.contextmanager
def prepared_mounts(specs: list[MountSpec], sources: dict[int, BindSource], *, work: str,
                    store_root: str, context_root: str, secrets: dict[str, dict[str, str]],
                    seed: Callable[[MountSpec, str], bool] | None = None
                    ) -> Iterator[PreparedMounts]:
    """Make every mount's host side in ``work`` (removed by the caller); cache locks are held
    until the block ends. ``seed(spec, dir)`` may fill a new cache dir (from ``from=``, or
    from an imported build cache) and says whether it did."""
    from runtime.rootfs import LayeredBind
    from runtime.spec import BindMount, TmpfsMount

    out = PreparedMounts()
    try:
        for i, m in enumerate(specs):
            scratch = os.path.join(work, f"mount{i}")
            if m.type == "tmpfs":
                options = "rw,nosuid,nodev" + (f",size={m.size}" if m.size else "")
                out.tmpfs.append(TmpfsMount(m.target, options))
            elif m.type == "secret":
                value = read_secret(m.id, secrets)
                if value is None:
                    continue  # optional and not given: no mount, no variable
                if m.env:
                    out.env[m.env] = os.fsdecode(value)
                if m.target:
                    out.secret_files.append(_secret_file(work, i, value, m))
                    out.binds.append(BindMount(out.secret_files[-1], m.target, True))
            elif m.type == "cache":
                if m.id not in out._caches:  # the same id twice in one step: one dir, one lock
                    out._caches[m.id] = _cache_dir(m, store_root, out, seed)
                # source= is made inside the cache by the sandbox, by fd: a concurrent step
                # sharing the cache may be swapping its directories for symlinks meanwhile
                subpath = m.source if m.source and not m.from_ else ""
                out.binds.append(BindMount(out._caches[m.id], m.target, m.readonly, subpath))
            else:
                src = sources[i]
                if src.kind == "layers":
                    out.binds.append(LayeredBind(
                        m.source or "/", m.target, m.readonly, layers=src.layers,
                        upper=os.path.join(scratch, "upper"), work=os.path.join(scratch, "work"),
                        scratch=scratch))
                else:
                    out.binds.append(_context_bind(m, src, context_root, scratch))
            if m.target:
                out.targets.append(m.target)
        yield out
    finally:
        out.release()


def _secret_file(work: str, i: int, value: bytes, m: MountSpec) -> str:
    directory = os.path.join(work, "secrets")
    os.makedirs(directory, 0o700, exist_ok=True)
    path = os.path.join(directory, str(i))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
    try:
        write_all(fd, value)
        os.fchown(fd, m.uid or 0, m.gid or 0)
        os.fchmod(fd, 0o400 if m.mode is None else m.mode)
    finally:
        os.close(fd)
    return path


def _cache_dir(m: MountSpec, store_root: str, out: PreparedMounts,
               seed: Callable[[MountSpec, str], bool] | None) -> str:
    """The cache dir for ``m``, locked as its sharing mode says, created on first use.

    shared holds a shared flock (only a ``locked`` user waits for it), locked an exclusive
    one (users of the id take turns), private takes the first of ``<hash>``, ``<hash>.1``, ...
    that nobody holds."""
    from store.locks import file_lock

    candidates = [0] if m.sharing != "private" else range(MAX_PRIVATE_CACHES)
    for n in candidates:
        path = cache_mount_dir(store_root, m.id, n)
        if not os.path.isdir(path):
            os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
            with file_lock(os.path.join(os.path.dirname(path), ".create.lock")):
                if not os.path.isdir(path):
                    _create_cache_dir(m, path, seed)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if m.sharing == "private":
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                fcntl.flock(fd, fcntl.LOCK_EX if m.sharing == "locked" else fcntl.LOCK_SH)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                continue
            raise
        out._locks.append(fd)
        return path
    raise MountError(f"cache mount {m.id!r}: {MAX_PRIVATE_CACHES} private copies are in use")


def _create_cache_dir(m: MountSpec, path: str, seed) -> None:
    tmp = path + ".new"
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    os.mkdir(tmp)
    try:
        if seed is None or not seed(m, tmp):
            os.chown(tmp, m.uid or 0, m.gid or 0)
            os.chmod(tmp, 0o755 if m.mode is None else m.mode)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tree(src: str, dst: str) -> None:
    """``src`` (a directory) into the existing ``dst``: modes, owners, mtimes and symlinks kept;
    hard links inside become copies."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        target_dir = dst if rel == "." else os.path.join(dst, rel)
        for name in dirnames + filenames:
            s, d = os.path.join(dirpath, name), os.path.join(target_dir, name)
            st = os.lstat(s)
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(d, 0o700)
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(s), d)
            elif stat.S_ISREG(st.st_mode):
                shutil.copyfile(s, d, follow_symlinks=False)
            else:
                continue
            _copy_meta(st, d)
        # directories listed as symlinks by os.walk are not descended: they were made links
    for dirpath, _dirnames, _filenames in os.walk(src, topdown=False):
        rel = os.path.relpath(dirpath, src)
        st = os.lstat(dirpath)
        _copy_meta(st, dst if rel == "." else os.path.join(dst, rel))


def _copy_meta(st: os.stat_result, path: str) -> None:
    os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _context_bind(m: MountSpec, src: BindSource, context_root: str, scratch: str):
    """A bind of part of the build context: a tree of hard links to the files the ignore file
    lets through (copies where links are impossible). Read-only, it is bound as it is; a
    read-write one is the lower layer of a throwaway overlay, so no write reaches the
    context's own files through a shared inode."""
    from runtime.rootfs import LayeredBind
    from runtime.spec import BindMount

    os.makedirs(scratch, 0o755, exist_ok=True)
    tree = os.path.join(scratch, "tree")
    base = src.base
    top = os.path.join(context_root, base) if base else context_root
    st = os.stat(top)
    if not stat.S_ISDIR(st.st_mode):  # a single file: linked (read-only) or copied (rw)
        path = os.path.join(scratch, "file")
        _place_file(top, path, link=m.readonly)
        return BindMount(path, m.target, m.readonly)
    os.mkdir(tree)
    prefix = base + "/" if base else ""
    for e in src.entries or []:
        if e.path == base or not e.path.startswith(prefix):
            continue
        rel = e.path[len(prefix):]
        origin, dest = os.path.join(context_root, e.path), os.path.join(tree, rel)
        if e.kind == "dir":
            os.mkdir(dest, 0o700)
            _copy_meta(os.lstat(origin), dest)
        elif e.kind == "symlink":
            os.symlink(e.link_target or "", dest)
            _copy_meta(os.lstat(origin), dest)
        else:
            _place_file(origin, dest, link=True)
    _copy_meta(st, tree)
    if m.readonly:
        return BindMount(tree, m.target, True)
    return LayeredBind("/", m.target, False, layers=(tree,), upper=os.path.join(scratch, "upper"),
                       work=os.path.join(scratch, "work"), scratch=scratch)


def _place_file(origin: str, dest: str, *, link: bool) -> None:
    if link:
        try:
            os.link(origin, dest, follow_symlinks=False)
            return
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES):
                raise
    shutil.copyfile(origin, dest, follow_symlinks=False)
    _copy_meta(os.lstat(origin), dest)


# -- what the sandbox leaves behind ------------------------------------------------------------
def _lower_lstat(lowers: list[str], rel: str) -> os.stat_result | None:
    """lstat of ``rel`` in the merged view of ``lowers`` (bottom first); a whiteout hides it."""
    for layer in reversed(lowers):
        try:
            st = os.lstat(os.path.join(layer, rel))
        except (FileNotFoundError, NotADirectoryError):
            continue
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            return None
        return st
    return None


def resolve_in_layers(lowers: list[str], path: str) -> str:
    """``path`` with symlinks followed as the merged view of ``lowers`` would, relative to
    its root ('' for the root)."""
    from store.fsutil import walk_path

    def link_target(rel: str) -> str | None:
        st = _lower_lstat(lowers, rel)
        return _lower_readlink(lowers, rel) if st is not None and stat.S_ISLNK(st.st_mode) \
            else None

    return "/".join(walk_path(path, link_target))


def _lower_readlink(lowers: list[str], rel: str) -> str:
    for layer in reversed(lowers):
        p = os.path.join(layer, rel)
        if os.path.lexists(p):
            return os.readlink(p)
    return ""


def drop_mount_stubs(upper: str, lowers: list[str], targets: list[str]) -> None:
    """Mount points the sandbox had to create (and their parents) are not the step's changes:
    remove each that is still an empty directory or an empty file, deepest first. A parent
    that the lower layers have, copied up only to hold a stub, goes too when its mode and
    owner are unchanged."""
    for target in sorted(set(targets), key=lambda t: -t.count("/")):
        rel = resolve_in_layers(lowers, target)
        first = True
        while rel:
            path = os.path.join(upper, rel)
            lower = _lower_lstat(lowers, rel)
            if not _remove_stub(path, lower, first):
                break
            rel, first = posixpath.dirname(rel), False


def _remove_stub(path: str, lower: os.stat_result | None, may_be_file: bool) -> bool:
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return lower is not None  # nothing of it in the upper dir: look at the parent
    if stat.S_ISDIR(st.st_mode):
        if os.listdir(path):
            return False
        if lower is not None and not _copied_up_only(path, st, lower):
            return False
        os.rmdir(path)
        return True
    if may_be_file and lower is None and stat.S_ISREG(st.st_mode) and st.st_size == 0:
        os.unlink(path)
        return True
    return False


def _copied_up_only(path: str, st: os.stat_result, lower: os.stat_result) -> bool:
    """A directory of the lower layers that overlayfs copied up without a change of ours."""
    return (stat.S_ISDIR(lower.st_mode) and not _opaque(path)
            and (st.st_mode, st.st_uid, st.st_gid) == (lower.st_mode, lower.st_uid,
                                                        lower.st_gid))


def _opaque(path: str) -> bool:
    try:
        from store.fsutil import overlay_xattr_prefix

        return os.getxattr(path, overlay_xattr_prefix() + "opaque",
                           follow_symlinks=False) == b"y"
    except OSError:
        return False
