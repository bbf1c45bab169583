"""Rootless kiln: one user namespace per user, held by a pause process, joined by every call.

A non-root kiln call joins a user namespace in which the user's uid is 0 and the
ranges /etc/subuid and /etc/subgid grant (through newuidmap/newgidmap, the uidmap
package's setuid helpers) are 1..N, so layers keep their owners on disk (as host
ids in the user's subordinate range) and containers get namespaces and overlay
mounts of their own. As podman's rootless pause process, the namespace outlives
each call: a ``sleep infinity`` started in it holds it, so a later ``kiln exec``,
``kiln stop`` or ``kiln rm`` acts on the containers of an earlier ``kiln run -d``
with the capabilities their namespaces' owner gives. Only the user namespace is
shared: every mount happens in a child's private mount namespace, as for root.

Inside, geteuid() is 0; ``KILN_ROOTLESS_UID`` (the host uid) tells the code that
picks the store, the config and the network that this is not the host's root.
"""

from __future__ import annotations

import os

ENV = "KILN_ROOTLESS_UID"


def host_uid() -> int:
    """The uid kiln was started with: the user's own, also inside the namespace."""
    value = os.environ.get(ENV)
    return int(value) if value else os.getuid()


def runtime_dir(uid: int) -> str:
    """Where the pause process's pid lives: $XDG_RUNTIME_DIR/kiln, else a private /tmp dir."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = os.path.join(base, "kiln") if base else f"/tmp/kiln-run-{uid}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    import stat

    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        from store.errors import KilnError

        raise KilnError(f"{path}: not a private directory of uid {uid}; remove it "
                        "or set XDG_RUNTIME_DIR")
    return path


def enter() -> None:
    """Join (or make) the user's namespace; a no-op for root and for a process already in it.

    Must run before kiln starts a thread: setns(CLONE_NEWUSER) refuses a threaded process.
    """
    if os.geteuid() == 0:
        return
    import fcntl

    from runtime import syscalls as sc

    uid, gid = os.getuid(), os.getgid()
    directory = runtime_dir(uid)
    lock = os.open(os.path.join(directory, "pause.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                   0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        pid_file = os.path.join(directory, "pause.pid")
        fd = _open_pause_namespace(pid_file, uid)
        if fd is None:
            pid = _start_pause(uid, gid)
            fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            tmp = f"{pid_file}.{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(f"{pid} {os.fstat(fd).st_ino}\n")
            os.rename(tmp, pid_file)
    finally:
        os.close(lock)
    try:
        sc.setns(fd, sc.CLONE_NEWUSER)
    finally:
        os.close(fd)
    os.environ[ENV] = str(uid)
    try:
        os.setgroups([])  # the host's supplementary groups are unmapped (nobody) in here
    except OSError:
        pass  # one-id map: setgroups is denied, and the groups stay as they are


def _open_pause_namespace(pid_file: str, uid: int) -> int | None:
    """The namespace of the pause process the pid file names, if it still is that process."""
    try:
        with open(pid_file) as f:
            pid_text, ino_text = f.read(100).split()
        pid, ino = int(pid_text), int(ino_text)
        fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    st = os.fstat(fd)
    if st.st_ino != ino or os.stat(f"/proc/{pid}").st_uid != uid:
        os.close(fd)  # the pid was reused: that is not our namespace
        return None
    return fd


def _start_pause(uid: int, gid: int) -> int:
    """Fork the process that holds the namespace, map the user's ids into it, return its pid."""
    import pwd
    import subprocess

    from runtime import syscalls as sc
    from store.errors import KilnError

    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.setsid()  # no terminal's Ctrl-C or hang-up reaches it
            sc.unshare(sc.CLONE_NEWUSER)
            os.write(ready_w, b"u")
            null = os.open(os.devnull, os.O_RDWR)
            for target in (0, 1, 2):
                os.dup2(null, target)
            sc.close_range(3)
            os.execv("/bin/sleep", ["sleep", "infinity"])
        finally:
            os._exit(127)
    os.close(ready_w)
    try:
        unshared = os.read(ready_r, 1)
    finally:
        os.close(ready_r)
    if unshared != b"u":
        os.waitpid(pid, 0)
        raise KilnError("cannot make a user namespace for rootless kiln (is "
                        "user.max_user_namespaces 0, or are unprivileged user namespaces "
                        "disabled?)")
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    from runtime.userns import subordinate_ranges

    owners = (name, str(uid)) if name else (str(uid),)
    subuid = next(iter(subordinate_ranges("/etc/subuid", owners)), None)
    subgid = next(iter(subordinate_ranges("/etc/subgid", owners)), None)
    try:
        if subuid and subgid:
            for tool, own, (start, count) in (("newuidmap", uid, subuid),
                                              ("newgidmap", gid, subgid)):
                done = subprocess.run([tool, str(pid), "0", str(own), "1", "1", str(start),
                                       str(count)], capture_output=True, text=True)
                if done.returncode != 0:
                    raise KilnError(f"{tool} {pid} ...: {done.stderr.strip() or 'failed'} "
                                    f"(is the uidmap package installed?)")
        else:
            _warn(f"no range for {name or uid} in /etc/subuid and /etc/subgid: containers "
                  "get one uid and gid (0), and image files owned by others cannot be kept")
            with open(f"/proc/{pid}/uid_map", "w") as f:
                f.write(f"0 {uid} 1\n")
            with open(f"/proc/{pid}/setgroups", "w") as f:
                f.write("deny")
            with open(f"/proc/{pid}/gid_map", "w") as f:
                f.write(f"0 {gid} 1\n")
    except BaseException:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise
    return pid


def _warn(message: str) -> None:
    import sys

    sys.stderr.write(f"kiln: warning: {message}\n")
