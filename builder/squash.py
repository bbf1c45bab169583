"""``kiln build --layers=false``: a stage's new layers become one, on top of its base.

The new layers are replayed in order onto the merged view of the base (an
overlay whose upper dir starts empty): deletions (0:0 whiteouts) delete,
opaque directories are emptied first, everything else is copied with its
metadata. The overlay itself then records the combined change in the upper
dir -- whiteouts for base files that went away included -- which is the
squashed layer.
"""

from __future__ import annotations

import os
import shutil
import stat

from store.fsutil import is_overlay_xattr, overlay_xattr_prefix


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _copy_meta(src_st: os.stat_result, dst: str, src: str) -> None:
    os.chown(dst, src_st.st_uid, src_st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(src_st.st_mode):
        os.chmod(dst, stat.S_IMODE(src_st.st_mode))
        for name in os.listxattr(src, follow_symlinks=False):
            if not is_overlay_xattr(name):
                os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False),
                            follow_symlinks=False)
    os.utime(dst, ns=(src_st.st_atime_ns, src_st.st_mtime_ns), follow_symlinks=False)


def replay_layer(layer_dir: str, root: str) -> None:
    """Apply one overlay-format layer dir onto the merged filesystem at ``root``."""
    dirs_meta = []
    for dirpath, dirnames, filenames in os.walk(layer_dir):
        rel = os.path.relpath(dirpath, layer_dir)
        target_dir = root if rel == "." else os.path.join(root, rel)
        if rel != ".":
            if os.path.lexists(target_dir) and not os.path.isdir(target_dir):
                os.unlink(target_dir)
            opaque = _get_opaque(dirpath) == b"y"
            if opaque and os.path.isdir(target_dir):
                for name in os.listdir(target_dir):
                    _remove(os.path.join(target_dir, name))
            os.makedirs(target_dir, exist_ok=True)
            dirs_meta.append((os.lstat(dirpath), target_dir, dirpath))
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            src = os.path.join(dirpath, name)
            dst = os.path.join(target_dir, name)
            st = os.lstat(src)
            if _is_whiteout(st):
                _remove(dst)
                continue
            if os.path.lexists(dst) and (not os.path.isdir(dst) or os.path.islink(dst)):
                os.unlink(dst)
            elif os.path.isdir(dst):
                shutil.rmtree(dst)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), dst)
            elif stat.S_ISREG(st.st_mode):
                shutil.copyfile(src, dst, follow_symlinks=False)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
                os.mknod(dst, st.st_mode, st.st_rdev)
            else:
                continue
            _copy_meta(st, dst, src)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    for st, target, src in reversed(dirs_meta):  # after their contents: mtimes stick
        _copy_meta(st, target, src)


def _get_opaque(path: str) -> bytes | None:
    try:
        return os.getxattr(path, overlay_xattr_prefix() + "opaque", follow_symlinks=False)
    except OSError:
        return None
