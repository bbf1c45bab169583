"""The container process: namespaces, the sandbox steps in order, exec, and waiting.

    kiln (parent) --fork--> stage 1: unshare namespaces --fork--> container PID 1
        |                     (exits at once; kiln is the subreaper)     |
        |<-- PID 1's host pid ------------------------------------------| mounts, pivot_root
        | adds it to the cgroup, then says go -------------------------->| cgroup namespace,
        |                                                                | user, caps, seccomp,
        |<-- exec error (or EOF when exec succeeded) --------------------| exec
        | forwards signals, relays the terminal, waits for the exit status

No kiln process lives in the container's pid namespace once the image's
program runs (unless --init, whose PID 1 is non-dumpable and as confined as
the program), so nothing of the host's Python is reachable from inside. The
last exec goes through a tiny static stub run from a sealed memfd
(runtime/exec_stub.py): at the moment the image's program is exec'd,
/proc/self/exe is that stub, never the host's Python, so a '#!/proc/self/exe'
program (CVE-2019-5736) finds no host binary to read or overwrite. --init's
PID 1 is the init stub from such a memfd, not a Python process.
"""

from __future__ import annotations

# signal.py only wraps _signal's functions and numbers in enums, which costs every kiln run
# half a millisecond; the numbers are all this module needs
import _signal as signal
import errno
import fcntl
import os
import select
import struct
import time

from runtime import rootfs
from runtime import syscalls as sc
from runtime.capabilities import last_cap, mask
from runtime.exec_stub import STUBS
from runtime.spec import DEFAULT_PATH, ContainerSpec, Record
from runtime.users import ExecUser, resolve_user
from store.errors import KilnError
from store.fsutil import write_all

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    import socket

# socket and termios are imported only for a terminal (-t), by the parent before it forks:
# the container's PID 1 then finds them loaded, after pivot_root has hidden the host's files.

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
ERRPIPE_FD = 3  # where the exec stub finds the start-error pipe
STUB_FAILED = b"\xff"  # the stub's report of a failed exec: this byte, then errno as one byte
_MFD_EXEC = 0x10  # memfd_create: executable even where vm.memfd_noexec defaults otherwise
_STUBS = STUBS.get(os.uname().machine)  # None: no stub here, the exec is direct
_STUB_REFUSED = (errno.EPERM, errno.EACCES, errno.ENOSYS)  # the stub, not the program


class ContainerStartError(KilnError):
    def __init__(self, message: str, exit_code: int = 125):
        super().__init__(message)
        self.exit_code = exit_code


class ExitStatus(Record):
    def __init__(self, code: int, signal: int | None = None, oom_killed: bool = False):
        self.code = code  # as docker reports it: the exit code, or 128+N for signal N
        self.signal = signal
        self.oom_killed = oom_killed


# ----------------------------------------------------------------- inside the container
def _fail_child(errpipe: int, message: str, code: int) -> None:
    try:
        os.write(errpipe, b"%d\n" % code + message.encode("utf-8", "backslashreplace"))
    except OSError:
        pass
    os._exit(code)


def _set_loopback_up() -> None:
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    AF_INET, SOCK_DGRAM = 2, 2
    fd = sc.socket(AF_INET, SOCK_DGRAM)
    try:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(fd, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(fd, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    finally:
        os.close(fd)


def _find_executable(name: str, env: list[str]) -> str:
    if "/" in name:
        return name
    path = DEFAULT_PATH
    for e in env:
        if e.startswith("PATH="):
            path = e[5:]
    for d in path.split(":"):
        candidate = os.path.join(d or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise ContainerStartError(f"{name}: executable file not found in $PATH", EXIT_NOT_FOUND)


def _drop_bounding_set(spec: ContainerSpec) -> int:
    """Drop from the bounding set what the container may not have; return the mask it keeps.

    Done before kiln says go: the effective set, and with it the CAP_SYS_ADMIN that the
    cgroup namespace needs, is untouched by it."""
    keep = mask(spec.capabilities) & sc.capget()[1]  # nothing kiln does not hold itself
    sc.prctl(sc.PR_SET_KEEPCAPS, 1)
    for cap in range(last_cap() + 1):
        if not keep & (1 << cap):
            sc.prctl(sc.PR_CAPBSET_DROP, cap)
    return keep


def _apply_identity_and_privileges(spec: ContainerSpec, user: ExecUser, keep: int) -> None:
    """User, capabilities, no_new_privs and seccomp, in the only order that works.

    Seccomp is loaded while CAP_SYS_ADMIN is still effective (so no_new_privs
    is not forced on), then the final capability sets are installed.
    """
    try:
        os.setgroups(list(user.additional_gids))
    except PermissionError:
        if not _setgroups_denied():
            raise
        # a user namespace with one gid (rootless kiln without subordinate ids): the
        # kernel refuses setgroups there; the groups stay the unmapped ones kiln had
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    _eff, perm, _inh = sc.capget()
    sc.capset(perm, perm, 0)  # raise effective again for the seccomp load
    if spec.no_new_privileges:
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
    if spec.seccomp is not None:
        sc.seccomp_set_filter(spec.seccomp)
    final = keep if user.uid == 0 else 0
    sc.capset(final, final, 0)
    sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL)
    sc.prctl(sc.PR_SET_KEEPCAPS, 0)
    if not any(e.startswith("HOME=") for e in spec.process.env):
        spec.process.env.append(f"HOME={user.home}")


def _setgroups_denied() -> bool:
    try:
        with open("/proc/self/setgroups") as f:
            return f.read().strip() == "deny"
    except OSError:
        return False


def _container_main(spec: ContainerSpec, go_read: int, errpipe: int, tty_sock) -> None:
    """PID 1 of the container: never returns.

    Everything it needs is imported at module level: after pivot_root the
    host's Python library is out of reach.
    """
    try:
        # Not dumpable: nothing but root may open its /proc files while it holds kiln's
        # fds. Rootless, kiln's own slirp4netns must open /proc/PID/ns/net before go, and
        # a non-dumpable process's /proc is the host root's (kiln was exec'd outside the
        # user namespace): it stays the user's own, whose other processes could ptrace
        # kiln itself anyway. Its exec makes it dumpable either way.
        if not os.environ.get("KILN_ROOTLESS_UID"):
            sc.prctl(sc.PR_SET_DUMPABLE, 0)
        for sig in FORWARDED:  # kiln's own handlers must not run in here
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.setsid()  # the terminal's Ctrl-C reaches kiln only, which forwards it once
        # The filesystem is set up while kiln moves us into the cgroup (a slow write on v1);
        # nothing of the image runs before kiln says go.
        rootfs.setup(spec)
        if spec.hostname:
            sc.sethostname(spec.hostname)
        if spec.network in ("none", "slirp4netns"):
            _set_loopback_up()
        cwd = spec.process.cwd or "/"
        if not os.path.isdir(cwd):
            os.makedirs(cwd, 0o755, exist_ok=True)
        user = resolve_user(spec.process.user)  # the image's /etc/passwd, read while we wait
        keep = _drop_bounding_set(spec)
        if os.read(go_read, 1) != b"g":  # kiln died or gave up before we were ready
            os._exit(EXIT_NOT_FOUND)
        os.close(go_read)
        # In the container's cgroup now: a cgroup namespace rooted there hides the host's.
        sc.unshare(sc.CLONE_NEWCGROUP)
        # Only now is kiln our parent (stage 1 has exited and kiln is the subreaper):
        # if kiln dies from here on, so does the container.
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        _take_terminal(spec, tty_sock)
        errpipe = _move_to_errpipe_fd(errpipe)
        # before seccomp, which a custom profile may make strict
        stub = _sealed_exec_stub("init" if spec.init else "exec")
        _apply_identity_and_privileges(spec, user, keep)
        os.chdir(cwd)
        if not os.getcwd().startswith("/"):
            raise ContainerStartError(f"working directory {cwd} is outside the container")
        program = _find_executable(spec.process.args[0], spec.process.env)
        if spec.init and stub is None:
            _run_init(spec, program, errpipe)
        sc.close_range(3, 0xFFFFFFFF, 4)  # CLOSE_RANGE_CLOEXEC: errpipe closes on exec too
        _exec(program, spec, errpipe, stub)
    except ContainerStartError as e:
        _fail_child(errpipe, str(e), e.exit_code)
    except OSError as e:
        _fail_child(errpipe, f"cannot start the container: {e}", 125)
    except KilnError as e:
        _fail_child(errpipe, str(e), 125)
    except BaseException as e:  # never let a traceback escape into the container
        _fail_child(errpipe, f"cannot start the container: {e!r}", 125)


def _take_terminal(spec: ContainerSpec, tty_sock) -> None:
    """With -t: a new pty as stdin/out/err and controlling terminal, its master handed to
    kiln over ``tty_sock``; the program starts once kiln has set the window size."""
    if spec.process.terminal:
        import socket  # loaded by the parent before the fork: no file is read here
        import termios

        master, slave = os.openpty()
        socket.send_fds(tty_sock, [b"t"], [master])
        os.close(master)
        tty_sock.recv(1)
        tty_sock.close()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        if slave > 2:
            os.close(slave)
    elif tty_sock is not None:
        tty_sock.close()


def _move_to_errpipe_fd(errpipe: int) -> int:
    """The start-error pipe onto fd 3, where the exec stub writes; what sat there is closed
    (everything else is closed on exec anyway)."""
    if errpipe != ERRPIPE_FD:
        os.dup2(errpipe, ERRPIPE_FD, inheritable=False)
        os.close(errpipe)
    return ERRPIPE_FD


def _sealed_exec_stub(kind: str) -> int | None:
    """A memfd holding the ``kind`` stub, sealed against any write (the runc way); None on
    an architecture without stubs."""
    if _STUBS is None:
        return None
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        fd = os.memfd_create("kiln-exec", flags | _MFD_EXEC)
    except OSError as e:
        if e.errno != errno.EINVAL:  # a kernel before 6.3 does not know MFD_EXEC
            raise
        fd = os.memfd_create("kiln-exec", flags)
    write_all(fd, bytes.fromhex(_STUBS[kind]))
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    return fd


def _exec(program: str, spec: ContainerSpec, errpipe: int, stub: int | None) -> None:
    """execve through the stub, or exit as docker does: 127 when not found, 126 when not
    executable (the stub reports those itself through ``errpipe``, which is fd 3)."""
    env = _env_dict(spec.process.env)
    _default_signal_dispositions()
    if stub is not None:
        os.set_inheritable(errpipe, True)  # the stub marks it close-on-exec itself
        argv = [program, *spec.process.args]
        try:
            os.execve(stub, argv, env)  # fexecve: execveat(AT_EMPTY_PATH), or /proc/self/fd
        except OSError as e:
            if e.errno not in _STUB_REFUSED:  # E2BIG, ENOMEM: the program would fail alike
                _fail_child(errpipe, f"{spec.process.args[0]}: {e.strerror}",
                            EXIT_NOT_EXECUTABLE)
        try:  # a seccomp profile that denies execveat but allows execve
            os.execve(f"/proc/self/fd/{stub}", argv, env)
        except OSError:
            pass  # memfds cannot be executed here (vm.memfd_noexec=2): exec directly
        os.set_inheritable(errpipe, False)
    try:
        os.execve(program, spec.process.args, env)
    except OSError as e:
        code = EXIT_NOT_FOUND if e.errno == errno.ENOENT else EXIT_NOT_EXECUTABLE
        _fail_child(errpipe, f"{spec.process.args[0]}: {e.strerror}", code)


def _env_dict(env: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for e in env:
        k, _, v = e.partition("=")
        out[k] = v
    return out


def _default_signal_dispositions() -> None:
    """What Python ignores (SIGPIPE, SIGXFSZ) or the caller did would outlive the exec: the
    program starts with every signal at its default, as under docker."""
    for sig in range(1, signal.NSIG):
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):  # 32 and 33 belong to the C library
            pass


def _run_init(spec: ContainerSpec, program: str, errpipe: int) -> None:
    """--init where there is no init stub: PID 1 forks the program, forwards signals to it
    and reaps every zombie."""
    child = os.fork()
    if child == 0:
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        sc.close_range(3, 0xFFFFFFFF, 4)
        _exec(program, spec, errpipe, None)
    os.close(errpipe)
    sc.close_range(3, 0xFFFFFFFF, 0)
    for sig in range(1, signal.NSIG):
        if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD):
            continue
        try:
            signal.signal(sig, lambda s, _f: os.kill(child, s))
        except (OSError, ValueError):
            pass
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == child:
            if os.WIFSIGNALED(status):
                os._exit(128 + os.WTERMSIG(status))
            os._exit(os.waitstatus_to_exitcode(status))


# ----------------------------------------------------------------- the kiln side
def _stage1(spec: ContainerSpec, go_read: int, errpipe: int, pidpipe: int, tty_sock) -> None:
    try:
        if spec.userns_fd is not None:
            # --userns=auto: the overlay on idmapped layers is mounted here, by root in a
            # mount namespace of its own; the container's namespaces below then belong to
            # its user namespace, their mount namespace a copy of this one
            sc.unshare(sc.CLONE_NEWNS)
            sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
            rootfs.mount_overlay_idmapped(spec.layers, spec.upper, spec.work, spec.rootfs,
                                          os.path.dirname(spec.upper), spec.userns_fd,
                                          nodev=not spec.privileged)
            sc.setns(spec.userns_fd, sc.CLONE_NEWUSER)
            # the namespace's root from here on (what the container makes, a tmpfs's
            # files among them, needs ids the namespace maps); the container's directory
            # is searchable by others for this (containers.create)
            os.setresgid(0, 0, 0)
            os.setgroups([])
            os.setresuid(0, 0, 0)
        # the cgroup namespace comes later, once PID 1 is in the container's cgroup
        flags = sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWPID
        if spec.network in ("none", "bridge", "slirp4netns"):  # kiln plugs it in before go
            flags |= sc.CLONE_NEWNET
        elif spec.network == "container":
            sc.setns(spec.netns_fd, sc.CLONE_NEWNET)
        sc.unshare(flags)
        pid = os.fork()
        if pid == 0:
            os.close(pidpipe)
            _container_main(spec, go_read, errpipe, tty_sock)
        os.write(pidpipe, str(pid).encode())
        os._exit(0)
    except BaseException as e:
        _fail_child(errpipe, f"cannot create the container's namespaces: {e}", 125)


class Container:
    """A started container; ``wait()`` relays I/O and signals until it exits."""

    def __init__(self, spec: ContainerSpec, cgroup=None):
        self.spec = spec
        self.cgroup = cgroup
        self.pid = 0
        self._master: int | None = None

    def start(self, on_pid=None) -> None:
        """Start the container; signals for it are held back until ``wait()`` forwards them.

        ``on_pid(pid)`` runs once PID 1 exists and before the image's program may run (so
        state written there is never behind what the program does)."""
        sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            self._start(on_pid)
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
            raise

    def _start(self, on_pid) -> None:
        if self.spec.id_map is not None and self.spec.userns_fd is None:
            from runtime.userns import open_namespace

            self.spec.userns_fd = open_namespace(*self.spec.id_map)
            try:
                self._start(on_pid)
            finally:
                os.close(self.spec.userns_fd)
                self.spec.userns_fd = None
            return
        go_read, go_write = os.pipe()
        err_read, err_write = os.pipe2(os.O_CLOEXEC)
        pid_read, pid_write = os.pipe()
        tty_parent = tty_child = None
        if self.spec.process.terminal:
            import socket
            import termios  # noqa: F401 - for the container's PID 1, see the imports above

            tty_parent, tty_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stage1 = os.fork()
        if stage1 == 0:
            os.close(go_write)
            os.close(err_read)
            os.close(pid_read)
            if tty_parent is not None:
                tty_parent.close()
            if not self.spec.process.stdin and not self.spec.process.terminal:
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.close(devnull)
            for fd, target in ((self.spec.process.stdout, 1), (self.spec.process.stderr, 2)):
                if fd is not None:
                    os.dup2(fd, target)  # the copy is inherited; fd itself closes on exec
            self._stage1(go_read, err_write, pid_write, tty_child)
        os.close(go_read)
        os.close(err_write)
        os.close(pid_write)
        if tty_child is not None:
            tty_child.close()
        try:
            data = os.read(pid_read, 64)  # stage 1's one small write; EOF when it failed
            if not data:
                stage1 = _reap(stage1)
                self._raise_start_error(err_read)
            self.pid = int(data)
            try:
                if self.cgroup is not None:
                    self.cgroup.add_process(self.pid)
                if on_pid is not None:
                    on_pid(self.pid)
                if self.spec.rlimits or self.spec.sysctls or self.spec.oom_score_adj is not None:
                    from runtime.settings import apply_to

                    apply_to(self.spec, self.pid)  # its network is in place by now
                # Stage 1 exits by itself meanwhile. Once it is gone PID 1 is kiln's child,
                # as it must be before go: PR_SET_PDEATHSIG then watches kiln, not stage 1.
                stage1 = _reap(stage1)
                os.write(go_write, b"g")
            except (OSError, KilnError):
                # PID 1 may have failed its setup meanwhile: its own reason comes first.
                # Else it still waits for go, holding the error pipe open: it goes first.
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except OSError:
                    pass
                self._raise_start_error(err_read)
                raise
            os.close(go_write)
            go_write = -1
            if tty_parent is not None:
                try:
                    self._master = _receive_master(tty_parent)
                except ContainerStartError:
                    self._raise_start_error(err_read)  # the real reason, if it said one
                    raise
                _copy_window_size(self._master)
                tty_parent.send(b"k")
            self._raise_start_error(err_read)  # EOF without data: exec succeeded
        except BaseException:
            if self.pid:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except OSError:
                    pass
                stage1 = _reap(stage1)  # then PID 1 is our child, to be reaped here
                _reap(self.pid)
            raise
        finally:
            _reap(stage1)
            if go_write >= 0:
                os.close(go_write)
            os.close(pid_read)
            if tty_parent is not None:
                tty_parent.close()

    def _stage1(self, go_read: int, errpipe: int, pidpipe: int, tty_sock) -> None:
        """In the forked stage 1: make PID 1 and report its pid (never returns)."""
        _stage1(self.spec, go_read, errpipe, pidpipe, tty_sock)

    def _raise_start_error(self, err_read: int) -> None:
        data = _read_all(err_read)
        os.close(err_read)
        if data.startswith(STUB_FAILED) and len(data) == 2:
            err = data[1]
            data = b"%d\n%s: %s" % (EXIT_NOT_FOUND if err == errno.ENOENT else
                                     EXIT_NOT_EXECUTABLE, os.fsencode(self.spec.process.args[0]),
                                     os.strerror(err).encode())
        if data:
            code, _, message = data.partition(b"\n")
            if self.pid:
                try:
                    os.waitpid(self.pid, 0)
                except ChildProcessError:
                    pass
            raise ContainerStartError(message.decode("utf-8", "replace"),
                                      int(code) if code.isdigit() else 125)

    def wait(self, *, stop_timeout: float = 10.0) -> ExitStatus:
        deadline: list[float] = []

        def forward(sig, _frame):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
            if sig in (signal.SIGINT, signal.SIGTERM) and not deadline:
                deadline.append(time.monotonic() + stop_timeout)

        # Only the main thread may install handlers; a build running steps in worker threads
        # relies on PR_SET_PDEATHSIG instead (kiln dies -> its containers die).
        old = {}
        try:
            for sig in FORWARDED:
                old[sig] = signal.signal(sig, forward)
        except ValueError:  # "signal only works in main thread": nothing was installed
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # those that came meanwhile, too
        try:
            if self._master is not None:
                status = self._relay_terminal(deadline)
            else:
                status = self._wait_plain(deadline)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return self._exit_status(status)

    def _wait_plain(self, deadline: list[float]) -> int:
        pidfd = os.pidfd_open(self.pid)
        try:
            while True:
                # a forwarded SIGTERM sets the deadline from a signal handler, which does not
                # wake select (PEP 475 retries it): so never block for long without one
                timeout = max(0.0, deadline[0] - time.monotonic()) if deadline else 0.25
                select.select([pidfd], [], [], timeout)
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    return status
                self._kill_after(deadline)
        finally:
            os.close(pidfd)

    def _kill_after(self, deadline: list[float]) -> None:
        if deadline and time.monotonic() > deadline[0]:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _relay_terminal(self, deadline: list[float]) -> int:
        import termios
        import tty

        master = self._master
        assert master is not None
        stdin_tty = os.isatty(0)
        saved = termios.tcgetattr(0) if stdin_tty else None

        old_winch = signal.signal(signal.SIGWINCH, lambda _s, _f: _copy_window_size(master))
        if stdin_tty:
            tty.setraw(0)
        inputs = [master] + ([0] if self.spec.process.stdin else [])
        status = None
        try:
            while True:
                ready, _, _ = select.select(inputs, [], [], 0.05)
                if master in ready:
                    try:
                        data = os.read(master, 65536)
                    except OSError:
                        data = b""
                    if not data:
                        inputs.remove(master)
                    else:
                        write_all(1, data)
                if 0 in ready:
                    data = os.read(0, 65536)
                    if data:
                        write_all(master, data)
                    else:
                        inputs.remove(0)
                if status is None:
                    pid, st = os.waitpid(self.pid, os.WNOHANG)
                    if pid:
                        status = st
                if status is not None and master not in inputs:
                    return status
                if status is not None and not ready:
                    return status
                self._kill_after(deadline)
        finally:
            signal.signal(signal.SIGWINCH, old_winch)
            if saved is not None:
                termios.tcsetattr(0, termios.TCSADRAIN, saved)
            os.close(master)

    def _exit_status(self, status: int) -> ExitStatus:
        oom = bool(self.cgroup is not None and self.cgroup.oom_killed())
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            return ExitStatus(128 + sig, sig, oom)
        return ExitStatus(os.waitstatus_to_exitcode(status), None, oom)


def _reap(pid: int) -> int:
    """Wait for child ``pid`` (0: already reaped); returns 0."""
    if pid:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return 0


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        data = os.read(fd, 65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _copy_window_size(master: int) -> None:
    import termios

    for fd in (0, 1, 2):
        if os.isatty(fd):
            try:
                fcntl.ioctl(master, termios.TIOCSWINSZ,
                            fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
            except OSError:
                pass
            return


def _receive_master(sock: socket.socket) -> int:
    import socket

    _msg, fds, _flags, _addr = socket.recv_fds(sock, 1, 1)
    if not fds:
        raise ContainerStartError("the container did not hand over its terminal")
    return fds[0]


def run(spec: ContainerSpec, cgroup=None, *, stop_timeout: float = 10.0) -> ExitStatus:
    container = Container(spec, cgroup)
    container.start()
    return container.wait(stop_timeout=stop_timeout)

