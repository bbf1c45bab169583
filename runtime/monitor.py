"""Detached containers (``kiln run -d``): a small monitor process per container.

    kiln run -d --fork--> A --fork--> monitor (setsid; A exits, so init adopts it)
       |<------ "ok <id>" or the start error ---------|
       prints the ID, exits                           | holds the container's stdout/stderr
                                                      | pipes, appends them to its log
                                                      | (Docker's json-file lines), reaps
                                                      | PID 1, records the exit code, takes
                                                      | its network down, restarts it as
                                                      | --restart says

The monitor is the container's parent (PR_SET_PDEATHSIG of PID 1 watches it) and the
holder of its network lease. Everything else (stop, kill, logs, wait) talks to the
container through its state.json, its log and PID 1's pid, never to the monitor.
"""

from __future__ import annotations

import errno
import json
import os
import select
import time

from runtime.containers import ContainerRecord, RunOptions, StoreHandle, remove_container_dir
from store.errors import KilnError
from store.fsutil import write_all

LOG = "ctr.log"
_LINE_MAX = 16 << 10  # Docker's json-file splits longer lines too


def parse_restart(text: str | None) -> tuple[str, int]:
    """--restart no|always|unless-stopped|on-failure[:N] -> (policy, max retries or 0)."""
    policy, _, count = (text or "no").partition(":")
    if policy not in ("no", "always", "unless-stopped", "on-failure"):
        raise KilnError(f"invalid --restart {text!r}: no, always, unless-stopped or "
                        "on-failure[:N]")
    if count and (policy != "on-failure" or not count.isdigit()):
        raise KilnError(f"invalid --restart {text!r}: only on-failure takes a count, a "
                        "whole number")
    return policy, int(count or 0)


def start_detached(store, opts: RunOptions, existing: ContainerRecord | None = None) -> str:
    """Start ``opts`` as a detached container; its ID once its program runs. A start error
    is raised here, with nothing left behind (the monitor cleans up before it reports)."""
    from runtime.process import ContainerStartError

    parse_restart(opts.restart)
    r, w = os.pipe2(os.O_CLOEXEC)
    first = os.fork()
    if first == 0:
        code = 0
        try:
            os.close(r)
            os.setsid()
            if os.fork() == 0:
                _monitor(store, opts, w, existing)  # never returns
        except BaseException:
            code = 1
        os._exit(code)
    os.close(w)
    chunks = []
    while data := os.read(r, 65536):
        chunks.append(data)
    os.close(r)
    os.waitpid(first, 0)
    report = b"".join(chunks).decode("utf-8", "replace")
    kind, _, rest = report.partition(" ")
    if kind == "ok":
        return rest.strip()
    if kind == "err":
        code, _, message = rest.partition("\n")
        raise ContainerStartError(message, int(code) if code.isdigit() else 125)
    raise KilnError("the container's monitor failed before it could start the container")


def _monitor(store, opts: RunOptions, report_fd: int,
             existing: ContainerRecord | None) -> None:
    from runtime.process import ContainerStartError

    code = 0
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        try:
            monitor = Monitor(StoreHandle(store), opts, existing)
            monitor.first_start()
        except ContainerStartError as e:
            os.write(report_fd, f"err {e.exit_code}\n{e}".encode())
            os._exit(0)
        except KilnError as e:
            os.write(report_fd, f"err 125\n{e}".encode())
            os._exit(0)
        except BaseException as e:
            os.write(report_fd, f"err 125\ncannot start the container: {e!r}".encode())
            os._exit(0)
        os.write(report_fd, f"ok {monitor.record.id}\n".encode())
        os.close(report_fd)
        # nothing of the caller's stays open here: $(kiln run -d ...) must see EOF
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        monitor.supervise()
    except BaseException:
        code = 1
    os._exit(code)


class Monitor:
    def __init__(self, handle: StoreHandle, opts: RunOptions,
                 existing: ContainerRecord | None = None):
        self.handle = handle
        self.opts = opts
        self.existing = existing
        self.restarted = False
        self.policy, self.max_retries = parse_restart(opts.restart)
        self.record: ContainerRecord | None = None
        self.directory = ""
        self.container = None
        self.cgroup = None
        self.plan = None
        self.spec = None
        self.pipes: dict[int, str] = {}
        self.stdin_w: int | None = None
        self.log_fd: int | None = None  # ctr.log, opened at the first output

    # ---------------------------------------------------------------- starting
    def first_start(self) -> None:
        from runtime.containers import create

        record, spec, directory, plan = create(self.handle, self.opts, self.existing)
        self.record, self.spec, self.directory, self.plan = record, spec, directory, plan
        try:
            self._start()
        except BaseException:
            self._teardown()
            if self.existing is None:
                remove_container_dir(directory)
            else:
                record.status, record.pid = "exited", 0
                record.save(directory)
            raise

    def _start(self) -> None:
        from runtime.cgroups import create_cgroup
        from runtime.containers import cgroup_options
        from runtime.process import FORWARDED, Container
        from runtime.process import signal as _signal

        cg = cgroup_options(self.opts)
        writers = []
        if self.spec.process.terminal:
            self.spec.process.stdout = self.spec.process.stderr = None  # the pty's, below
        else:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            self.pipes = {out_r: "stdout", err_r: "stderr"}
            self.spec.process.stdout, self.spec.process.stderr = out_w, err_w
            writers = [out_w, err_w]
        if self.spec.process.stdin and not self.spec.process.terminal:
            # -d -i: stdin stays open (a shell waits on it, as under docker run -di); the
            # monitor holds the writing end and never writes
            stdin_r, self.stdin_w = os.pipe2(os.O_CLOEXEC)
            os.dup2(stdin_r, 0)  # inherited by the container as its fd 0
            os.close(stdin_r)
        self.cgroup = create_cgroup(f"kiln-{self.record.id[:12]}", **cg,
                                    also=("freezer", "pids", "cpuacct", "blkio"))
        if not self.restarted:
            from runtime.containers import warn_about

            warn_about(cg["limits"].warnings, self.cgroup.warnings)  # still on the caller's
        self.container = Container(self.spec, self.cgroup)
        record, plan = self.record, self.plan

        def running(pid: int) -> None:
            if plan is not None:
                plan.connect(pid)
            record.status, record.pid, record.monitor = "running", pid, os.getpid()
            record.started, record.exit_code, record.finished = time.time(), None, None
            record.save(self.directory)

        try:
            self.container.start(on_pid=running)
            if self.spec.process.terminal:
                # -d -t: the pty's master is the container's output, and keeps its
                # terminal open
                self.pipes = {self.container._master: "stdout"}
        finally:
            for fd in writers:
                os.close(fd)
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, FORWARDED)

    # ---------------------------------------------------------------- running
    def supervise(self) -> None:
        while True:
            status = self._pump()
            self._teardown()
            record = self.record
            record.status, record.pid = "exited", 0
            record.exit_code, record.finished = status, time.time()
            stopped = _stop_requested(self.directory)
            if not stopped and self._restart_wanted(status):
                record.restart_count = (record.restart_count or 0) + 1
                record.save(self.directory)
                time.sleep(min(0.1 * 2 ** min(record.restart_count, 6), 5.0))
                if _stop_requested(self.directory):  # kiln stop during the back-off
                    record.save(self.directory)
                    return
                try:
                    self.restarted = True
                    self._replan()
                    self._start()
                    continue
                except (KilnError, OSError) as e:
                    self._log("stderr", f"kiln: cannot restart the container: {e}\n".encode())
                    self._teardown()
            if self.opts.remove:
                remove_container_dir(self.directory)
            else:
                record.save(self.directory)
            return

    def _restart_wanted(self, status: int) -> bool:
        if self.policy in ("always", "unless-stopped"):
            return True
        if self.policy == "on-failure" and status != 0:
            return not self.max_retries or (self.record.restart_count or 0) < self.max_retries
        return False

    def _replan(self) -> None:
        """A restarted container gets its network again (the old netns died with it)."""
        if self.plan is None or not hasattr(self.plan, "lease"):
            return  # no plan, or slirp4netns: starts anew with the container
        from runtime.network import attach, ports
        from runtime.network.networks import Networks

        lease = self.plan.lease
        specs = [ports.PortSpec(p[0], p[1], (p[2],), p[3]) for p in lease.ports]
        self.plan = attach.plan(
            Networks(self.opts.default_subnet), lease.network, container_id=lease.container,
            container_name=lease.name, hostname=lease.hostname, hosts_file=lease.hosts_file,
            ip=lease.ip, port_specs=specs, extra_hosts=lease.extra_hosts,
            aliases=lease.aliases)

    def _pump(self) -> int:
        """Log the container's output until it has exited; its exit code, as docker's."""
        pid = self.container.pid
        pidfd = os.pidfd_open(pid)
        status = None
        try:
            while self.pipes or status is None:
                ready, _, _ = select.select([*self.pipes, pidfd] if status is None
                                            else list(self.pipes), [], [], 1.0)
                for fd in ready:
                    if fd == pidfd:
                        continue
                    data = _read(fd)
                    if data:
                        self._log(self.pipes[fd], data)
                    else:
                        os.close(fd)
                        del self.pipes[fd]
                if status is None:
                    done, st = os.waitpid(pid, os.WNOHANG)
                    if done:
                        status = st
                        self._drain()
        finally:
            os.close(pidfd)
        return self.container._exit_status(status).code

    def _drain(self) -> None:
        """PID 1 is gone and with it its namespace: what is left in the pipes is all."""
        for fd in list(self.pipes):
            os.set_blocking(fd, False)
            try:
                while data := _read(fd):
                    self._log(self.pipes[fd], data)
            except BlockingIOError:
                pass
            os.close(fd)
            del self.pipes[fd]

    def _log(self, stream: str, data: bytes) -> None:
        stamp = time.time_ns()
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp // 10**9)) + \
            f".{stamp % 10**9:09d}Z"
        lines = []
        for piece in data.splitlines(keepends=True):
            for start in range(0, len(piece), _LINE_MAX):
                chunk = piece[start:start + _LINE_MAX]
                lines.append(json.dumps({"log": chunk.decode("utf-8", "replace"),
                                         "stream": stream, "time": text}) + "\n")
        if self.log_fd is None:
            self.log_fd = os.open(os.path.join(self.directory, LOG),
                                  os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        write_all(self.log_fd, "".join(lines).encode())

    def _teardown(self) -> None:
        if self.plan is not None:
            try:
                self.plan.close()
            except (KilnError, OSError):
                pass
        if self.cgroup is not None:
            try:
                self.cgroup.remove()
            except (KilnError, OSError):
                pass
            self.cgroup = None
        for fd in list(self.pipes):
            os.close(fd)
        self.pipes = {}
        if self.stdin_w is not None:
            os.close(self.stdin_w)
            self.stdin_w = None


STOP_MARK = "stopped"


def _read(fd: int) -> bytes:
    """A chunk of output; b"" at its end (a pty's master says EIO once the slave closes)."""
    try:
        return os.read(fd, 65536)
    except OSError as e:
        if e.errno == errno.EIO:
            return b""
        raise


def _stop_requested(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, STOP_MARK))


def mark_stopped(directory: str) -> None:
    """kiln stop's word to the monitor: do not restart it (Docker's rule for a stop)."""
    with open(os.path.join(directory, STOP_MARK), "w"):
        pass


def clear_stopped(directory: str) -> None:
    try:
        os.unlink(os.path.join(directory, STOP_MARK))
    except FileNotFoundError:
        pass
