"""kiln build."""

from __future__ import annotations

import os

import click

from kiln.registry_commands import make_options, registry_options, verify_options


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
@click.option("--secret", "secrets", multiple=True,
              help="id=ID,src=FILE or id=ID,env=VAR: for RUN --mount=type=secret; never stored.")
@click.option("--output", "-o", "outputs", multiple=True,
              help="type=oci,dest=DIR|FILE.tar or type=docker-archive,dest=FILE")
@click.option("--squash", is_flag=True, help="One layer for the whole image.")
@click.option("--layers/--no-layers", "layers", default=True, show_default=True,
              help="One layer per RUN/COPY/ADD (cached), or one for all of a stage's steps.")
@click.option("-q", "--quiet", is_flag=True)
@click.option("--pull", "pull_policy", type=click.Choice(["missing", "never"]), default="missing",
              show_default=True, help="Pull FROM and COPY --from images the store lacks.")
@click.option("--sign-key", type=click.Path(), default=None,
              help="Sign the built image (for each -t repository) with this private key.")
@click.option("--sign-passphrase-file", type=click.Path(), default=None)
@verify_options
@registry_options
@click.pass_context
def build_cmd(ctx, context, tags, containerfile, build_args, target, no_cache, network,
              compression, timestamp, iidfile, secrets, outputs, squash, layers, quiet,
              pull_policy, sign_key, sign_passphrase_file, verify_keys, signature_policy,
              **reg):
    """Build an image from a Containerfile and a context directory."""
    from builder.engine import BuildOptions, build
    from kiln.config import setting
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
    opts = BuildOptions(
        context=os.path.abspath(context), containerfile=containerfile, tags=list(tags),
        build_args=args, target=target, no_cache=no_cache, network=network,
        compression=compression,
        epoch=timestamp if timestamp is not None else source_date_epoch(),
        quiet=quiet, iidfile=iidfile,
        secrets=dict(_key_values(s, "--secret", ("id",)) for s in secrets),
        outputs=[_key_values(o, "--output", ("type", "dest"))[1] for o in outputs],
        squash=squash, layers=layers, pids_limit=setting("build", "pids_limit"))
    key = None
    if sign_key:
        from kiln.sign_commands import load_signing_key

        key = load_signing_key(sign_key, sign_passphrase_file)
    verify = bool(verify_keys or signature_policy)
    if pull_policy == "missing":
        def fetch(name: str) -> None:  # requests is imported only when a pull happens
            options = make_options(**reg)

            from registry_client.pull import pull
            from registry_client.trust import requirements_for
            from store.reference import parse_reference

            full = str(parse_reference(name))
            reqs = requirements_for(full, verify_keys=verify_keys,
                                    policy_path=signature_policy) if verify else None
            pull(ctx.obj.store, name, options, requirements=reqs)

        opts.fetch_image = fetch
    if verify:
        opts.check_base = _base_checker(ctx.obj.store, verify_keys, signature_policy)
    desc = build(ctx.obj.store, opts)
    if key is not None:
        from kiln.sign_commands import sign_local

        for tag in tags:
            sign_local(ctx.obj.store, tag, key)
    if quiet:
        click.echo(ctx.obj.store.image_for(desc).config_descriptor().digest)


def _base_checker(store, verify_keys, policy):
    """Base images already in the store are checked against their stored signatures, each
    name once per image it names: every COPY --from and RUN --mount from= asks again."""
    checked: set[tuple[str, str]] = set()

    def check_base(name: str) -> None:
        from registry_client.trust import check_stored, requirements_for
        from store.reference import parse_reference

        full = str(parse_reference(name))
        reqs = requirements_for(full, verify_keys=verify_keys, policy_path=policy)
        if reqs:
            desc = store.resolve(name)
            if (full, desc.digest) not in checked:
                check_stored(store, full, desc, reqs)
                checked.add((full, desc.digest))

    return check_base


def _key_values(text: str, flag: str, required: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    values: dict[str, str] = {}
    for part in text.split(","):
        k, eq, v = part.partition("=")
        if not eq or not k:
            raise click.UsageError(f"{flag} {text!r}: want key=value pairs separated by commas")
        values[k.strip()] = v
    for k in required:
        if k not in values:
            raise click.UsageError(f"{flag} {text!r}: {k}= is missing")
    if flag == "--secret":
        if ("src" in values) == ("env" in values):
            raise click.UsageError(f"--secret {text!r}: give exactly one of src= or env=")
        return values["id"], {k: values[k] for k in ("src", "env") if k in values}
    if values["type"] not in ("oci", "docker-archive"):
        raise click.UsageError(f"--output {text!r}: type must be oci or docker-archive")
    return values["type"], values


COMMANDS = {"build": build_cmd}
