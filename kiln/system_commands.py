"""kiln version, kiln info and kiln system df: what CI logs and scripts ask of a tool."""

from __future__ import annotations

import json
import os
import platform
import sys

import click

from kiln import __version__
from store.fsutil import is_host_root


def _emit(data: dict, fmt: str | None, text: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
    elif fmt:
        from kiln.gotemplate import Template

        click.echo(Template(fmt.replace("\\n", "\n").replace("\\t", "\t")).render(data))
    else:
        click.echo(text, nl=False)


def version_data() -> dict:
    return {"Client": {"Version": __version__, "PythonVersion": platform.python_version(),
                       "Os": sys.platform, "Arch": _arch(), "Kernel": platform.release()}}


def _arch() -> str:
    from store.store import host_platform

    return host_platform()["architecture"]


@click.command("version")
@click.option("-f", "--format", "fmt", default=None, help="json, or a Go template "
              "('{{.Client.Version}}').")
def version_cmd(fmt):
    """kiln's version and what it runs on."""
    c = version_data()["Client"]
    _emit(version_data(), fmt, f"kiln version {c['Version']}\n"
                               f" Python:  {c['PythonVersion']}\n"
                               f" OS/Arch: {c['Os']}/{c['Arch']}\n"
                               f" Kernel:  {c['Kernel']}\n")


def info_data(root) -> dict:
    from runtime.cgroups import detect_driver
    from runtime.containers import StoreHandle, list_containers
    from store.catalog import list_images

    handle = StoreHandle(root)
    images = containers = []
    if handle.exists():
        images = list_images(handle.store)
        containers = list_containers(handle)
    states = [c.status for c in containers]
    with open("/proc/meminfo") as f:
        mem_kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal:")))
    seccomp = os.path.exists("/proc/sys/kernel/seccomp/actions_avail")
    return {
        "Containers": len(containers), "ContainersRunning": states.count("running"),
        "ContainersPaused": states.count("paused"),
        "ContainersStopped": len(states) - states.count("running") - states.count("paused"),
        "Images": len(images), "Driver": "overlay", "StoreRoot": str(handle.root),
        "CgroupVersion": "2" if detect_driver() == "v2" else "1",
        "KernelVersion": platform.release(), "OperatingSystem": _os_name(),
        "OSType": "linux", "Architecture": _arch(), "NCPU": os.cpu_count(),
        "MemTotal": mem_kb * 1024, "SecurityOptions": ["name=seccomp,profile=builtin"]
        if seccomp else [], "ServerVersion": __version__,
        "Rootless": not is_host_root()}


def _os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            fields = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
        return fields.get("PRETTY_NAME", "linux").strip('"')
    except OSError:
        return "linux"


@click.command("info")
@click.option("-f", "--format", "fmt", default=None, help="json, or a Go template "
              "('{{.CgroupVersion}}').")
@click.pass_context
def info_cmd(ctx, fmt):
    """The store, the host and what kiln can use on it."""
    d = info_data(ctx.obj.root_arg)
    _emit(d, fmt, f"Containers: {d['Containers']}\n Running: {d['ContainersRunning']}\n"
                  f" Paused: {d['ContainersPaused']}\n Stopped: {d['ContainersStopped']}\n"
                  f"Images: {d['Images']}\nStore root: {d['StoreRoot']}\n"
                  f"Storage driver: {d['Driver']}\nCgroup version: {d['CgroupVersion']}\n"
                  f"Security options: {', '.join(d['SecurityOptions']) or 'none'}\n"
                  f"Rootless: {str(d['Rootless']).lower()}\n"
                  f"Kernel version: {d['KernelVersion']}\n"
                  f"Operating system: {d['OperatingSystem']}\n"
                  f"Architecture: {d['Architecture']}\nCPUs: {d['NCPU']}\n"
                  f"Total memory: {d['MemTotal']}\nkiln version: {d['ServerVersion']}\n")


def _tree_bytes(path: str) -> int:
    total = 0
    for dirpath, dirnames, files in os.walk(path):
        for name in files + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += st.st_blocks * 512
    return total


def disk_usage(store) -> list[dict]:
    """docker system df's rows: images, containers, local volumes, build cache."""
    from runtime.containers import list_containers
    from store.catalog import list_images
    from store.gc import _cache_roots, _walk

    def blob_bytes(digests) -> int:
        return sum(os.path.getsize(store.layout.blob_path(d)) for d in digests
                   if store.has_blob(d))

    def layer_bytes(diff_ids) -> int:
        return sum(_tree_bytes(str(store.layer_dir(d))) for d in diff_ids
                   if store.has_layer_dir(d))

    images = list_images(store)
    containers = list_containers(store)
    used_images = {c.image for c in containers}
    all_blobs: set[str] = set()
    all_layers: set[str] = set()
    used_blobs: set[str] = set()
    used_layers: set[str] = set()
    for image in images:
        _walk(store, image.digest, all_blobs, all_layers)
        if image.digest in used_images:
            _walk(store, image.digest, used_blobs, used_layers)
    image_size = blob_bytes(all_blobs) + layer_bytes(all_layers)
    in_use = blob_bytes(used_blobs) + layer_bytes(used_layers)
    sizes = {c.id: _tree_bytes(os.path.join(store.containers_dir, c.id, "upper"))
             for c in containers}
    cache_blobs, cache_layers = _cache_roots(store)
    cache_records = sum(len(files) for _, _, files in os.walk(store.cache_dir))
    mounts = store.root / "cache-mounts"
    cache_size = (blob_bytes(cache_blobs - all_blobs) + layer_bytes(cache_layers - all_layers)
                  + (_tree_bytes(str(mounts)) if mounts.is_dir() else 0))
    running = [c for c in containers if c.status in ("running", "paused")]
    return [
        {"Type": "Images", "TotalCount": len(images),
         "Active": sum(1 for i in images if i.digest in used_images), "Size": image_size,
         "Reclaimable": image_size - in_use},
        {"Type": "Containers", "TotalCount": len(containers), "Active": len(running),
         "Size": sum(sizes.values()),
         "Reclaimable": sum(s for cid, s in sizes.items() if cid not in {c.id for c in running})},
        {"Type": "Local Volumes", "TotalCount": 0, "Active": 0, "Size": 0, "Reclaimable": 0},
        {"Type": "Build Cache", "TotalCount": cache_records, "Active": 0, "Size": cache_size,
         "Reclaimable": cache_size},
    ]


@click.group("system")
def system_cmd():
    """Disk usage and information about kiln and its host."""


@system_cmd.command("df")
@click.option("--format", "fmt", default=None, help="json, or a Go template per row "
              "('{{.Type}} {{.Size}}', 'table ...').")
@click.pass_context
def df_cmd(ctx, fmt):
    """How much disk the store's images, containers and build cache use."""
    from kiln.image_commands import _human_size

    store = ctx.obj.store
    with store.writing():
        rows = disk_usage(store)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    shown = [{**r, "Size": _human_size(r["Size"]),
              "Reclaimable": f"{_human_size(r['Reclaimable'])} "
                             f"({100 * r['Reclaimable'] // r['Size'] if r['Size'] else 0}%)"}
             for r in rows]
    from kiln.gotemplate import render_rows

    click.echo(render_rows(fmt or r"table {{.Type}}\t{{.TotalCount}}\t{{.Active}}\t{{.Size}}"
                                  r"\t{{.Reclaimable}}", shown,
                           {"TotalCount": "TOTAL", "Type": "TYPE"}), nl=False)


system_cmd.add_command(info_cmd, "info")

COMMANDS = {"version": version_cmd, "info": info_cmd, "system": system_cmd}
