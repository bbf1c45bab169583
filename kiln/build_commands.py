"""kiln build."""

from __future__ import annotations

import click

from kiln.build_run import PULL_POLICIES, spell_pull
from kiln.registry_commands import registry_options, verify_options


class _BuildCommand(click.Command):
    """``--pull`` alone means always, ``--pull never`` never: see spell_pull."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, spell_pull(args))


def _pull_policy(ctx, param, value: str) -> str:
    policy = PULL_POLICIES.get(value.lower())
    if policy is None:
        raise click.BadParameter(f"{value!r}: want always, missing, never or newer "
                                 "(true and false mean always and never)")
    return policy


@click.command("build", cls=_BuildCommand)
@click.argument("context", default=".", type=click.Path())
@click.option("-t", "--tag", "tags", multiple=True, help="Name the image (repeatable).")
@click.option("-f", "--file", "containerfile", default=None, type=click.Path(),
              help="Containerfile (default: CONTEXT/Containerfile or CONTEXT/Dockerfile); "
                   "- reads it from stdin.")
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
@click.option("--secret", "secrets", multiple=True,
              help="id=ID,src=FILE or id=ID,env=VAR: for RUN --mount=type=secret; never stored.")
@click.option("--output", "-o", "outputs", multiple=True,
              help="type=oci,dest=DIR|FILE.tar, type=oci-archive,dest=FILE or "
                   "type=docker-archive,dest=FILE (name=NAME: the name inside; default the "
                   "first -t)")
@click.option("--isolation", default=None, type=click.Choice(["oci", "chroot"]),
              help="oci (default): each step in namespaces on an overlay; chroot: no "
                   "namespaces or mounts, for a container without CAP_SYS_ADMIN (a CI pod). "
                   "Default: $KILN_ISOLATION, else oci.")
@click.option("--squash", is_flag=True, help="One layer for the whole image.")
@click.option("--layers/--no-layers", "layers", default=True, show_default=True,
              help="One layer per RUN/COPY/ADD (cached), or one for all of a stage's steps.")
@click.option("-q", "--quiet", is_flag=True,
              help="Print only the image ID (on stdout); errors still go to stderr.")
@click.option("--pull", "pull_policy", default="missing", show_default=True,
              metavar="[always|missing|never|newer]", callback=_pull_policy,
              help="Pull FROM and COPY --from images: always, those the store lacks, never, "
                   "or when the registry has another digest. --pull alone: always.")
@click.option("--cache-from", "cache_from", multiple=True, metavar="SPEC",
              help="Take steps from a build cache: type=registry,ref=REF (or REF alone) or "
                   "type=local,src=DIR[,tag=TAG] (repeatable).")
@click.option("--cache-to", "cache_to", multiple=True, metavar="SPEC",
              help="Write the build cache: type=registry,ref=REF[,mode=min|max] or "
                   "type=local,dest=DIR[,tag=TAG][,mode=...]; ignore-error=true to only warn.")
@click.option("--sign-key", type=click.Path(), default=None,
              help="Sign the built image (for each -t repository) with this private key.")
@click.option("--sign-passphrase-file", type=click.Path(), default=None)
@verify_options
@registry_options
@click.pass_context
def build_cmd(ctx, **params):
    """Build an image from a Containerfile and a context directory.

    CONTEXT - reads the context from stdin: a tar archive (plain, gzip, bzip2 or xz), or a
    Containerfile alone (then the context is empty), as docker build - does."""
    from kiln.build_run import UsageError, build_image

    try:
        build_image(ctx.obj.store, params)
    except UsageError as e:
        raise click.UsageError(str(e)) from None


COMMANDS = {"build": build_cmd}
