"""kiln key generate / sign / verify: cosign-compatible image signatures."""

from __future__ import annotations

import os
import sys

import click

from kiln.registry_commands import make_options, registry_options


def read_password(password_file: str | None, *, confirm: bool = False) -> bytes:
    """--password-file, else KILN_PASSWORD (or COSIGN_PASSWORD), else a prompt."""
    if password_file:
        try:
            with open(password_file, "rb") as f:
                return f.read().rstrip(b"\r\n")
        except OSError as e:
            from store.errors import KilnError

            raise KilnError(f"cannot read the password file {password_file}: {e.strerror}"
                            ) from None
    for var in ("KILN_PASSWORD", "COSIGN_PASSWORD"):
        if var in os.environ:
            return os.environ[var].encode()
    if not sys.stdin.isatty():
        from store.errors import KilnError

        raise KilnError("a key password is needed: --password-file, KILN_PASSWORD, or a "
                        "terminal to prompt on")
    return click.prompt("Password for the private key", hide_input=True,
                        confirmation_prompt=confirm, default="", show_default=False).encode()


def load_signing_key(path: str, password_file: str | None):
    from store.errors import KilnError
    from store.signing import load_private_key

    try:
        with open(path, "rb") as f:
            pem = f.read(1 << 20)
    except OSError as e:
        raise KilnError(f"cannot read the private key {path}: {e.strerror}") from None
    return load_private_key(pem, read_password(password_file), where=path)


def sign_digest(key, identity: str, digest: str):
    """A StoredSignature over the simple-signing payload for (identity, digest)."""
    from store.signatures import StoredSignature
    from store.signing import make_payload, sign_payload

    payload = make_payload(identity, digest)
    return StoredSignature(payload, sign_payload(key, payload), {})


@click.group("key")
def key_group():
    """Key pairs for signing images."""


@key_group.command("generate")
@click.option("-o", "--output-prefix", "prefix", default="cosign", show_default=True,
              help="Write PREFIX.key (encrypted, cosign's format) and PREFIX.pub.")
@click.option("--password-file", type=click.Path(), default=None)
def key_generate(prefix, password_file):
    """Generate an ECDSA P-256 key pair (cosign's encrypted private key format)."""
    from store.errors import KilnError
    from store.fsutil import atomic_write
    from store.signing import generate_key_pair

    key_path, pub_path = f"{prefix}.key", f"{prefix}.pub"
    for path in (key_path, pub_path):
        if os.path.exists(path):
            raise KilnError(f"{path} exists; refusing to overwrite a key")
    private_pem, public_pem = generate_key_pair(read_password(password_file, confirm=True))
    atomic_write(key_path, private_pem, mode=0o600)
    atomic_write(pub_path, public_pem, mode=0o644)
    click.echo(f"Private key written to {key_path}")
    click.echo(f"Public key written to {pub_path}")


@click.command("sign")
@click.argument("image")
@click.option("--key", "key_path", required=True, type=click.Path(),
              help="Private key (cosign format).")
@click.option("--password-file", type=click.Path(), default=None)
@registry_options
@click.pass_context
def sign_cmd(ctx, image, key_path, password_file, **reg):
    """Sign an image in the store, or on a registry (docker://REF)."""
    key = load_signing_key(key_path, password_file)
    if image.startswith("docker://"):
        from registry_client.remote import RemoteRepository
        from registry_client.signatures import push_signatures
        from store.reference import parse_reference

        ref = parse_reference(image[len("docker://"):])
        repo = RemoteRepository.for_reference(ref, make_options(**reg))
        try:
            digest = ref.digest or repo.get_manifest(ref.tag or "latest").descriptor.digest
            push_signatures(repo, digest, [sign_digest(key, ref.name, digest)])
        finally:
            repo.transport.close()
        click.echo(f"Signed {ref.name}@{digest}")
        return
    store = ctx.obj.store
    digest, identity = sign_local(store, image, key)
    click.echo(f"Signed {identity}@{digest}")


def sign_local(store, name: str, key) -> tuple[str, str]:
    from store.errors import KilnError
    from store.reference import parse_reference
    from store.signatures import LocalSignatures

    desc = store.resolve(name)
    try:
        identity = parse_reference(name).name
    except KilnError:
        names = store.names_of(desc.digest)
        if not names:
            raise KilnError(f"{name} has no repository name to sign for; tag it first"
                            ) from None
        identity = parse_reference(names[0]).name
    LocalSignatures(store).add(identity, desc.digest, [sign_digest(key, identity, desc.digest)])
    return desc.digest, identity


@click.command("verify")
@click.argument("image")
@click.option("--key", "keys", multiple=True, type=click.Path(),
              help="Public key; a signature by any of them must hold (repeatable).")
@click.option("--signature-policy", "policy", type=click.Path(), default=None,
              help="A containers policy.json to check against instead of (or besides) --key.")
@registry_options
@click.pass_context
def verify_cmd(ctx, image, keys, policy, **reg):
    """Check an image's signatures, and that every blob it names is present and intact."""
    from registry_client.trust import VerificationError, requirements_for, verify_local

    if not keys and not policy:
        raise click.UsageError("give --key PUB (or --signature-policy FILE)")
    if image.startswith("docker://"):
        from registry_client.trust import verify_remote

        ref_text = image[len("docker://"):]
        reqs = requirements_for(_full(ref_text), verify_keys=keys, policy_path=policy)
        lines = verify_remote(ref_text, reqs, make_options(**reg))
    else:
        reqs = requirements_for(_full(image), verify_keys=keys, policy_path=policy)
        if reqs is None:
            raise VerificationError("the policy asks for nothing")
        lines = verify_local(ctx.obj.store, image, reqs)
    for line in lines:
        click.echo(line)


def _full(name: str) -> str:
    from store.errors import KilnError
    from store.reference import parse_reference

    try:
        return str(parse_reference(name))
    except KilnError:
        return name


COMMANDS = {"key": key_group, "sign": sign_cmd, "verify": verify_cmd}
