"""kiln pull / push / copy / login / logout."""

from __future__ import annotations

import sys

import click

COMPRESSION = click.Choice(["zstd", "gzip"])


def _store(ctx: click.Context):
    return ctx.obj.store


def _tls(value: str | None) -> bool | None:
    if value is None:
        return None
    v = value.lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise click.BadParameter(f"{value!r} is not true or false", param_hint="--tls-verify")


def registry_options(f):
    """The flags every registry command shares (podman's names)."""
    opts = [
        click.option("--tls-verify", "tls_verify", metavar="BOOL", default=None,
                     help="Require HTTPS and verify certificates (default true; plain http "
                          "is tried for loopback registries and insecure ones in "
                          "registries.conf)."),
        click.option("--cert-dir", type=click.Path(), default=None,
                     help="CA certificates (*.crt) and client certificate (*.cert/*.key)."),
        click.option("--creds", default=None, metavar="USER[:PASS]",
                     help="Credentials for the registry."),
        click.option("--authfile", type=click.Path(), default=None,
                     help="Auth file (default: REGISTRY_AUTH_FILE or "
                          "${XDG_RUNTIME_DIR}/containers/auth.json)."),
        click.option("--retry", type=click.IntRange(0, 100), default=None,
                     help="Retries per request on network errors, 5xx and 429 (default 5)."),
        click.option("--jobs", type=click.IntRange(1, 32), default=3, show_default=True,
                     help="Layers transferred at once."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def verify_options(f):
    f = click.option("--signature-policy", type=click.Path(), default=None,
                     help="Check signatures against this containers policy.json.")(f)
    return click.option("--verify-key", "verify_keys", multiple=True, type=click.Path(),
                        help="Refuse the image unless a signature by this public key holds "
                             "(checked before any layer is fetched; repeatable).")(f)


def make_options(tls_verify=None, cert_dir=None, creds=None, authfile=None, retry=None,
                 jobs=3):
    from registry_client.transport import RegistryOptions

    if creds is not None:
        from registry_client.credentials import creds_need_password

        if creds_need_password(creds):
            creds = f"{creds}:{click.prompt('Password', hide_input=True)}"
    opts = RegistryOptions(tls_verify=_tls(tls_verify), cert_dir=cert_dir, creds=creds,
                           authfile=authfile, concurrency=jobs)
    if retry is not None:
        opts.retries = retry
    return opts


def _progress(quiet: bool):
    from kiln.progress import blob_progress

    return blob_progress(quiet)


@click.command("pull")
@click.argument("image")
@click.option("--platform", default=None, metavar="OS/ARCH[/VARIANT]",
              help="Pick this platform from a multi-platform image (default: the host's).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@verify_options
@registry_options
@click.pass_context
def pull_cmd(ctx, image, platform, quiet, verify_keys, signature_policy, **reg):
    """Pull an image from a registry into the store (ready to run)."""
    from registry_client.pull import parse_platform, pull
    from registry_client.trust import requirements_for
    from store.reference import parse_reference

    ref = parse_reference(image.removeprefix("docker://"))
    reqs = requirements_for(str(ref), verify_keys=verify_keys, policy_path=signature_policy)
    desc = pull(_store(ctx), ref, make_options(**reg), platform=parse_platform(platform),
                progress=_progress(quiet), requirements=reqs)
    if not quiet:
        click.echo(f"Pulled {ref}", err=True)
    click.echo(desc.digest)


@click.command("push")
@click.argument("image")
@click.argument("destination", required=False)
@click.option("--compression-format", "compression", type=COMPRESSION, default=None,
              help="Compression of the layers sent (re-compressed once when stored otherwise).")
@click.option("--digestfile", type=click.Path(), default=None,
              help="Write the pushed manifest's digest to this file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--sign-key", type=click.Path(), default=None,
              help="Sign the pushed manifest with this private key (cosign format).")
@click.option("--sign-passphrase-file", type=click.Path(), default=None,
              help="The key's password (else KILN_PASSWORD, else a prompt).")
@registry_options
@click.pass_context
def push_cmd(ctx, image, destination, compression, digestfile, quiet, sign_key,
             sign_passphrase_file, **reg):
    """Push an image from the store to a registry (DESTINATION: REF or TRANSPORT:...)."""
    from registry_client.copy import TRANSPORTS

    options = make_options(**reg)
    if destination and destination.partition(":")[0] in set(TRANSPORTS) - {"docker"}:
        from registry_client.copy import copy

        desc = copy(_store(ctx), f"kiln:{image}", destination, dst_options=options,
                    compression=compression, progress=_progress(quiet), digestfile=digestfile)
    else:
        from registry_client.push import push

        key = None
        if sign_key:  # the password is asked before anything moves
            from kiln.sign_commands import load_signing_key

            key = load_signing_key(sign_key, sign_passphrase_file)
        dest = (destination or image).removeprefix("docker://")
        desc = push(_store(ctx), image, dest, options, compression=compression,
                    digestfile=digestfile, progress=_progress(quiet))
        if key is not None:
            from kiln.sign_commands import sign_digest
            from registry_client.remote import RemoteRepository
            from registry_client.signatures import push_signatures
            from store.reference import parse_reference

            ref = parse_reference(dest)
            repo = RemoteRepository.for_reference(ref, options)
            try:
                push_signatures(repo, desc.digest, [sign_digest(key, ref.name, desc.digest)])
            finally:
                repo.transport.close()
    click.echo(desc.digest)


@click.command("copy")
@click.argument("source")
@click.argument("destination")
@click.option("--src-tls-verify", default=None, metavar="BOOL")
@click.option("--dest-tls-verify", default=None, metavar="BOOL")
@click.option("--src-creds", default=None, metavar="USER[:PASS]")
@click.option("--dest-creds", default=None, metavar="USER[:PASS]")
@click.option("--src-cert-dir", type=click.Path(), default=None)
@click.option("--dest-cert-dir", type=click.Path(), default=None)
@click.option("--authfile", type=click.Path(), default=None)
@click.option("--compression-format", "compression", type=COMPRESSION, default=None)
@click.option("--platform", default=None, metavar="OS/ARCH[/VARIANT]")
@click.option("--digestfile", type=click.Path(), default=None)
@click.option("--retry", type=click.IntRange(0, 100), default=None)
@click.option("--jobs", type=click.IntRange(1, 32), default=3, show_default=True)
@click.option("-q", "--quiet", is_flag=True)
@click.pass_context
def copy_cmd(ctx, source, destination, src_tls_verify, dest_tls_verify, src_creds, dest_creds,
             src_cert_dir, dest_cert_dir, authfile, compression, platform, digestfile, retry,
             jobs, quiet):
    """Copy an image between docker://, oci:, oci-archive:, docker-archive: and kiln:."""
    from registry_client.copy import copy
    from registry_client.pull import parse_platform

    src = make_options(src_tls_verify, src_cert_dir, src_creds, authfile, retry, jobs)
    dst = make_options(dest_tls_verify, dest_cert_dir, dest_creds, authfile, retry, jobs)
    desc = copy(_store(ctx), source, destination, src_options=src, dst_options=dst,
                compression=compression, platform=parse_platform(platform),
                progress=_progress(quiet), digestfile=digestfile)
    click.echo(desc.digest)


@click.command("login")
@click.argument("registry")
@click.option("-u", "--username", default=None)
@click.option("-p", "--password", default=None,
              help="Password on the command line (visible to other users: prefer "
                   "--password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--authfile", type=click.Path(), default=None)
@click.option("--tls-verify", default=None, metavar="BOOL")
@click.option("--cert-dir", type=click.Path(), default=None)
@click.option("--get-login", is_flag=True, help="Print the user name logged in to REGISTRY.")
def login_cmd(registry, username, password, password_stdin, authfile, tls_verify, cert_dir,
              get_login):
    """Log in to a registry; credentials go to the auth file as podman writes it."""
    from registry_client.credentials import Credentials, find_credentials, store_credentials
    from registry_client.login import check_login, registry_host

    host = registry_host(registry)
    if get_login:
        found = find_credentials(host, authfile=authfile)
        if found is None:
            from store.errors import KilnError

            raise KilnError(f"not logged in to {host}")
        click.echo(found.username)
        return
    if password is not None and password_stdin:
        raise click.UsageError("--password and --password-stdin cannot be used together")
    if username is None:
        if password_stdin:
            raise click.UsageError("--password-stdin needs --username")
        username = click.prompt("Username")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif password is None:
        password = click.prompt("Password", hide_input=True)
    if not username or not password:
        raise click.UsageError("a user name and a password are needed")
    creds = Credentials(username, password)
    check_login(host, creds, make_options(tls_verify, cert_dir, None, authfile))
    store_credentials(host, creds, authfile=authfile)
    click.echo("Login Succeeded!")


@click.command("logout")
@click.argument("registry", required=False)
@click.option("-a", "--all", "everything", is_flag=True, help="Remove every stored login.")
@click.option("--authfile", type=click.Path(), default=None)
def logout_cmd(registry, everything, authfile):
    """Remove stored credentials for a registry (or all of them)."""
    from registry_client.credentials import remove_all_credentials, remove_credentials
    from registry_client.login import registry_host

    if everything:
        if registry:
            raise click.UsageError("give a registry or --all, not both")
        remove_all_credentials(authfile=authfile)
        click.echo("Removed login credentials for all registries")
        return
    if not registry:
        raise click.UsageError("name a registry (or --all)")
    host = registry_host(registry)
    if not remove_credentials(host, authfile=authfile):
        from store.errors import KilnError

        raise KilnError(f"not logged in to {host}")
    click.echo(f"Removed login credentials for {host}")


COMMANDS = {c.name: c for c in (pull_cmd, push_cmd, copy_cmd, login_cmd, logout_cmd)}
