"""The container's root filesystem: overlay of layer dirs, Docker's default mounts, pivot_root.

Runs in the container's first process, inside its new mount namespace,
before anything of the image executes. Paths inside the rootfs are resolved
with symlinks followed only within it, and mounts are made onto O_PATH file
descriptors, so an image's symlinks can never send a mount to the host.
"""

from __future__ import annotations

import errno
import os
import stat

from runtime import syscalls as sc
from runtime.spec import BindMount, ContainerSpec, TmpfsMount
from store.errors import KilnError
from store.fsutil import MAX_SYMLINKS, walk_path


class RootfsError(KilnError):
    pass


# -- overlay ---------------------------------------------------------------------
def mount_overlay(layers: list[str], upper: str, work: str, target: str,
                  scratch: str, *, nodev: bool = True) -> None:
    """Overlay with ``layers`` (bottom first) as lowerdirs; one lowerdir+ each when possible.

    ``scratch`` is a per-container dir for the fallback: short symlinks to the
    layer dirs, so even 150 layers fit the one-page option string.

    A layer dir that is in the stack twice (steps with the same diff, such as two
    ``RUN true``) is mounted once, at its highest place: overlayfs refuses a lowerdir
    twice (ELOOP), and the lower copy changes nothing the higher one does not redo
    (its files, whiteouts and opaque dirs are all applied again above what lies between).
    """
    lowers = list(dict.fromkeys(reversed(layers))) or [_empty_dir(scratch)]
    try:
        fd = sc.fsopen("overlay")
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            for lower in lowers:
                sc.fsconfig(fd, sc.FSCONFIG_SET_STRING, "lowerdir+", lower)
            sc.fsconfig(fd, sc.FSCONFIG_SET_STRING, "upperdir", upper)
            sc.fsconfig(fd, sc.FSCONFIG_SET_STRING, "workdir", work)
            sc.fsconfig(fd, sc.FSCONFIG_CMD_CREATE)
            mfd = sc.fsmount(fd, sc.FSMOUNT_CLOEXEC, sc.MOUNT_ATTR_NODEV if nodev else 0)
            try:
                sc.move_mount(mfd, target)
            finally:
                os.close(mfd)
            return
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise RootfsError(f"cannot mount the container's overlay: {e}") from None
        finally:
            os.close(fd)
    _mount_overlay_classic(lowers, upper, work, target, scratch, sc.MS_NODEV if nodev else 0)


def mount_overlay_idmapped(layers: list[str], upper: str, work: str, target: str,
                           scratch: str, userns_fd: int, *, nodev: bool = True) -> None:
    """mount_overlay on idmapped mounts of ``layers``: through them a file of uid N on disk
    is the user namespace's N (runtime.userns). The upper dir is not idmapped: overlayfs
    writes it with the ids of the container's processes, host ids of their block."""
    points = os.path.join(scratch, "idmapped")
    os.makedirs(points, exist_ok=True)
    mapped = []
    for i, layer in enumerate(dict.fromkeys(reversed(layers))):  # top first, as overlayfs
        point = os.path.join(points, format(i, "x"))
        os.makedirs(point, exist_ok=True)
        fd = sc.open_tree(layer)
        try:
            sc.mount_setattr(fd, sc.MOUNT_ATTR_IDMAP, flags=sc.AT_EMPTY_PATH, userns_fd=userns_fd)
            sc.move_mount(fd, point)
        except OSError as e:
            raise RootfsError(f"--userns=auto: cannot make an idmapped mount of layer {layer} "
                              f"({e.strerror}): this kernel or filesystem has no idmapped "
                              "mounts; use --userns=host") from None
        finally:
            os.close(fd)
        mapped.append(point)
    mount_overlay(list(reversed(mapped)), upper, work, target, scratch, nodev=nodev)


def _empty_dir(scratch: str) -> str:
    path = os.path.join(scratch, "empty")
    os.makedirs(path, exist_ok=True)
    return path


def _mount_overlay_classic(lowers: list[str], upper: str, work: str, target: str,
                           scratch: str, flags: int) -> None:
    links = os.path.join(scratch, "l")
    os.makedirs(links, exist_ok=True)
    names = []
    for i, lower in enumerate(lowers):
        name = format(i, "x")
        path = os.path.join(links, name)
        if os.path.lexists(path):
            os.unlink(path)
        os.symlink(lower, path)
        names.append(name)
    old = os.getcwd()
    os.chdir(links)  # relative lowerdirs keep the option string short
    try:
        data = (f"lowerdir={':'.join(names)},upperdir={os.path.relpath(upper)},"
                f"workdir={os.path.relpath(work)}")
        if len(data) >= 4096:
            raise RootfsError(f"{len(lowers)} layers do not fit an overlay mount on this kernel")
        sc.mount("overlay", target, "overlay", flags, data)
    finally:
        os.chdir(old)


# -- resolving paths inside the rootfs ---------------------------------------------
def resolve_in_root(root: str, path: str) -> str:
    """The host path of ``path`` inside ``root``, symlinks followed as if root were '/'.

    Missing components are allowed (the caller may create them); nothing ever
    resolves outside ``root``.
    """
    def link_target(rel: str) -> str | None:
        candidate = os.path.join(root, rel)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            return None
        return os.readlink(candidate) if stat.S_ISLNK(st.st_mode) else None

    too_many = RootfsError(f"too many levels of symbolic links resolving {path}")
    return os.path.join(root, *walk_path(path, link_target, too_many=too_many))


_O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_WALK_STEPS = 4096  # components opened or made in one walk: a bound against a loop


def open_in_root(root: str, path: str, *, make: str | None = None,
                 follow_last: bool = True) -> int:
    """An O_PATH fd for ``path`` inside ``root``, symlinks followed as if root were '/'
    (the last one only with ``follow_last``); ``make`` = 'dir' or 'file' creates what is
    missing (the parents as directories).

    Every component is opened from its parent's fd with O_NOFOLLOW and made with mkdirat on
    that fd; symlinks are read and walked here and '..' pops our own stack of fds. No path
    string is ever resolved twice, so a concurrent rename (a container sharing a volume
    swapping a directory for a symlink) cannot lead an open or a mkdir outside ``root``.
    """
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _walk_in_root(root_fd, path, make, follow_last)
    finally:
        os.close(root_fd)


def _walk_in_root(root_fd: int, path: str, make: str | None, follow_last: bool) -> int:
    stack = [os.dup(root_fd)]  # fds of the directories walked so far; stack[0] is the root
    names: list[str] = []      # their names: the container path, for messages
    parts = [p for p in path.split("/") if p not in ("", ".")]
    links = steps = 0
    try:
        while parts:
            steps += 1
            if steps > _MAX_WALK_STEPS:
                raise RootfsError(f"{path} kept changing while it was being resolved")
            part = parts.pop(0)
            if part == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                    names.pop()
                continue
            here = "/" + "/".join([*names, part])
            try:
                fd = os.open(part, _O_PATH_NOFOLLOW, dir_fd=stack[-1])
            except FileNotFoundError:
                if make is None:
                    raise FileNotFoundError(errno.ENOENT, "no such file or directory in the "
                                            "container", here) from None
                _make_at(stack[-1], part, make if not parts else "dir", here)
                parts.insert(0, part)  # and open it like any other component, by fd
                continue
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode) and (parts or follow_last):
                try:
                    target = os.readlink("", dir_fd=fd)
                finally:
                    os.close(fd)
                links += 1
                if links > MAX_SYMLINKS:
                    raise RootfsError(f"too many levels of symbolic links resolving {path}")
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                    names.clear()
                parts = [p for p in target.split("/") if p not in ("", ".")] + parts
                continue
            if parts and not stat.S_ISDIR(st.st_mode):
                os.close(fd)
                raise RootfsError(f"{here} in the container is not a directory")
            stack.append(fd)
            names.append(part)
        return stack.pop()
    finally:
        for fd in stack:
            os.close(fd)


def _make_at(dir_fd: int, name: str, kind: str, where: str) -> None:
    """mkdirat / openat(O_CREAT|O_EXCL) of one name: losing a race to another creator is fine,
    the caller opens whatever is there by fd next."""
    try:
        if kind == "dir":
            os.mkdir(name, 0o755, dir_fd=dir_fd)
        else:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o644, dir_fd=dir_fd))
    except FileExistsError:
        pass
    except OSError as e:
        raise RootfsError(f"cannot create {where} in the container: {e.strerror}") from None


def _fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _bind(source: str, target_fd: int, attrs: int, reopen) -> None:
    """Bind ``source`` (and the mounts below it) onto the O_PATH ``target_fd``, with ``attrs``
    (MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC: the same bits as MOUNT_ATTR_*) set on the
    whole new tree (a read-only bind is read-only all the way down, as docker 25 makes it).

    The mount is made detached (open_tree), given its flags, then attached to the fd, so no
    path is looked up after the target was opened. Kernels before 5.12 get the classic
    bind and remount; ``reopen()`` finds the new mount for that, by fd again, and it must be
    the source or nothing is remounted.
    """
    try:
        tree = sc.open_tree(source, sc.OPEN_TREE_CLONE | sc.OPEN_TREE_CLOEXEC | sc.AT_RECURSIVE)
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
        return _bind_classic(source, target_fd, attrs, reopen)
    try:
        if attrs:
            try:
                sc.mount_setattr(tree, attrs)
            except OSError as e:
                if e.errno != errno.ENOSYS:
                    raise
                return _bind_classic(source, target_fd, attrs, reopen)
        sc.move_mount(tree, "", to_dirfd=target_fd,
                      flags=sc.MOVE_MOUNT_F_EMPTY_PATH | sc.MOVE_MOUNT_T_EMPTY_PATH)
    finally:
        os.close(tree)


def _bind_classic(source: str, target_fd: int, attrs: int, reopen) -> None:
    sc.mount(source, _fd_path(target_fd), None, sc.MS_BIND | sc.MS_REC)
    if not attrs:
        return
    top = reopen()
    try:
        want, got = os.stat(source), os.fstat(top)
        if (want.st_dev, want.st_ino) != (got.st_dev, got.st_ino):
            raise RootfsError("a mount point changed while it was being mounted; refusing to "
                              "start")
        sc.mount(None, _fd_path(top), None, sc.MS_BIND | sc.MS_REMOUNT | attrs)
    finally:
        os.close(top)


def _mount_at(root: str, path: str, source, fstype, flags: int, data=None, *,
              make: str = "dir") -> None:
    fd = open_in_root(root, path, make=make)
    try:
        sc.mount(source, _fd_path(fd), fstype, flags, data)
    finally:
        os.close(fd)


# -- Docker's default mounts -----------------------------------------------------------
_DEVICES = [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
            ("urandom", 1, 9), ("tty", 5, 0)]


def _refuse_symlink(root: str, path: str) -> None:
    try:
        st = os.lstat(os.path.join(root, path.lstrip("/")))
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise RootfsError(f"the image's {path} is a symbolic link; refusing to start")


def mount_defaults(spec: ContainerSpec, root: str) -> None:
    for path in ("/proc", "/dev", "/dev/null", "/sys"):
        _refuse_symlink(root, path)
    nosuid_nodev_noexec = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
    nodev = 0 if spec.privileged else sc.MS_NODEV
    _mount_at(root, "/proc", "proc", "proc", nosuid_nodev_noexec)
    _mount_at(root, "/dev", "tmpfs", "tmpfs", sc.MS_NOSUID | sc.MS_STRICTATIME | nodev,
              "mode=755,size=65536k")
    dev = os.path.join(root, "dev")
    # Every mount the container can write to is nodev, so a device node it makes with
    # CAP_MKNOD cannot be opened (the job a devices cgroup does for docker, on v1 and v2
    # alike); the few devices it may use are the host's nodes, bind-mounted one by one.
    for name, _major, _minor in _DEVICES:
        path = os.path.join(dev, name)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
        sc.mount(f"/dev/{name}", path, None, sc.MS_BIND)
    if spec.privileged:
        _copy_host_devices(dev)
    for name in ("pts", "shm", "mqueue"):
        os.makedirs(os.path.join(dev, name), 0o755, exist_ok=True)
    try:
        sc.mount("devpts", os.path.join(dev, "pts"), "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
                 "newinstance,ptmxmode=0666,mode=0620,gid=5")
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        # a user namespace that maps no gid 5 (rootless kiln with one id): the tty group
        # cannot own the ptys, as under rootless podman without subordinate ids
        sc.mount("devpts", os.path.join(dev, "pts"), "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
                 "newinstance,ptmxmode=0666,mode=0620")
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    sc.mount("shm", os.path.join(dev, "shm"), "tmpfs", nosuid_nodev_noexec,
             f"mode=1777,size={spec.shm_size}")
    sc.mount("mqueue", os.path.join(dev, "mqueue"), "mqueue", nosuid_nodev_noexec)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                         ("core", "/proc/kcore")):
        os.symlink(target, os.path.join(dev, name))
    sys_flags = nosuid_nodev_noexec | (0 if spec.privileged else sc.MS_RDONLY)
    try:
        _mount_at(root, "/sys", "sysfs", "sysfs", sys_flags)
    except OSError:  # sysfs of another net namespace (--network host): bind the host's
        fd = open_in_root(root, "/sys", make="dir")
        try:
            _bind("/sys", fd, sys_flags, lambda: open_in_root(root, "/sys"))
        finally:
            os.close(fd)
    for path, host in spec.etc_files.items():
        fd = open_in_root(root, path, make="file")
        try:
            sc.mount(host, _fd_path(fd), None, sc.MS_BIND)
        finally:
            os.close(fd)
    for host, path, _writable in spec.devices:  # --device: the host's node, bound in
        fd = open_in_root(root, path, make="file")
        try:
            _bind(host, fd, sc.MS_NOSUID, lambda path=path: open_in_root(root, path))
        except OSError as e:
            raise RootfsError(f"cannot add --device {host} at {path}: {e.strerror}") from None
        finally:
            os.close(fd)


_HOST_DEV_SKIP = {"pts", "shm", "mqueue", "fd", "stdin", "stdout", "stderr", "core", "ptmx",
                  "console"} | {name for name, _major, _minor in _DEVICES}


def _copy_host_devices(dev: str, host: str = "/dev") -> None:
    """--privileged as docker means it: every host device node, made anew in /dev."""
    for dirpath, dirnames, filenames in os.walk(host):
        rel = os.path.relpath(dirpath, host)
        if rel != "." and rel.split("/")[0] in _HOST_DEV_SKIP:
            dirnames[:] = []
            continue
        for name in filenames:
            if rel == "." and name in _HOST_DEV_SKIP:
                continue
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                continue
            target_dir = os.path.join(dev, rel)
            os.makedirs(target_dir, 0o755, exist_ok=True)
            target = os.path.join(target_dir, name)
            try:
                os.mknod(target, st.st_mode, st.st_rdev)
                os.chown(target, st.st_uid, st.st_gid)
            except FileExistsError:
                continue


class LayeredBind(BindMount):
    """A build's bind mount of a path inside stacked layer dirs (another stage, an image, a
    copy of part of the build context), which exist nowhere as one host directory.

    The layers are mounted as an overlay at ``scratch``/merged (outside the rootfs, so it
    disappears with the old root at pivot_root); ``source`` is resolved inside that overlay
    with symlinks confined to it, then bind-mounted at ``target``. Writes of a read-write
    mount land in ``upper``, which the builder throws away after the step.
    """

    layers: tuple[str, ...]
    upper: str
    work: str
    scratch: str

    def __init__(self, source: str, target: str, readonly: bool = False,
                 layers: tuple[str, ...] = (), upper: str = "", work: str = "",
                 scratch: str = ""):
        super().__init__(source, target, readonly)
        self._set(layers=layers, upper=upper, work=work, scratch=scratch)


def _depth(target: str) -> int:
    return len([p for p in target.split("/") if p not in ("", ".")])


def mount_user_volumes(spec: ContainerSpec, root: str) -> None:
    """Binds and tmpfs mounts, parents before children (as docker sorts them), so a mount
    whose target lies inside another one's is not hidden by it."""
    mounts: list[BindMount | TmpfsMount] = [*spec.binds, *spec.tmpfs]
    for m in sorted(mounts, key=lambda m: _depth(m.target)):
        if isinstance(m, TmpfsMount):
            flags, data = _tmpfs_options(m.options)
            flags |= 0 if spec.privileged else sc.MS_NODEV
            _mount_at(root, m.target, "tmpfs", "tmpfs", flags, data)
        elif isinstance(m, LayeredBind):
            _mount_layered_bind(spec, root, m)
        elif m.subpath:
            _mount_subpath_bind(spec, root, m)
        else:
            if not os.path.exists(m.source):
                raise RootfsError(f"bind mount source {m.source} does not exist")
            make = "dir" if os.path.isdir(m.source) else "file"
            _bind_at(spec, root, m.source, m.target, make, m.readonly)


def _bind_at(spec: ContainerSpec, root: str, source: str, target: str, make: str,
             readonly: bool) -> None:
    fd = open_in_root(root, target, make=make)
    try:
        attrs = (sc.MS_RDONLY if readonly else 0) | (0 if spec.privileged else sc.MS_NODEV)
        _bind(source, fd, attrs, lambda: open_in_root(root, target))
    except OSError as e:
        raise RootfsError(f"cannot mount {source} at {target}: {e.strerror}") from None
    finally:
        os.close(fd)


def _mount_subpath_bind(spec: ContainerSpec, root: str, m: BindMount) -> None:
    """A directory inside ``m.source`` that others may be changing meanwhile (a build cache
    shared with concurrent steps): walked and made by fd here, in the container's own mount
    namespace (a mount of another namespace cannot be a bind source)."""
    try:
        src = open_in_root(m.source, m.subpath, make="dir")
    except (RootfsError, OSError) as e:
        raise RootfsError(f"bind mount source {m.subpath}: {getattr(e, 'strerror', None) or e}"
                          ) from None
    try:
        _bind_at(spec, root, _fd_path(src), m.target, "dir", m.readonly)
    finally:
        os.close(src)


def _mount_layered_bind(spec: ContainerSpec, root: str, m: LayeredBind) -> None:
    point = os.path.join(m.scratch, "merged")
    for d in (m.scratch, point, m.upper, m.work):
        os.makedirs(d, 0o755, exist_ok=True)
    mount_overlay(list(m.layers), m.upper, m.work, point, m.scratch, nodev=not spec.privileged)
    try:
        src = open_in_root(point, m.source or "/")
    except FileNotFoundError:
        raise RootfsError(f"bind mount source {m.source} does not exist in its stage or "
                          "image") from None
    try:
        make = "dir" if stat.S_ISDIR(os.fstat(src).st_mode) else "file"
        _bind_at(spec, root, _fd_path(src), m.target, make, m.readonly)
    finally:
        os.close(src)


def _tmpfs_options(options: str) -> tuple[int, str]:
    flag_names = {"ro": sc.MS_RDONLY, "nosuid": sc.MS_NOSUID, "nodev": sc.MS_NODEV,
                  "noexec": sc.MS_NOEXEC, "noatime": sc.MS_NOATIME}
    flags, data = 0, []
    for opt in [o for o in options.split(",") if o]:
        if opt in flag_names:
            flags |= flag_names[opt]
        elif opt in ("rw", "suid", "dev", "exec"):
            continue
        else:
            data.append(opt)
    return flags, ",".join(data)


def mask_paths(spec: ContainerSpec, root: str) -> None:
    """Cover masked paths (by O_PATH fd, never following a symlink) and make others read-only."""
    for path in spec.masked_paths:
        try:
            fd = open_in_root(root, path, follow_last=False)
        except (FileNotFoundError, RootfsError):
            continue
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                sc.mount("tmpfs", _fd_path(fd), "tmpfs", sc.MS_RDONLY, "size=0")
            elif not stat.S_ISLNK(st.st_mode):
                sc.mount(os.path.join(root, "dev/null"), _fd_path(fd), None, sc.MS_BIND)
        finally:
            os.close(fd)
    for path in spec.readonly_paths:
        try:
            fd = open_in_root(root, path)
        except FileNotFoundError:
            continue
        try:
            _bind(_fd_path(fd), fd, sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
                  lambda path=path: open_in_root(root, path))
        finally:
            os.close(fd)


def pivot_into(root: str) -> None:
    """pivot_root (not chroot) into ``root`` and detach the old root entirely."""
    os.chdir(root)
    sc.pivot_root(".", ".")
    sc.mount(None, ".", None, sc.MS_SLAVE | sc.MS_REC)  # the umount must not propagate
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")


def setup(spec: ContainerSpec) -> None:
    """Everything from a private mount tree to standing in the container's root."""
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    root = spec.rootfs
    if spec.id_map is None:
        mount_overlay(spec.layers, spec.upper, spec.work, root, os.path.dirname(spec.upper),
                      nodev=not spec.privileged)
    else:
        # stage 1 mounted it (mount_overlay_idmapped) before the user namespace: here that
        # mount is locked, and pivot_root refuses a locked new root; a bind of it is ours
        sc.mount(root, root, None, sc.MS_BIND | sc.MS_REC)
    mount_defaults(spec, root)
    mount_user_volumes(spec, root)
    if not spec.privileged:
        mask_paths(spec, root)
    pivot_into(root)
    if spec.readonly_rootfs:
        sc.mount(None, "/", None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY)
