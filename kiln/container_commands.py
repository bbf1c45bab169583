"""Container commands: run, ps, rm."""

from __future__ import annotations

import json
import os

import click


@click.command("run", context_settings={"allow_interspersed_args": False,
                                        "help_option_names": ["--help"]})
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--rm", "remove", is_flag=True, help="Remove the container when it exits.")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-terminal.")
@click.option("-e", "--env", multiple=True, help="Set a variable (K=V, or K from kiln's env).")
@click.option("--env-file", multiple=True, type=click.Path(), help="Read variables from a file.")
@click.option("--entrypoint", default=None, help="Override the image's ENTRYPOINT.")
@click.option("-w", "--workdir", default=None, help="Working directory (created if missing).")
@click.option("-u", "--user", default=None, help="name|uid[:group|gid]")
@click.option("-h", "--hostname", default=None)
@click.option("--name", default=None)
@click.option("--read-only", is_flag=True, help="Mount the root filesystem read-only.")
@click.option("-v", "--volume", "volumes", multiple=True, help="HOST:CONTAINER[:ro]")
@click.option("--tmpfs", multiple=True, help="PATH[:OPTIONS]")
@click.option("--network", "--net", default=None,
              help="bridge (default as root), none, host, container:NAME, or a network of "
                   "kiln network create")
@click.option("-p", "--publish", multiple=True,
              help="[IP:][HOST:]CONTAINER[/PROTO]: publish a port (ranges: 8000-8009:80-89)")
@click.option("-P", "--publish-all", is_flag=True, help="Publish every EXPOSEd port.")
@click.option("--ip", default=None, help="The container's address on its network.")
@click.option("--dns", multiple=True, help="A DNS server for /etc/resolv.conf.")
@click.option("--add-host", multiple=True, help="NAME:IP, added to /etc/hosts.")
@click.option("--network-alias", multiple=True, help="Another name on a user network.")
@click.option("-d", "--detach", is_flag=True,
              help="Run in the background; print the container's ID.")
@click.option("--restart", default=None,
              help="With -d: no, always, unless-stopped or on-failure[:N].")
@click.option("--memory-reservation", default=None, help="Soft memory limit (256m).")
@click.option("--cpuset-cpus", default=None, help="CPUs it may run on (0-1,3).")
@click.option("--cpuset-mems", default=None, help="Memory nodes it may use (0).")
@click.option("--ulimit", multiple=True, help="NAME=SOFT[:HARD], e.g. nofile=1024:2048.")
@click.option("--shm-size", default=None, help="Size of /dev/shm (default 64m).")
@click.option("--sysctl", multiple=True, help="KEY=VALUE, namespaced ones (net.*, IPC).")
@click.option("--oom-score-adj", default=None, help="-1000 to 1000.")
@click.option("--cgroup-parent", default=None, help="Cgroup to make its cgroup in.")
@click.option("--blkio-weight", default=None, help="Block I/O weight, 10 to 1000.")
@click.option("--device-read-bps", multiple=True, help="DEVICE:RATE, e.g. /dev/sda:10mb.")
@click.option("--device-write-bps", multiple=True, help="DEVICE:RATE.")
@click.option("--device", multiple=True, help="HOST[:CONTAINER[:PERMS]], e.g. /dev/fuse.")
@click.option("--userns", default=None,
              help="host (default), or auto[:size=N]: a private uid/gid range from the "
                   "/etc/subuid and /etc/subgid entries of 'kiln', so the container's root "
                   "is not the host's")
@click.option("--cap-add", multiple=True)
@click.option("--cap-drop", multiple=True)
@click.option("--privileged", is_flag=True)
@click.option("--security-opt", multiple=True,
              help="seccomp=unconfined|PROFILE.json, no-new-privileges")
@click.option("--init", is_flag=True, help="Run a minimal init as PID 1.")
@click.option("-m", "--memory", default=None)
@click.option("--memory-swap", default=None)
@click.option("--cpus", default=None)
@click.option("--cpu-shares", "-c", default=None)
@click.option("--pids-limit", default=None,
              help="Processes at once, at most (0 or -1: no limit; default: kiln.conf's "
                   "[run] pids_limit, else none).")
@click.option("--stop-timeout", default=10.0, type=float, show_default=True,
              help="Seconds between forwarding SIGINT/SIGTERM and SIGKILL.")
@click.option("--verify-key", "verify_keys", multiple=True, type=click.Path(),
              help="Run only if a signature by this public key holds (repeatable).")
@click.option("--signature-policy", type=click.Path(), default=None,
              help="Check the image against this containers policy.json first.")
@click.pass_context
def run_cmd(ctx, image, command, remove, interactive, tty, env, env_file, entrypoint, workdir,
            user, hostname, name, read_only, volumes, tmpfs, network, cap_add, cap_drop,
            privileged, security_opt, init, memory, memory_swap, cpus, cpu_shares, pids_limit,
            stop_timeout, verify_keys, signature_policy, publish, publish_all, ip, dns, add_host,
            network_alias, detach, restart, memory_reservation, cpuset_cpus, cpuset_mems, ulimit,
            shm_size, sysctl, oom_score_adj, cgroup_parent, blkio_weight, device_read_bps,
            device_write_bps, device, userns):
    """Run COMMAND in a new container from IMAGE; exits with the container's exit code."""
    from kiln.cli import run_and_exit  # shared with kiln run's click-free path

    run_and_exit(ctx.obj.store, dict(ctx.params))


def _status(rec) -> str:
    if rec.status == "running":
        from runtime.lifecycle import is_paused

        return "Up (Paused)" if is_paused(rec) else "Up"
    if rec.exit_code is not None:
        return f"Exited ({rec.exit_code})"
    return rec.status.capitalize()


@click.command("ps")
@click.option("-a", "--all", "show_all", is_flag=True, help="Also exited containers.")
@click.option("-q", "--quiet", is_flag=True)
@click.option("--format", "fmt", default="table",
              help="table, json, or a Go template: '{{.Names}} {{.Status}}', 'table "
                   "{{.ID}}\t{{.Ports}}' (fields ID, Image, Command, CreatedAt, RunningFor, "
                   "Status, State, Ports, Names, Networks).")
@click.pass_context
def ps_cmd(ctx, show_all, quiet, fmt):
    """List containers (running ones unless -a)."""
    from runtime.containers import list_containers

    rows = [c for c in list_containers(ctx.obj.store) if show_all or c.status == "running"]
    if any(c.ip for c in rows):  # a kiln killed with -9 leaves a lease: released here
        from runtime.network.networks import Networks

        with Networks() as networks:
            networks.collect()
    if fmt == "json":
        click.echo(json.dumps([c.__dict__ for c in rows], indent=2))
        return
    if quiet:
        for c in rows:
            click.echo(c.id[:12])
        return
    from runtime.network.ports import describe

    if fmt != "table":
        from kiln.gotemplate import render_rows

        click.echo(render_rows(fmt, [_ps_fields(c, describe) for c in rows],
                               {"ID": "CONTAINER ID", "CreatedAt": "CREATED AT",
                                "RunningFor": "CREATED"}), nl=False)
        return
    click.echo(f"{'CONTAINER ID':<14}{'IMAGE':<28}{'COMMAND':<24}{'STATUS':<14}{'PORTS':<28}"
               "NAMES")
    for c in rows:
        cmd = " ".join(c.command)[:22]
        ports = ", ".join(describe(p) for p in c.ports) if c.status == "running" else ""
        click.echo(f"{c.id[:12]:<14}{c.image_name[:26]:<28}{cmd:<24}{_status(c):<14}"
                   f"{ports:<28}{c.name}")


def _ps_fields(c, describe) -> dict:
    """A container as docker ps --format names its fields."""
    import time as _time

    from kiln.image_commands import ago

    created = _time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", _time.gmtime(c.created))
    return {"ID": c.id[:12], "Image": c.image_name, "Command": json.dumps(" ".join(c.command)),
            "CreatedAt": created, "RunningFor": ago(c.created), "Status": _status(c),
            "State": c.status, "Names": c.name, "Networks": c.network or "",
            "Ports": ", ".join(describe(p) for p in c.ports) if c.status == "running" else ""}


@click.command("rm")
@click.argument("containers", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Kill running containers first.")
@click.pass_context
def rm_cmd(ctx, containers, force):
    """Remove containers and their writable layers."""
    from runtime.containers import remove

    for c in containers:
        remove(ctx.obj.store, c, force=force)
        click.echo(c)


@click.command("logs")
@click.argument("container")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the container exits.")
@click.option("--tail", default=None, help="Only the last N lines (all: every line).")
@click.option("-t", "--timestamps", is_flag=True)
@click.pass_context
def logs_cmd(ctx, container, follow, tail, timestamps):
    """Print a detached container's output (stdout to stdout, stderr to stderr)."""
    from runtime.lifecycle import logs
    from store.errors import KilnError

    count = None
    if tail not in (None, "all"):
        if not tail.isdigit():
            raise KilnError(f"invalid --tail {tail!r}: a number of lines, or all")
        count = int(tail)
    logs(ctx.obj.root_arg, container, follow=follow, tail=count, timestamps=timestamps)


@click.command("stop")
@click.argument("containers", nargs=-1, required=True)
@click.option("-t", "--time", "timeout", default=10.0, type=float, show_default=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")
@click.pass_context
def stop_cmd(ctx, containers, timeout):
    """Stop running containers: SIGTERM, then SIGKILL."""
    from runtime.lifecycle import stop

    for c in containers:
        stop(ctx.obj.root_arg, c, timeout)
        click.echo(c)


@click.command("start")
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
def start_cmd(ctx, containers):
    """Run stopped containers again, in the background (same writable layer and options)."""
    from runtime.lifecycle import start

    for c in containers:
        start(ctx.obj.root_arg, c)
        click.echo(c)


@click.command("restart")
@click.argument("containers", nargs=-1, required=True)
@click.option("-t", "--time", "timeout", default=10.0, type=float, show_default=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")
@click.pass_context
def restart_cmd(ctx, containers, timeout):
    """Stop, then start containers."""
    from runtime.lifecycle import restart

    for c in containers:
        restart(ctx.obj.root_arg, c, timeout)
        click.echo(c)


@click.command("kill")
@click.argument("containers", nargs=-1, required=True)
@click.option("-s", "--signal", "sig", default="KILL", show_default=True)
@click.pass_context
def kill_cmd(ctx, containers, sig):
    """Send a signal to running containers' main process."""
    from runtime.lifecycle import kill, parse_signal

    number = parse_signal(sig)
    for c in containers:
        kill(ctx.obj.root_arg, c, number)
        click.echo(c)


@click.command("wait")
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
def wait_cmd(ctx, containers):
    """Wait until containers exit; print each one's exit code."""
    from runtime.lifecycle import wait

    for c in containers:
        click.echo(wait(ctx.obj.root_arg, c))


@click.command("exec", context_settings={"allow_interspersed_args": False})
@click.argument("container")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("-i", "--interactive", is_flag=True)
@click.option("-t", "--tty", is_flag=True)
@click.option("-u", "--user", default=None)
@click.option("-w", "--workdir", default=None)
@click.option("-e", "--env", multiple=True)
@click.pass_context
def exec_cmd(ctx, container, command, interactive, tty, user, workdir, env):
    """Run COMMAND in a running container; exits with its code."""
    from kiln.cli import exec_and_exit  # shared with kiln exec's click-free path

    exec_and_exit(ctx.obj.root_arg, dict(ctx.params))


@click.command("pause")
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
def pause_cmd(ctx, containers):
    """Freeze every process of running containers."""
    from runtime.lifecycle import set_paused

    for c in containers:
        set_paused(ctx.obj.root_arg, c, True)
        click.echo(c)


@click.command("unpause")
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
def unpause_cmd(ctx, containers):
    """Thaw paused containers."""
    from runtime.lifecycle import set_paused

    for c in containers:
        set_paused(ctx.obj.root_arg, c, False)
        click.echo(c)


@click.command("top")
@click.argument("container")
@click.pass_context
def top_cmd(ctx, container):
    """List a running container's processes (host PIDs)."""
    from runtime.lifecycle import processes

    click.echo(f"{'UID':<8}{'PID':<10}{'PPID':<10}{'TIME':<10}CMD")
    for p in processes(ctx.obj.root_arg, container):
        click.echo(f"{p['UID']:<8}{p['PID']:<10}{p['PPID']:<10}{p['TIME']:<10}{p['CMD']}")


def _size(n: int | None) -> str:
    if n is None:
        return "unlimited"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.4g}{unit}" if unit != "B" else f"{n}B"
        n /= 1024
    return str(n)


@click.command("stats")
@click.argument("containers", nargs=-1)
@click.option("--no-stream", is_flag=True, help="One sample, then exit (else one a second "
              "until interrupted).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def stats_cmd(ctx, containers, no_stream, fmt):
    """CPU, memory, pids and block I/O of running containers, from their cgroups."""
    from runtime.containers import list_containers
    from runtime.lifecycle import stats

    def running() -> list[str]:
        return [c.id for c in list_containers(ctx.obj.root_arg) if c.status == "running"]

    interval = 0.5
    while True:
        rows = stats(ctx.obj.root_arg, list(containers) or running(), interval)
        if fmt == "json":
            click.echo(json.dumps(rows, indent=2))
        else:
            if not no_stream and os.isatty(1):
                click.echo("\x1b[2J\x1b[H", nl=False)  # docker's screen refresh
            click.echo(f"{'CONTAINER ID':<14}{'NAME':<22}{'CPU %':<9}{'MEM USAGE / LIMIT':<24}"
                       f"{'PIDS':<6}BLOCK I/O")
            for r in rows:
                mem = f"{_size(r['MemUsage'])} / {_size(r['MemLimit'])}"
                io = f"{_size(r['BlockIO']['Read'])} / {_size(r['BlockIO']['Write'])}"
                click.echo(f"{r['ID'][:12]:<14}{r['Name'][:20]:<22}{r['CPUPerc']:<9.2f}"
                           f"{mem:<24}{r['PIDs']:<6}{io}")
        if no_stream:
            return
        interval = 1.0


COMMANDS = {c.name: c for c in (run_cmd, ps_cmd, rm_cmd, logs_cmd, stop_cmd, kill_cmd,
                                wait_cmd, exec_cmd, pause_cmd, unpause_cmd, top_cmd,
                                stats_cmd, start_cmd, restart_cmd)}
