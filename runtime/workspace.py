"""Run a Python function against an image's merged filesystem, in a private mount namespace.

The builder's COPY/ADD steps change a layer through the merged view (so the
parent directories, their modes and the destination's symlinks are those of
the image), and read other stages' files the same way, without the kiln
process itself ever mounting anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from store.errors import KilnError


@dataclass(frozen=True)
class View:
    """An overlay to mount: ``layers`` bottom first; ``upper`` None means a throwaway one."""

    layers: list[str]
    upper: str | None = None
    readonly: bool = False


class WorkspaceError(KilnError):
    pass


def with_views(views: list[View], fn: Callable[..., Any], scratch: str) -> Any:
    """Mount every view, call ``fn(*mountpoints)`` in a child process, return its result.

    ``fn`` runs as root in a forked child (a private mount namespace), so it may
    chown and mknod; what it returns or raises is pickled back to the caller.
    """
    if os.environ.get("KILN_ISOLATION") == "chroot":  # no mounts: plain trees
        from runtime.chroot import with_trees

        return with_trees(views, fn, scratch)
    import _signal
    import pickle
    import tempfile

    from runtime import rootfs  # imported here: a cached build step never needs them
    from runtime import syscalls as sc

    r, w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            # the helper ends with the thread that waits for it, even when kiln leaves
            # without killing it (os._exit a few seconds after a Ctrl-C)
            sc.prctl(sc.PR_SET_PDEATHSIG, _signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)
            # a terminal's Ctrl-C, a CI runner's SIGTERM to the job's process group: kiln's
            # to act on (it kills this helper), not a failure of the copy
            _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
            _signal.signal(_signal.SIGTERM, _signal.SIG_IGN)
            sc.unshare(sc.CLONE_NEWNS)
            sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
            points = []
            for i, view in enumerate(views):
                base = tempfile.mkdtemp(dir=scratch, prefix=f"view{i}-")
                upper = view.upper or os.path.join(base, "upper")
                work = os.path.join(os.path.dirname(upper), f"work-{i}") if view.upper \
                    else os.path.join(base, "work")
                for d in (upper, work):
                    os.makedirs(d, exist_ok=True)
                point = os.path.join(base, "root")
                os.mkdir(point)
                rootfs.mount_overlay(view.layers, upper, work, point, base, nodev=False)
                if view.readonly:
                    sc.mount(None, point, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY)
                points.append(point)
            result = ("ok", fn(*points))
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
            if isinstance(e, KilnError):
                result = ("err", e)
            elif isinstance(e, OSError):  # a full disk, a missing dir: one line, no trace
                where = f": {e.filename}" if e.filename else ""
                result = ("err", WorkspaceError(f"{e.strerror or e}{where}"))
            else:
                import traceback

                result = ("err", WorkspaceError(f"{e.__class__.__name__}: {e}\n"
                                                f"{traceback.format_exc(limit=5)}"))
        try:
            data = pickle.dumps(result)
        except Exception as e:  # unpicklable exception
            data = pickle.dumps(("err", WorkspaceError(str(e))))
        try:
            view = memoryview(data)
            while view:
                n = os.write(w, view)
                view = view[n:]
        finally:  # whatever happens (the parent gone, a Ctrl-C), never unwind into its code
            os._exit(0)
    os.close(w)
    chunks = []
    try:
        while True:
            data = os.read(r, 1 << 20)
            if not data:
                break
            chunks.append(data)
    except BaseException:  # a Ctrl-C: the helper stops too
        os.kill(pid, _signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        raise WorkspaceError(f"the workspace process died (status {status})")
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "err":
        raise value
    return value
