"""What kiln stop, kill, wait and logs do to a container: through its state.json, its log
and PID 1's pid (a pidfd, so a reused pid is never signalled), never through its monitor."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import time

from runtime.containers import ContainerRecord, StoreHandle, alive, find
from store.errors import KilnError


def parse_signal(text: str) -> int:
    """SIGTERM, TERM, 15 -> 15."""
    name = text.upper()
    if name.isdigit():
        number = int(name)
        if 1 <= number < signal.NSIG:
            return number
    else:
        if not name.startswith("SIG"):
            name = "SIG" + name
        number = getattr(signal, name, None)
        if isinstance(number, int) and name not in ("SIG_DFL", "SIG_IGN", "SIG_BLOCK",
                                                    "SIG_UNBLOCK", "SIG_SETMASK"):
            return int(number)
    raise KilnError(f"invalid signal {text!r}")


def _directory(handle: StoreHandle, rec: ContainerRecord) -> str:
    return os.path.join(handle.containers_dir, rec.id)


def _pidfd(rec: ContainerRecord) -> int | None:
    """A pidfd of the container's PID 1 if it still is that process; None when it ended."""
    if rec.status != "running" or not rec.pid:
        return None
    try:
        fd = os.pidfd_open(rec.pid)
    except ProcessLookupError:
        return None
    if not alive(rec.pid):  # ended, a zombie not reaped yet
        os.close(fd)
        return None
    return fd


def kill(store, name_or_id: str, sig: int = signal.SIGKILL) -> ContainerRecord:
    handle = StoreHandle(store)
    rec = find(handle, name_or_id)
    fd = _pidfd(rec)
    if fd is None:
        raise KilnError(f"container {rec.name} is not running")
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        raise KilnError(f"container {rec.name} is not running") from None
    finally:
        os.close(fd)
    return rec


def stop(store, name_or_id: str, timeout: float = 10.0) -> ContainerRecord:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; returns once kiln has recorded the
    exit. A stopped container is not restarted by its --restart policy (Docker's rule)."""
    from runtime.monitor import mark_stopped

    handle = StoreHandle(store)
    rec = find(handle, name_or_id)
    if rec.monitor and alive(rec.monitor):
        mark_stopped(_directory(handle, rec))  # also between two runs of a restart policy
    fd = _pidfd(rec)
    if fd is None:
        return rec
    try:
        try:
            signal.pidfd_send_signal(fd, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not select.select([fd], [], [], max(0.0, timeout))[0]:
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            select.select([fd], [], [], 10.0)
    finally:
        os.close(fd)
    return wait_recorded(handle, rec)


def start(store, name_or_id: str) -> ContainerRecord:
    """Run a stopped container again, detached: its writable layer, name, ID and options
    kept (the image by the name it was run with). Running already: nothing to do."""
    from runtime.containers import load_options
    from runtime.monitor import clear_stopped, start_detached

    handle = StoreHandle(store)
    rec = find(handle, name_or_id)
    if rec.status == "running" and alive(rec.pid):
        return rec
    directory = _directory(handle, rec)
    opts = load_options(directory)
    opts.tty = opts.interactive = False  # nothing to attach to: its output goes to its log
    clear_stopped(directory)
    start_detached(handle.root, opts, rec)
    return rec


def restart(store, name_or_id: str, timeout: float = 10.0) -> ContainerRecord:
    stop(store, name_or_id, timeout)
    return start(store, name_or_id)


def wait_recorded(handle: StoreHandle, rec: ContainerRecord, timeout: float = 10.0):
    """The record once whoever runs the container has written down its exit."""
    deadline = time.monotonic() + timeout
    directory = _directory(handle, rec)
    while True:
        try:
            now = ContainerRecord.load(directory)
        except FileNotFoundError:
            return rec  # --rm: gone with its record
        except (OSError, ValueError):
            now = rec
        if now.status != "running" or time.monotonic() > deadline:
            return now
        if not alive(now.pid) and time.monotonic() > deadline - timeout + 0.5:
            now.status = "exited"  # its kiln died with it (kill -9) and recorded nothing
            return now
        time.sleep(0.02)



def wait(store, name_or_id: str) -> int:
    """Block until the container has exited; its exit code."""
    handle = StoreHandle(store)
    rec = find(handle, name_or_id)
    while True:
        fd = _pidfd(rec)
        if fd is not None:
            try:
                select.select([fd], [], [])
            finally:
                os.close(fd)
        final = wait_recorded(handle, rec, timeout=30.0)
        if final.status != "running" or final.pid != rec.pid:
            if final.status == "running":  # restarted meanwhile: wait for the new one
                rec = final
                continue
            return final.exit_code if final.exit_code is not None else 0
        rec = final


def logs(store, name_or_id: str, *, follow: bool = False, tail: int | None = None,
         timestamps: bool = False) -> None:
    from runtime.monitor import LOG

    handle = StoreHandle(store)
    rec = find(handle, name_or_id)
    path = os.path.join(_directory(handle, rec), LOG)
    if not os.path.exists(path) and not rec.monitor:
        raise KilnError(f"container {rec.name} has no log: only detached containers "
                        "(kiln run -d) keep one")
    with contextlib.ExitStack() as stack:
        _print_log(stack, path, handle, rec, tail=tail, follow=follow, timestamps=timestamps)


def _open(stack: contextlib.ExitStack, path: str):
    try:
        return stack.enter_context(open(path, "rb"))
    except FileNotFoundError:
        return None


def _print_log(stack, path: str, handle: StoreHandle, rec: ContainerRecord, *, tail, follow,
               timestamps) -> None:
    f = _open(stack, path)
    out = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}

    def emit(line: bytes) -> None:
        try:
            entry = json.loads(line)
        except ValueError:
            return
        data = entry.get("log", "").encode("utf-8", "surrogateescape")
        if timestamps:
            data = entry.get("time", "").encode() + b" " + data
        stream = out.get(entry.get("stream"), sys.stdout.buffer)
        stream.write(data)
        stream.flush()

    pending = b""
    if f is not None:
        lines = f.read().splitlines(keepends=True)
        if lines and not lines[-1].endswith(b"\n"):
            pending = lines.pop()
        for line in lines[-tail:] if tail is not None and tail >= 0 else lines:
            if tail == 0:
                break
            emit(line)
    if not follow:
        return
    while True:
        try:
            now = ContainerRecord.load(_directory(handle, rec))
        except (OSError, ValueError):
            now = None
        ended = now is None or now.status != "running" or not alive(now.pid)
        if f is None:
            f = _open(stack, path)
        chunk = f.read() if f is not None else b""
        if chunk:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                emit(line)
        if ended:  # what it wrote before it ended has been read: done
            return
        if not chunk:
            time.sleep(0.05)


def _iso(t: float | None) -> str:
    if not t:
        return "0001-01-01T00:00:00Z"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


def inspect(store, name_or_id: str) -> dict:
    """A container as ``docker container inspect`` shows it (the fields kiln has)."""
    handle = StoreHandle(store)
    rec = find(handle, name_or_id)
    directory = _directory(handle, rec)
    options: dict = {}
    try:
        from runtime.containers import OPTIONS_FILE

        with open(os.path.join(directory, OPTIONS_FILE), "rb") as f:
            options = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        pass
    running = rec.status == "running" and alive(rec.pid)
    paused = running and is_paused(rec)
    ports: dict[str, list] = {}
    for proto, host_ip, host_port, ctr_port in rec.ports or []:
        ports.setdefault(f"{ctr_port}/{proto}", []).append(
            {"HostIp": host_ip or "0.0.0.0", "HostPort": str(host_port)})
    networks = {}
    if rec.ip:
        gateway, prefix = "", 0
        try:
            from runtime.network.networks import Networks

            net = Networks().get(rec.network)
            gateway, prefix = net.gateway, net.prefix
        except KilnError:
            pass
        networks[rec.network] = {"IPAddress": rec.ip, "Gateway": gateway,
                                 "IPPrefixLen": prefix}
    policy, _, retries = (options.get("restart") or "no").partition(":")
    status = "paused" if paused else ("running" if running else
                                       ("exited" if rec.status != "created" else "created"))
    return {
        "Id": rec.id, "Name": "/" + rec.name, "Created": _iso(rec.created),
        "Path": rec.command[0] if rec.command else "", "Args": rec.command[1:],
        "Image": rec.image,
        "State": {"Status": status, "Running": running, "Paused": paused,
                  "Restarting": False, "Pid": rec.pid if running else 0,
                  "ExitCode": rec.exit_code or 0, "StartedAt": _iso(rec.started),
                  "FinishedAt": _iso(rec.finished)},
        "RestartCount": rec.restart_count or 0,
        "Config": {"Image": rec.image_name, "Cmd": rec.command},
        "HostConfig": {"NetworkMode": rec.network or "none",
                       "RestartPolicy": {"Name": policy, "MaximumRetryCount":
                                         int(retries or 0)},
                       "AutoRemove": bool(options.get("remove")),
                       # podman's names for --userns=auto and the block it got
                       "UsernsMode": options.get("userns") or "",
                       "IDMappings": {"UidMap": [f"0:{rec.userns[0]}:{rec.userns[1]}"],
                                      "GidMap": [f"0:{rec.userns[0]}:{rec.userns[1]}"]}
                       if rec.userns else {}},
        "NetworkSettings": {"IPAddress": rec.ip or "", "Ports": ports, "Networks": networks},
    }


# ---------------------------------------------------------------------- freezer, top, stats
def _cgroup_dirs(rec: ContainerRecord) -> dict[str, str]:
    from runtime.cgroups import cgroup_dirs_of

    if not (rec.status == "running" and alive(rec.pid)):
        raise KilnError(f"container {rec.name} is not running")
    own = f"kiln-{rec.id[:12]}"  # not a hierarchy it was never put in (its root is the host's)
    return {k: d for k, d in cgroup_dirs_of(rec.pid).items() if os.path.basename(d) == own}


def is_paused(rec: ContainerRecord) -> bool:
    try:
        dirs = _cgroup_dirs(rec)
    except (KilnError, OSError):
        return False
    for key, d in dirs.items():
        try:
            if key == "":
                with open(os.path.join(d, "cgroup.freeze")) as f:
                    return f.read().strip() == "1"
            if "freezer" in key.split(","):
                with open(os.path.join(d, "freezer.state")) as f:
                    return f.read().strip() in ("FROZEN", "FREEZING")
        except OSError:
            continue
    return False


def set_paused(store, name_or_id: str, paused: bool) -> ContainerRecord:
    """Freeze (v1 freezer.state, v2 cgroup.freeze) or thaw every process of the container."""
    handle = StoreHandle(store)
    rec = find(handle, name_or_id)
    dirs = _cgroup_dirs(rec)
    if is_paused(rec) == paused:
        raise KilnError(f"container {rec.name} is {'already' if paused else 'not'} paused")
    freeze(dirs, paused, rec.name)
    return rec


def freeze(dirs: dict[str, str], paused: bool, name: str) -> None:
    """Freeze or thaw the cgroup in ``dirs`` (as cgroup_dirs_of gives them): the v1
    freezer where there is one, else v2's cgroup.freeze; returns once it took effect."""
    freezer = next((d for k, d in dirs.items() if "freezer" in k.split(",")), None)
    unified = dirs.get("")
    deadline = time.monotonic() + 10
    if freezer is not None:
        state = os.path.join(freezer, "freezer.state")
        want = "FROZEN" if paused else "THAWED"
        while True:
            with open(state, "w") as f:
                f.write(want)
            with open(state) as f:
                if f.read().strip() == want:
                    return
            if time.monotonic() > deadline:
                raise KilnError(f"container {name}: the freezer did not reach {want}")
            time.sleep(0.01)
    if unified is not None and os.path.exists(os.path.join(unified, "cgroup.freeze")):
        with open(os.path.join(unified, "cgroup.freeze"), "w") as f:
            f.write("1" if paused else "0")
        while True:
            with open(os.path.join(unified, "cgroup.events")) as f:
                frozen = "frozen 1" in f.read()
            if frozen == paused:
                return
            if time.monotonic() > deadline:
                raise KilnError(f"container {name}: cgroup.freeze did not take effect")
            time.sleep(0.01)
    from store.fsutil import is_host_root

    if not is_host_root():
        raise KilnError(f"container {name} has no cgroup of its own: rootless kiln pauses "
                        "containers only where cgroup v2 is delegated to the user")
    raise KilnError(f"container {name} has no freezer cgroup (on cgroup v1 only "
                    "detached containers, kiln run -d, get one)")


def _pid_namespace_members(pid: int) -> set[int]:
    try:
        target = os.stat(f"/proc/{pid}/ns/pid")
    except OSError:
        return set()
    members = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                st = os.stat(f"/proc/{name}/ns/pid")
            except OSError:
                continue
            if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev):
                members.add(int(name))
    return members


def processes(store, name_or_id: str) -> list[dict]:
    """The container's processes (host pids), as ps -ef lists them."""
    handle = StoreHandle(store)
    rec = find(handle, name_or_id)
    pids: set[int] = set()
    for d in _cgroup_dirs(rec).values():
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids |= {int(x) for x in f.read().split()}
        except OSError:
            continue
    if not pids:  # no cgroup of its own (rootless): the processes of its PID namespace
        pids = _pid_namespace_members(rec.pid)
    ticks = os.sysconf("SC_CLK_TCK")
    out = []
    for pid in sorted(pids):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/status") as f:
                uid = next(line.split()[1] for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) // ticks
        name = stat[stat.index(b"(") + 1:stat.rindex(b")")].decode("utf-8", "replace")
        cmd = cmdline.replace(b"\0", b" ").decode("utf-8", "replace").strip() or f"[{name}]"
        out.append({"UID": uid, "PID": pid, "PPID": int(fields[1]),
                    "TIME": f"{cpu // 3600:02d}:{cpu // 60 % 60:02d}:{cpu % 60:02d}",
                    "CMD": cmd})
    return out


def stats(store, names_or_ids: list[str], interval: float = 0.5) -> list[dict]:
    """CPU %, memory, pids and block I/O from the containers' cgroups (v1 or v2); CPU %
    over one ``interval`` shared by all of them."""
    handle = StoreHandle(store)
    recs = [find(handle, n) for n in names_or_ids]
    dirs = [_cgroup_dirs(rec) for rec in recs]
    first, t0 = [_cpu_usage_ns(d) for d in dirs], time.monotonic()
    time.sleep(interval)
    second, t1 = [_cpu_usage_ns(d) for d in dirs], time.monotonic()
    rows = []
    for rec, d, before, after in zip(recs, dirs, first, second, strict=True):
        cpu = (100.0 * (after - before) / ((t1 - t0) * 1e9)
               if before is not None and after is not None else 0.0)
        memory, limit = _memory(d)
        rows.append({"ID": rec.id, "Name": rec.name, "CPUPerc": round(cpu, 2),
                     "MemUsage": memory, "MemLimit": limit,
                     "PIDs": _first_int(d, ("pids", "pids.current"), ("", "pids.current")) or 0,
                     "BlockIO": _block_io(d)})
    return rows


def _read_in(dirs: dict[str, str], controller: str, name: str) -> str | None:
    for key, d in dirs.items():
        if (controller == "" and key == "") or (controller and controller in key.split(",")):
            try:
                with open(os.path.join(d, name)) as f:
                    return f.read()
            except OSError:
                return None
    return None


def _first_int(dirs, *candidates) -> int | None:
    for controller, name in candidates:
        text = _read_in(dirs, controller, name)
        if text is not None and text.strip().isdigit():
            return int(text)
    return None


def _cpu_usage_ns(dirs) -> int | None:
    v1 = _first_int(dirs, ("cpuacct", "cpuacct.usage"))
    if v1 is not None:
        return v1
    text = _read_in(dirs, "", "cpu.stat") or ""
    for line in text.splitlines():
        if line.startswith("usage_usec "):
            return int(line.split()[1]) * 1000
    return None


def _memory(dirs) -> tuple[int, int | None]:
    usage = _first_int(dirs, ("memory", "memory.usage_in_bytes"), ("", "memory.current")) or 0
    limit = _first_int(dirs, ("memory", "memory.limit_in_bytes"), ("", "memory.max"))
    if limit is not None and limit >= 1 << 62:
        limit = None
    return usage, limit


def _block_io(dirs) -> dict[str, int]:
    read = write = 0
    text = _read_in(dirs, "blkio", "blkio.throttle.io_service_bytes")
    if text is not None:
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] in ("Read", "Write"):
                if parts[1] == "Read":
                    read += int(parts[2])
                else:
                    write += int(parts[2])
        return {"Read": read, "Write": write}
    for line in (_read_in(dirs, "", "io.stat") or "").splitlines():
        for field in line.split()[1:]:
            key, _, value = field.partition("=")
            if key == "rbytes":
                read += int(value)
            elif key == "wbytes":
                write += int(value)
    return {"Read": read, "Write": write}
