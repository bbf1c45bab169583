"""kiln build."""

from __future__ import annotations

import os

import click

from kiln.registry_commands import make_options, registry_options, verify_options

# --pull's policies, as podman names them (true and false too: always and never)
PULL_POLICIES = {"always": "always", "true": "always", "missing": "missing",
                 "never": "never", "false": "never", "newer": "newer"}


class _BuildCommand(click.Command):
    """``--pull`` alone means always, as in podman (whose flag takes its value only after
    ``=``) and docker (where it is a switch): ``kiln build --pull .`` builds ``.``. A
    policy word after a space is taken too, as kiln always took it (``--pull never``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                out += args[i:]
                break
            if arg == "--pull":
                nxt = args[i + 1] if i + 1 < len(args) else None
                if nxt is not None and nxt.lower() in PULL_POLICIES:
                    out.append(f"--pull={nxt}")
                    i += 2
                    continue
                arg = "--pull=always"
            out.append(arg)
            i += 1
        return super().parse_args(ctx, out)


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
@click.option("--squash", is_flag=True, help="One layer for the whole image.")
@click.option("--layers/--no-layers", "layers", default=True, show_default=True,
              help="One layer per RUN/COPY/ADD (cached), or one for all of a stage's steps.")
@click.option("-q", "--quiet", is_flag=True,
              help="Print only the image ID (on stdout); errors still go to stderr.")
@click.option("--pull", "pull_policy", default="missing", show_default=True,
              metavar="[always|missing|never|newer]", callback=_pull_policy,
              help="Pull FROM and COPY --from images: always, those the store lacks, never, "
                   "or when the registry has another digest. --pull alone: always.")
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
    """Build an image from a Containerfile and a context directory.

    CONTEXT - reads the context from stdin: a tar archive (plain, gzip, bzip2 or xz), or a
    Containerfile alone (then the context is empty), as docker build - does."""
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
    if context == "-" and containerfile == "-":
        raise click.UsageError("stdin cannot be both the build context and the Containerfile "
                               "(-f - with CONTEXT -)")
    if context != "-" and not os.path.isdir(context):
        raise click.UsageError(f"build context {context} is not a directory")
    opts = BuildOptions(
        context=os.path.abspath(context), containerfile=containerfile, tags=list(tags),
        build_args=args, target=target, no_cache=no_cache, network=network,
        compression=compression,
        epoch=timestamp if timestamp is not None else source_date_epoch(),
        quiet=quiet, iidfile=iidfile,
        secrets=dict(_key_values(s, "--secret", ("id",)) for s in secrets),
        outputs=[_output_spec(o) for o in outputs], pull=pull_policy,
        squash=squash, layers=layers, pids_limit=setting("build", "pids_limit"))
    if containerfile == "-":
        opts.containerfile, opts.containerfile_text = None, _read_stdin_containerfile()
    store = ctx.obj.store
    key = None
    if sign_key:
        from kiln.sign_commands import load_signing_key

        key = load_signing_key(sign_key, sign_passphrase_file)
    verify = bool(verify_keys or signature_policy)
    if pull_policy != "never":
        def fetch(name: str) -> None:  # requests is imported only when a pull happens
            options = make_options(**reg)

            from registry_client.pull import pull
            from registry_client.trust import requirements_for

            full = str(parse_reference(name))
            reqs = requirements_for(full, verify_keys=verify_keys,
                                    policy_path=signature_policy) if verify else None
            pull(store, name, options, requirements=reqs)

        opts.fetch_image = fetch
    if pull_policy == "newer":
        def remote_digest(name: str) -> str | None:
            from registry_client.remote import RemoteRepository

            ref = parse_reference(name)
            repo = RemoteRepository.for_reference(ref, make_options(**reg))
            try:
                head = repo.head_manifest(ref.digest or ref.tag or "latest")
            finally:
                repo.transport.close()
            return head.digest if head is not None else None

        opts.remote_digest = remote_digest
    if verify:
        opts.check_base = _base_checker(store, verify_keys, signature_policy)
    if context == "-":
        # the context's work dir lives in the store's tmp/: held against a prune meanwhile
        with store.writing(), _StdinContext(store) as (root, text):
            opts.context, opts.context_cache = root, False
            if text is not None:
                opts.containerfile, opts.containerfile_text = None, text
            else:  # -f names a file of the archive, as for docker build -
                name = containerfile or next(
                    (n for n in ("Containerfile", "Dockerfile")
                     if os.path.isfile(os.path.join(root, n))), None)
                if name is None:
                    raise click.UsageError("the build context on stdin has no Containerfile "
                                           "or Dockerfile (name one with -f)")
                opts.containerfile = os.path.join(root, name)
                opts.containerfile_name = name
            desc = build(store, opts)
    else:
        desc = build(store, opts)
    if key is not None:
        from kiln.sign_commands import sign_local

        for tag in tags:
            sign_local(store, tag, key)
    if quiet:
        click.echo(store.image_for(desc).config_descriptor().digest)


def _read_stdin_containerfile() -> bytes:
    import sys

    from builder.parser import MAX_FILE_SIZE

    return sys.stdin.buffer.read(MAX_FILE_SIZE + 1)  # the parser refuses more


class _StdinContext:
    """CONTEXT ``-``: what stdin holds becomes the context, as for docker build -: a tar
    archive is extracted (tarfile's data filter: nothing outside the context, no devices,
    no setuid bits) into a work dir of the store; anything else is the Containerfile, and
    the context an empty dir. Yields (context dir, Containerfile text or None)."""

    def __init__(self, store):
        self.store, self.work = store, None

    def __enter__(self) -> tuple[str, bytes | None]:
        import sys

        stream = sys.stdin.buffer
        self.work = self.store.mkdtemp("stdin-context-")
        try:
            root = os.path.join(self.work, "context")
            os.mkdir(root, 0o755)
            head = _read_up_to(stream, 512)
            if not _is_tar(head):
                from builder.parser import MAX_FILE_SIZE

                return root, head + stream.read(MAX_FILE_SIZE + 1 - len(head))
            _extract_tar(_Prefixed(head, stream), root)
            return root, None
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        if self.work is not None:
            from store.fsutil import remove_tree

            remove_tree(self.work)
            self.work = None


def _read_up_to(stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _is_tar(head: bytes) -> bool:
    """A tar archive, plain or compressed as docker build - takes them (moby's
    archive.DetectCompression: gzip, bzip2, xz; and the ustar magic)."""
    return (head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"))
            or head[257:262] == b"ustar")


class _Prefixed:
    """``head`` then the rest of ``stream``, for tarfile's stream mode."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out = self.head if n < 0 else self.head[:n]
            self.head = self.head[len(out):]
            return out
        return self.stream.read(n)


def _extract_tar(fileobj, root: str) -> None:
    import tarfile

    from store.errors import KilnError

    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            tar.extractall(root, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise KilnError(f"the build context on stdin: cannot extract it as a tar archive: "
                        f"{e}") from None


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
    return values["type"], values


# --output types: kiln's and buildx's names for them (docker: a docker-archive)
_OUTPUT_TYPES = {"oci": "oci", "oci-archive": "oci-archive", "docker-archive": "docker-archive",
                 "docker": "docker-archive"}


def _output_spec(text: str) -> dict[str, str]:
    from store.reference import parse_reference

    values = _key_values(text, "--output", ("type", "dest"))[1]
    kind = _OUTPUT_TYPES.get(values["type"])
    if kind is None:
        raise click.UsageError(f"--output {text!r}: type must be oci, oci-archive or "
                               "docker-archive")
    if "name" in values:
        parse_reference(values["name"])
    return {**values, "type": kind}


COMMANDS = {"build": build_cmd}
