"""kiln build."""

from __future__ import annotations

import os

import click


@click.command("build")
@click.argument("context", default=".", type=click.Path())
@click.option("-t", "--tag", "tags", multiple=True, help="Name the image (repeatable).")
@click.option("-f", "--file", "containerfile", default=None, type=click.Path(),
              help="Containerfile (default: CONTEXT/Containerfile or CONTEXT/Dockerfile).")
@click.option("--build-arg", "build_args", multiple=True, help="K=V, or K from the environment.")
@click.option("--target", default=None, help="Build only up to this stage.")
@click.option("--no-cache", is_flag=True, help="Run every step again.")
@click.option("--network", default="host", show_default=True,
              type=click.Choice(["host", "none"]), help="Network of RUN steps.")
@click.option("--compression-format", "compression", default="zstd", show_default=True,
              type=click.Choice(["zstd", "gzip"]))
@click.option("--timestamp", default=None, type=int,
              help="Created times and file mtimes (default: $SOURCE_DATE_EPOCH).")
@click.option("--iidfile", default=None, type=click.Path(), help="Write the image ID here.")
@click.option("-q", "--quiet", is_flag=True)
@click.pass_context
def build_cmd(ctx, context, tags, containerfile, build_args, target, no_cache, network,
              compression, timestamp, iidfile, quiet):
    """Build an image from a Containerfile and a context directory."""
    from builder.engine import BuildOptions, build
    from store.importer import source_date_epoch
    from store.reference import parse_reference

    args = {}
    for a in build_args:
        k, eq, v = a.partition("=")
        if eq:
            args[k] = v
        elif k in os.environ:
            args[k] = os.environ[k]
    for t in tags:
        parse_reference(t)  # a bad name fails before any step runs
    if not os.path.isdir(context):
        raise click.UsageError(f"build context {context} is not a directory")
    opts = BuildOptions(context=os.path.abspath(context), containerfile=containerfile,
                        tags=list(tags), build_args=args, target=target, no_cache=no_cache,
                        network=network, compression=compression,
                        epoch=timestamp if timestamp is not None else source_date_epoch(),
                        quiet=quiet, iidfile=iidfile)
    desc = build(ctx.obj.store, opts)
    if quiet:
        click.echo(ctx.obj.store.image_for(desc).config_descriptor().digest)


def register(group: click.Group) -> None:
    group.add_command(build_cmd)
