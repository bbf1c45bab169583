"""Image commands: import, images, tag, rmi, inspect, history, save, load, prune."""

from __future__ import annotations

import json
import time

import click

COMPRESSION = click.Choice(["zstd", "gzip"])


def _store(ctx: click.Context):
    return ctx.obj.store


def _human_size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)


def _ago(created: str) -> str:
    from datetime import datetime

    try:
        then = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return created or "unknown"
    return ago(then)


def ago(then: float) -> str:
    """How long ago the epoch time ``then`` was, as docker's CREATED column says it."""
    secs = max(0, int(time.time() - then))
    for size, unit in ((86400 * 365, "year"), (86400 * 7, "week"), (86400, "day"),
                       (3600, "hour"), (60, "minute"), (1, "second")):
        if secs >= size:
            n = secs // size
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return "Less than a second ago"


@click.command("import")
@click.argument("source", type=click.Path())
@click.argument("name")
@click.option("--compression-format", "compression", type=COMPRESSION, default="zstd",
              show_default=True, help="How the layer is stored.")
@click.pass_context
def import_cmd(ctx, source, name, compression):
    """Make a one-layer base image from a root filesystem directory or tarball."""
    from store.importer import import_rootfs

    desc = import_rootfs(_store(ctx), source, name, compression=compression)
    click.echo(desc.digest)


IMAGE_HEADERS = {"ID": "IMAGE ID", "CreatedSince": "CREATED", "CreatedAt": "CREATED AT"}


@click.command("images")
@click.option("--format", "fmt", default="table",
              help="table, json, or a Go template: '{{.Repository}}:{{.Tag}}', 'table "
                   "{{.ID}}\t{{.Size}}' (fields ID, Repository, Tag, Digest, CreatedSince, "
                   "CreatedAt, Size, Labels).")
@click.option("-f", "--filter", "filters", multiple=True,
              help="dangling=true|false, reference=PATTERN, label=KEY[=VALUE], before=IMAGE, "
                   "since=IMAGE (repeatable: all must hold; the same key twice: either).")
@click.option("--digests", is_flag=True, help="Show manifest digests.")
@click.option("-q", "--quiet", is_flag=True, help="Only image IDs.")
@click.option("--no-trunc", is_flag=True, help="Full image IDs.")
@click.pass_context
def images_cmd(ctx, fmt, filters, digests, quiet, no_trunc):
    """List images in the store."""
    from store.catalog import list_images

    store = _store(ctx)
    rows = _filtered(store, list_images(store), filters)
    if fmt == "json":
        click.echo(json.dumps([{"Id": r.id, "Names": r.names, "Digest": r.digest,
                                "Created": r.created, "Size": r.size} for r in rows], indent=2))
        return
    if quiet:
        for r in rows:
            click.echo(r.id if no_trunc else r.id[:12])
        return
    if fmt != "table":
        from kiln.gotemplate import render_rows

        click.echo(render_rows(fmt, [
            {"ID": r.id if no_trunc else r.id[:12], "Repository": repo, "Tag": tag,
             "Digest": r.digest, "CreatedSince": _ago(r.created), "CreatedAt": r.created,
             "Size": _human_size(r.size), "Labels": r.labels}
            for r in rows for repo, tag in _repo_tags(r)], IMAGE_HEADERS), nl=False)
        return
    table = [["REPOSITORY", "TAG"] + (["DIGEST"] if digests else [])
             + ["IMAGE ID", "CREATED", "SIZE"]]
    for r in rows:
        for repo, tag in _repo_tags(r):
            table.append([repo, tag] + ([r.digest] if digests else [])
                         + [r.id if no_trunc else r.id[:12], _ago(r.created),
                            _human_size(r.size)])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _repo_tags(r) -> list[tuple[str, str]]:
    """(repository, tag) of each name; an image without a name as docker shows it."""
    return [(name.rpartition(":")[0], name.rpartition(":")[2])
            for name in r.names or ["<none>:<none>"]]


def _name_forms(name: str) -> tuple[str, ...]:
    """What reference= patterns match a name against: it with and without its tag, without
    its registry, and docker's short form (busybox:latest, busybox)."""
    short = name.removeprefix("docker.io/library/")
    return (name, name.rpartition(":")[0], name.split("/", 1)[-1], short,
            short.rpartition(":")[0])


def _filtered(store, rows: list, filters: tuple[str, ...]) -> list:
    """docker images --filter: each key's values are alternatives, the keys all hold."""
    import fnmatch

    from store.errors import KilnError

    wanted: dict[str, list[str]] = {}
    for f in filters:
        key, eq, value = f.partition("=")
        if not eq or key not in ("dangling", "reference", "label", "before", "since"):
            raise KilnError(f"invalid filter {f!r}: use dangling=, reference=, label=, "
                            "before= or since=")
        if key == "dangling" and value not in ("true", "false"):
            raise KilnError(f"invalid filter {f!r}: dangling is true or false")
        wanted.setdefault(key, []).append(value)

    def created_of(name: str) -> str:
        digest = store.resolve(name).digest
        return next(r.created for r in rows if r.digest == digest)

    bounds = {k: [created_of(v) for v in wanted.get(k, [])] for k in ("before", "since")}

    def keep(r) -> bool:
        checks = {
            "dangling": lambda v: (not r.names) == (v == "true"),
            "reference": lambda v: any(fnmatch.fnmatchcase(form, v)
                                       for n in r.names for form in _name_forms(n)),
            "label": lambda v: (v.partition("=")[0] in r.labels and (
                "=" not in v or r.labels[v.partition("=")[0]] == v.partition("=")[2])),
        }
        for key, values in wanted.items():
            if key in checks and not any(checks[key](v) for v in values):
                return False
        return (all(r.created < b for b in bounds["before"])
                and all(r.created > b for b in bounds["since"]))

    return [r for r in rows if keep(r)]


@click.command("tag")
@click.argument("image")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def tag_cmd(ctx, image, names):
    """Give IMAGE one or more additional names."""
    store = _store(ctx)
    with store.writing():
        desc = store.resolve(image)
        for name in names:
            store.tag(name, desc)


@click.command("rmi")
@click.argument("images", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Remove even if containers use it.")
@click.pass_context
def rmi_cmd(ctx, images, force):
    """Remove image names; the image itself goes when its last name does."""
    from store.catalog import remove_image

    for name in images:
        untagged, deleted = remove_image(_store(ctx), name, force=force)
        for t in untagged:
            click.echo(f"Untagged: {t}")
        if deleted:
            click.echo(f"Deleted: {name}")


@click.command("inspect")
@click.argument("names", nargs=-1, required=True)
@click.option("--type", "kind", type=click.Choice(["image", "container"]), default=None,
              help="What the names are (default: an image, else a container).")
@click.option("-f", "--format", "fmt", default=None,
              help="json (the default), or a Go template for each: '{{.Config.Env}}', "
                   "'{{json .Config}}', '{{index .Config.Labels \"k\"}}'.")
@click.pass_context
def inspect_cmd(ctx, names, kind, fmt):
    """Show images or containers as JSON."""
    from runtime.lifecycle import inspect as inspect_container
    from store.catalog import inspect_image
    from store.errors import KilnError

    out = []
    for name in names:
        if kind == "container":
            out.append(inspect_container(ctx.obj.root_arg, name))
            continue
        try:
            out.append(inspect_image(_store(ctx), name))
        except KilnError as e:
            if kind == "image":
                raise
            try:
                out.append(inspect_container(ctx.obj.root_arg, name))
            except KilnError:
                raise KilnError(f"{e}; no container has that name or ID either") from None
    if fmt and fmt != "json":
        from kiln.gotemplate import Template

        template = Template(fmt)
        for item in out:
            click.echo(template.render(item))
        return
    click.echo(json.dumps(out, indent=2))


@click.command("history")
@click.argument("image")
@click.option("--no-trunc", is_flag=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def history_cmd(ctx, image, no_trunc, fmt):
    """Show how an image was made, newest step first."""
    from store.catalog import history

    rows = history(_store(ctx), image)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'ID':<14}{'CREATED':<20}{'CREATED BY':<47}{'SIZE':<10}COMMENT")
    for r in rows:
        ident = (r["layer"] or "<missing>")
        ident = ident if no_trunc or not r["layer"] else ident[7:19]
        by = r["created_by"] if no_trunc else r["created_by"][:44]
        click.echo(f"{ident:<14}{_ago(r['created']):<20}{by:<47}"
                   f"{_human_size(r['size']):<10}{r['comment']}")


@click.command("save")
@click.argument("images", nargs=-1, required=True)
@click.option("-o", "--output", default="-", type=click.Path(),
              help="Where to write (default, or -: stdout, which must not be a terminal).")
@click.option("--format", "fmt", type=click.Choice(["oci", "oci-archive", "docker-archive"]),
              default="oci-archive", show_default=True)
@click.option("--compression-format", "compression", type=COMPRESSION, default=None,
              help="Re-compress layers that are stored otherwise (default: as stored).")
@click.option("--include-signatures", is_flag=True,
              help="Add the images' cosign signatures (as images tagged sha256-<hex>.sig; "
                   "podman load refuses an archive of several images).")
@click.option("-q", "--quiet", is_flag=True)
@click.pass_context
def save_cmd(ctx, images, output, fmt, compression, include_signatures, quiet):
    """Write images to an OCI layout, oci-archive or docker-archive."""
    from kiln.progress import blob_progress
    from store.transfer import save

    save(_store(ctx), images, output, fmt=fmt, compression=compression,
         progress=blob_progress(quiet), signatures=include_signatures)


@click.command("load")
@click.option("-i", "--input", "path", default="-", type=click.Path(),
              help="An archive or OCI layout (default, or -: an archive on stdin).")
@click.option("-q", "--quiet", is_flag=True)
@click.pass_context
def load_cmd(ctx, path, quiet):
    """Load images from an OCI layout, oci-archive or docker-archive (detected)."""
    from kiln.progress import blob_progress
    from store.transfer import load

    for name in load(_store(ctx), path, progress=blob_progress(quiet)):
        click.echo(f"Loaded image: {name}")


@click.command("prune")
@click.option("--build-cache", is_flag=True,
              help="Also drop the build step cache and RUN --mount=type=cache directories.")
@click.pass_context
def prune_cmd(ctx, build_cache):
    """Remove images without a name (dangling) and the blobs, layers and temporary files no
    image, container or cache needs."""
    from store.gc import prune

    r = prune(_store(ctx), build_cache=build_cache, dangling=True)
    click.echo(f"Removed {r.dangling} dangling images, {r.blobs} blobs "
               f"({_human_size(r.bytes)}), {r.layers} layer "
               f"directories, {r.tmp} temporary entries"
               + (f", {r.cache} build cache entries" if build_cache else ""))


COMMANDS = {c.name: c for c in (import_cmd, images_cmd, tag_cmd, rmi_cmd, inspect_cmd,
                                history_cmd, save_cmd, load_cmd, prune_cmd)}
