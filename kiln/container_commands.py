"""Container commands: run, ps, rm."""

from __future__ import annotations

import json

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
@click.option("--network", "--net", default="none", show_default=True,
              type=click.Choice(["none", "host"]))
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
            stop_timeout, verify_keys, signature_policy):
    """Run COMMAND in a new container from IMAGE; exits with the container's exit code."""
    from kiln.cli import run_and_exit  # shared with kiln run's click-free path

    run_and_exit(ctx.obj.store, dict(ctx.params))


def _status(rec) -> str:
    if rec.status == "running":
        return "Up"
    if rec.exit_code is not None:
        return f"Exited ({rec.exit_code})"
    return rec.status.capitalize()


@click.command("ps")
@click.option("-a", "--all", "show_all", is_flag=True, help="Also exited containers.")
@click.option("-q", "--quiet", is_flag=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def ps_cmd(ctx, show_all, quiet, fmt):
    """List containers (running ones unless -a)."""
    from runtime.containers import list_containers

    rows = [c for c in list_containers(ctx.obj.store) if show_all or c.status == "running"]
    if fmt == "json":
        click.echo(json.dumps([c.__dict__ for c in rows], indent=2))
        return
    if quiet:
        for c in rows:
            click.echo(c.id[:12])
        return
    click.echo(f"{'CONTAINER ID':<14}{'IMAGE':<36}{'COMMAND':<24}{'STATUS':<14}NAMES")
    for c in rows:
        cmd = " ".join(c.command)[:22]
        click.echo(f"{c.id[:12]:<14}{c.image_name[:34]:<36}{cmd:<24}{_status(c):<14}{c.name}")


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


COMMANDS = {c.name: c for c in (run_cmd, ps_cmd, rm_cmd)}
