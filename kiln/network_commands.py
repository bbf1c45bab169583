"""kiln network create/ls/inspect/rm, and kiln port."""

from __future__ import annotations

import json
import time

import click


def _networks(ctx):
    from kiln.config import setting
    from runtime.network.networks import Networks

    return Networks(setting("network", "subnet"))


@click.group("network")
def network_cmd():
    """Manage bridge networks."""


@network_cmd.command("create")
@click.argument("name")
@click.option("--subnet", default=None, help="CIDR, e.g. 10.90.7.0/24 (default: a free /24).")
@click.option("--gateway", default=None, help="The bridge's address (default: the first).")
@click.option("--internal", is_flag=True, help="No outbound NAT.")
@click.option("-d", "--driver", default="bridge", type=click.Choice(["bridge"]))
@click.pass_context
def network_create(ctx, name, subnet, gateway, internal, driver):
    """Create a user-defined bridge network; its containers find each other by name."""
    from runtime.network import attach

    networks = _networks(ctx)
    with networks:
        network = networks.create(name, subnet, gateway, internal)
        try:
            attach.ensure_bridge(network)
            attach.sync_nat(networks)
        except BaseException:
            networks.remove(name)
            attach.remove_bridge(network)
            raise
    click.echo(network.id)


@network_cmd.command("ls")
@click.option("-q", "--quiet", is_flag=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def network_ls(ctx, quiet, fmt):
    """List networks."""
    networks = _networks(ctx)
    with networks:
        networks.collect()
        nets = networks.list()
    if fmt == "json":
        click.echo(json.dumps([vars(n) for n in nets], indent=2))
    elif quiet:
        for n in nets:
            click.echo(n.name)
    else:
        click.echo(f"{'NETWORK ID':<14}{'NAME':<24}{'DRIVER':<9}{'SUBNET':<20}GATEWAY")
        for n in nets:
            click.echo(f"{n.id[:12]:<14}{n.name:<24}{'bridge':<9}{n.subnet:<20}{n.gateway}")


@network_cmd.command("inspect")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def network_inspect(ctx, names):
    """Show networks and the containers on them, as JSON."""
    networks = _networks(ctx)
    out = []
    with networks:
        networks.collect()
        for name in names:
            n = networks.get(name)
            out.append({
                "Name": n.name, "Id": n.id, "Driver": "bridge", "Internal": n.internal,
                "Created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(n.created)),
                "IPAM": {"Config": [{"Subnet": n.subnet, "Gateway": n.gateway}]},
                "Options": {"com.docker.network.bridge.name": n.bridge},
                "Containers": {
                    lease.container: {"Name": lease.name,
                                      "IPv4Address": f"{lease.ip}/{n.prefix}"}
                    for lease in networks.leases(n.name)},
            })
    click.echo(json.dumps(out, indent=2))


@network_cmd.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def network_rm(ctx, names):
    """Remove networks that no container uses: their bridge and NAT rules go too."""
    from runtime.network import attach

    networks = _networks(ctx)
    with networks:
        for name in names:
            network = networks.remove(name)
            attach.remove_bridge(network)
            attach.sync_nat(networks)
            click.echo(name)


@click.command("port")
@click.argument("container")
@click.argument("private", required=False)
@click.pass_context
def port_cmd(ctx, container, private):
    """List a container's published ports (or the host side of PRIVATE, e.g. 80/tcp)."""
    from runtime.containers import find
    from runtime.network.ports import describe
    from store.errors import KilnError

    rec = find(ctx.obj.store, container)
    ports = rec.ports or []
    if private:
        number, _, proto = private.partition("/")
        ports = [p for p in ports if str(p[3]) == number and p[0] == (proto or "tcp")]
        if not ports:
            raise KilnError(f"no public port {private!r} published for {rec.name}")
        for p in ports:
            click.echo(f"{p[1] or '0.0.0.0'}:{p[2]}")
        return
    for p in ports:
        host, _, ctr = describe(p).partition("->")
        click.echo(f"{ctr} -> {host}")


COMMANDS = {"network": network_cmd, "port": port_cmd}
