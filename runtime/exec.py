"""kiln exec: a process in a running container, as confined as the container's own.

    kiln exec --fork--> stage 1: joins the container's cgroup, then its ipc, uts, net,
        |                 pid, mount and cgroup namespaces (setns) --fork--> the process
        |<-- its host pid (stage 1 exits; kiln is the subreaper) ----------|
        | says go                                                          | user, bounding
        |<-- exec error, or EOF when the exec succeeded -------------------| set, caps,
        | forwards signals, relays the terminal, waits                     | no_new_privs,
                                                                           | seccomp, exec
The confinement comes from exec.json, written when the container was made: the same
capabilities, seccomp filter and no_new_privileges, the image's environment and user.
"""

from __future__ import annotations

import json
import os

from runtime import syscalls as sc
from runtime.containers import EXEC_FILE, StoreHandle, find
from runtime.process import (
    FORWARDED,
    Container,
    ContainerStartError,
    ExitStatus,
    _apply_identity_and_privileges,
    _drop_bounding_set,
    _exec,
    _fail_child,
    _find_executable,
    _move_to_errpipe_fd,
    _sealed_exec_stub,
    _take_terminal,
    signal,
)
from runtime.spec import ContainerSpec, ProcessSpec
from runtime.users import resolve_user
from store.errors import KilnError

# the order runc's nsenter joins them in; the mount namespace sets root and cwd
_NAMESPACES = (("ipc", sc.CLONE_NEWIPC), ("uts", sc.CLONE_NEWUTS), ("net", sc.CLONE_NEWNET),
               ("pid", sc.CLONE_NEWPID), ("mnt", sc.CLONE_NEWNS))


def exec_in(store, name_or_id: str, argv: list[str], *, user: str | None = None,
            workdir: str | None = None, env: list[str] = (), tty: bool = False,
            interactive: bool = False) -> ExitStatus:
    handle = StoreHandle(store)
    rec = find(handle, name_or_id)
    if rec.status != "running":
        raise KilnError(f"container {rec.name} is not running")
    from runtime.lifecycle import is_paused

    if is_paused(rec):  # the process would join the frozen cgroup and hang there
        raise KilnError(f"container {rec.name} is paused: unpause it before exec")
    directory = os.path.join(handle.containers_dir, rec.id)
    try:
        with open(os.path.join(directory, EXEC_FILE), "rb") as f:
            config = json.loads(f.read(1 << 20))
    except (OSError, ValueError) as e:
        raise KilnError(f"container {rec.name}: cannot read its exec settings: {e}") from None
    merged = {}
    for e in [*config["env"], *env]:
        k, eq, v = e.partition("=")
        if eq:
            merged[k] = v
        elif k in os.environ:
            merged[k] = os.environ[k]
    process = ProcessSpec(args=list(argv), env=[f"{k}={v}" for k, v in merged.items()],
                          cwd=workdir or config["cwd"] or "/",
                          user=config["user"] if user is None else user,
                          terminal=tty, stdin=interactive)
    spec = ContainerSpec(id=rec.id, layers=[], upper="", work="", rootfs="", process=process,
                         capabilities=frozenset(config["capabilities"]),
                         seccomp=bytes.fromhex(config["seccomp"]) if config["seccomp"] else None,
                         no_new_privileges=config["no_new_privileges"])
    fds = []
    userns_fd = None
    try:
        # --userns=auto: its own user namespace, joined first (it owns the others)
        if os.stat(f"/proc/{rec.pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino:
            userns_fd = os.open(f"/proc/{rec.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        for ns, _flag in _NAMESPACES:
            fds.append(os.open(f"/proc/{rec.pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC))
        cgroup_ns = os.open(f"/proc/{rec.pid}/ns/cgroup", os.O_RDONLY | os.O_CLOEXEC)
        fds.append(cgroup_ns)
        from runtime.cgroups import cgroup_dirs_of

        procs = [os.path.join(d, "cgroup.procs") for d in cgroup_dirs_of(rec.pid).values()]
        from store.fsutil import is_host_root

        if not is_host_root():  # rootless: a container without a cgroup of its own
            procs = [p for p in procs if os.access(p, os.W_OK)]  # runs in kiln's, not ours
    except OSError as e:
        for fd in fds if userns_fd is None else [*fds, userns_fd]:
            os.close(fd)
        raise KilnError(f"container {rec.name} is not running ({e.strerror})") from None
    runner = _Exec(spec, fds, procs, userns_fd)
    try:
        runner.start()
    finally:
        for fd in fds if userns_fd is None else [*fds, userns_fd]:
            os.close(fd)
    return runner.wait()


class _Exec(Container):
    def __init__(self, spec: ContainerSpec, ns_fds: list[int], procs: list[str],
                 userns_fd: int | None = None):
        super().__init__(spec, None)
        self.ns_fds = ns_fds
        self.procs = procs
        self.userns_fd = userns_fd

    def _stage1(self, go_read: int, errpipe: int, pidpipe: int, tty_sock) -> None:
        try:
            for path in self.procs:
                with open(path, "w") as f:
                    f.write(str(os.getpid()))
            if self.userns_fd is not None:
                sc.setns(self.userns_fd, sc.CLONE_NEWUSER)
            for fd, (_ns, flag) in zip(self.ns_fds, _NAMESPACES, strict=False):
                sc.setns(fd, flag)
            sc.setns(self.ns_fds[-1], sc.CLONE_NEWCGROUP)
            pid = os.fork()
            if pid == 0:
                os.close(pidpipe)
                self._child(go_read, errpipe, tty_sock)
            os.write(pidpipe, str(pid).encode())
            os._exit(0)
        except BaseException as e:
            _fail_child(errpipe, f"cannot enter the container: {e}", 125)

    def _child(self, go_read: int, errpipe: int, tty_sock) -> None:
        spec = self.spec
        try:
            sc.prctl(sc.PR_SET_DUMPABLE, 0)
            for sig in FORWARDED:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            os.setsid()
            user = resolve_user(spec.process.user)
            keep = _drop_bounding_set(spec)
            if os.read(go_read, 1) != b"g":
                os._exit(127)
            os.close(go_read)
            sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
            _take_terminal(spec, tty_sock)
            errpipe = _move_to_errpipe_fd(errpipe)
            stub = _sealed_exec_stub("exec")
            _apply_identity_and_privileges(spec, user, keep)
            os.chdir(spec.process.cwd)
            program = _find_executable(spec.process.args[0], spec.process.env)
            sc.close_range(3, 0xFFFFFFFF, 4)
            _exec(program, spec, errpipe, stub)
        except ContainerStartError as e:
            _fail_child(errpipe, str(e), e.exit_code)
        except OSError as e:
            _fail_child(errpipe, f"cannot run the command: {e}", 126)
        except BaseException as e:
            _fail_child(errpipe, f"cannot run the command: {e!r}", 126)
