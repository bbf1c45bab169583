"""kiln build's body, without click: the click command (build_commands) and the fast path
of kiln.cli (a no-op rebuild is start-up more than work) both call ``build_image``.

``params`` holds the click command's parameters by name, as click passes them."""

from __future__ import annotations

import os
import sys

from store.errors import KilnError

# --pull's policies, as podman names them (true and false too: always and never)
PULL_POLICIES = {"always": "always", "true": "always", "missing": "missing",
                 "never": "never", "false": "never", "newer": "newer"}
# the registry flags (kiln.registry_commands.registry_options) as click passes them
REGISTRY_PARAMS = ("tls_verify", "cert_dir", "creds", "authfile", "retry", "jobs")


def spell_pull(args: list[str]) -> list[str]:
    """``--pull`` alone means always, as in podman (whose flag takes its value only after
    ``=``) and docker (where it is a switch): ``kiln build --pull .`` builds ``.``. A
    policy word after a space is taken too, as kiln always took it (``--pull never``).
    Both become ``--pull=POLICY``."""
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
    return out


class UsageError(KilnError):
    """A command line that cannot be built from; the click command reports it as click's
    UsageError, the fast path the same way."""


def build_image(store, params: dict) -> None:
    """``store``: a Store, or its root (None: the default); a no-op that the memo can
    answer with the store's index unchanged never loads the store's model."""
    from runtime.containers import StoreHandle
    from store.reference import parse_reference

    p = params
    context, containerfile = p["context"], p["containerfile"]
    args = {}
    for a in p["build_args"]:
        k, eq, v = a.partition("=")
        if eq:
            args[k] = v
        elif k in os.environ:
            args[k] = os.environ[k]
    for t in p["tags"]:
        parse_reference(t)  # a bad name fails before any step runs
    if context == "-" and containerfile == "-":
        raise UsageError("stdin cannot be both the build context and the Containerfile "
                         "(-f - with CONTEXT -)")
    if context != "-" and not os.path.isdir(context):
        raise UsageError(f"build context {context} is not a directory")
    isolation = p.get("isolation") or os.environ.get("KILN_ISOLATION") or "oci"
    if isolation not in ("oci", "chroot"):
        raise UsageError(f"invalid --isolation {isolation!r} (oci or chroot; "
                         "KILN_ISOLATION as well)")
    os.environ["KILN_ISOLATION"] = isolation  # the workspace and RUN steps look here
    cache_to = [_cache_spec("--cache-to", t) for t in p.get("cache_to") or ()]
    cache_from = [_cache_spec("--cache-from", t) for t in p.get("cache_from") or ()]
    import time

    from builder import memo

    started = time.monotonic()
    handle = StoreHandle(store)
    memo_key = memo.key(p, handle)
    if memo_key is not None:  # the same build made nothing new last time: its image again
        image_id = None
        if handle.exists():
            from runtime.containers import SharedStoreLock

            with SharedStoreLock(handle.root):
                image_id = memo.replay_quick(handle, p, memo_key, started)
        if image_id is None:
            with handle.store.writing():
                image_id = memo.replay(handle.store, p, memo_key, started)
        if image_id is not None:
            if p["quiet"]:
                sys.stdout.write(image_id + "\n")
            return
    store = handle.store
    from builder.engine import BuildOptions
    from kiln.config import setting
    from store.importer import source_date_epoch

    opts = BuildOptions(
        context=os.path.abspath(context), containerfile=containerfile, tags=list(p["tags"]),
        build_args=args, target=p["target"], no_cache=p["no_cache"], network=p["network"],
        compression=p["compression"],
        epoch=p["timestamp"] if p["timestamp"] is not None else source_date_epoch(),
        quiet=p["quiet"], iidfile=p["iidfile"],
        secrets=dict(_key_values(s, "--secret", ("id",)) for s in p["secrets"]),
        outputs=[_output_spec(o) for o in p["outputs"]], pull=p["pull_policy"],
        squash=p["squash"], layers=p["layers"], pids_limit=setting("build", "pids_limit"),
        memo_key=memo_key)
    if containerfile == "-":
        opts.containerfile, opts.containerfile_text = None, _read_stdin_containerfile()
    key = None
    if p["sign_key"]:
        from kiln.sign_commands import load_signing_key

        key = load_signing_key(p["sign_key"], p["sign_passphrase_file"])
    verify_keys, policy = p["verify_keys"], p["signature_policy"]
    verify = bool(verify_keys or policy)
    reg = {k: p[k] for k in REGISTRY_PARAMS}
    if p["pull_policy"] != "never":
        def fetch(name: str) -> None:  # click and requests only when a pull happens
            from kiln.registry_commands import make_options
            from registry_client.pull import pull
            from registry_client.trust import requirements_for

            full = str(parse_reference(name))
            reqs = requirements_for(full, verify_keys=verify_keys,
                                    policy_path=policy) if verify else None
            pull(store, name, make_options(**reg), requirements=reqs)

        opts.fetch_image = fetch
    if p["pull_policy"] == "newer":
        def remote_digest(name: str) -> str | None:
            from kiln.registry_commands import make_options
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
        opts.check_base = _base_checker(store, verify_keys, policy)
    if sum(o["dest"] == "-" for o in opts.outputs) > 1:
        raise UsageError("only one --output can go to stdout (dest=-)")
    archive_out = None
    if any(o["dest"] == "-" for o in opts.outputs):
        archive_out = _stdout_for_archive()
        opts.output_stream = archive_out
    imported = None
    if cache_from:
        from kiln.registry_commands import make_options
        from registry_client.build_cache import Imported

        imported = Imported(store)
        for spec in cache_from:
            imported.add(spec, make_options(**reg))
        opts.cache_source = imported.source
    opts.inline_cache = any(spec.kind == "inline" for spec in cache_to)
    exported = [spec for spec in cache_to if spec.kind != "inline"]
    if exported:
        opts.cache_export = _cache_exporter(store, exported, reg, p["quiet"])
    try:
        desc = _build_in_context(store, opts, context, containerfile)
    finally:
        if imported is not None:
            imported.close()
        if archive_out is not None:
            archive_out.close()
    if key is not None:
        from kiln.sign_commands import sign_local

        for tag in p["tags"]:
            sign_local(store, tag, key)
    if p["quiet"]:
        sys.stdout.write(store.image_for(desc).config_descriptor().digest + "\n")


def _stdout_for_archive():
    """--output dest=-: the archive gets kiln's stdout to itself; what the build prints
    there (RUN output, -q's ID) goes to stderr from now on, as BuildKit's progress does."""
    from store.transfer import stdout_stream

    stdout_stream("the build's output")  # refuses a terminal
    archive = os.fdopen(os.dup(1), "wb")
    sys.stdout.flush()
    os.dup2(2, 1)
    return archive


def _cache_spec(flag: str, given: str):
    from registry_client.build_cache import parse_cache_spec

    text = given if "=" in given.split(",", 1)[0] else f"type=registry,ref={given}"
    return parse_cache_spec(flag, given, _key_values(text, flag, ("type",))[1])


def _cache_exporter(store, specs, reg: dict, quiet: bool):
    def export(target_chains: list[list[str]], all_chains: list[list[str]],
               mounts: list[str]) -> None:
        from kiln.registry_commands import make_options
        from registry_client.build_cache import export_cache
        from store.errors import KilnError

        for spec in specs:
            try:
                desc, image = export_cache(store, spec, target_chains, all_chains,
                                           make_options(**reg), mounts=mounts)
            except KilnError as e:
                if not spec.ignore_error:
                    raise KilnError(f"--cache-to {spec.text}: {e}") from None
                sys.stderr.write(f"kiln: warning: --cache-to {spec.text}: {e}\n")
                continue
            if not quiet:
                with_mounts = f", {image.mounts} cache mounts" if image.mounts else ""
                sys.stderr.write(f"--> cache: {image.records} steps, {len(image.layers())} "
                                 f"layers{with_mounts} to {spec.location} "
                                 f"({desc.digest[:19]})\n")
    return export


def _build_in_context(store, opts, context: str, containerfile: str | None):
    from builder.engine import build

    if context == "-":
        # the context's work dir lives in the store's tmp/: held against a prune meanwhile
        with store.writing(), _StdinContext(store) as (root, text):
            opts.context, opts.context_cache = root, False
            if text is not None:
                opts.containerfile, opts.containerfile_text = None, text
            else:  # -f names a file of the archive, as for docker build -
                from builder.context import default_containerfile

                found = default_containerfile(root)
                name = containerfile or (found and os.path.basename(found))
                if name is None:
                    raise UsageError("the build context on stdin has no Containerfile "
                                     "or Dockerfile (name one with -f)")
                opts.containerfile = os.path.join(root, name)
                opts.containerfile_name = name
            return build(store, opts)
    return build(store, opts)


def _read_stdin_containerfile() -> bytes:
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
            raise UsageError(f"{flag} {text!r}: want key=value pairs separated by commas")
        values[k.strip()] = v
    for k in required:
        if k not in values:
            raise UsageError(f"{flag} {text!r}: {k}= is missing")
    if flag == "--secret":
        if ("src" in values) == ("env" in values):
            raise UsageError(f"--secret {text!r}: give exactly one of src= or env=")
        return values["id"], {k: values[k] for k in ("src", "env") if k in values}
    return values["type"], values


# --output types: kiln's and buildx's names for them (docker: a docker-archive; tar: the
# image's filesystem as one tarball)
_OUTPUT_TYPES = {"oci": "oci", "oci-archive": "oci-archive", "docker-archive": "docker-archive",
                 "docker": "docker-archive", "tar": "tar"}


def _output_spec(text: str) -> dict[str, str]:
    from store.reference import parse_reference

    values = _key_values(text, "--output", ("type", "dest"))[1]
    kind = _OUTPUT_TYPES.get(values["type"])
    if kind is None:
        raise UsageError(f"--output {text!r}: type must be oci, oci-archive, docker-archive "
                         "or tar")
    if values["dest"] == "-" and kind == "oci":
        kind = "oci-archive"  # as buildx's oci exporter: a tarball
    if "name" in values:
        parse_reference(values["name"])
    return {**values, "type": kind}
