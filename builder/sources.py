"""Which entries a COPY/ADD source names: the build context's (selected, hashed) or a
source tree's, with the source path's own symlinks followed inside the source root as
BuildKit's COPY follows them (fsutil's FollowLinks), never on the host.

Apart from builder.copy, which writes what is found: a COPY that its cache answers needs
only this (kiln build's no-op rebuild imports no more).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass

from builder import globs
from store.errors import KilnError
from store.fsutil import walk_path


class CopyError(KilnError):
    pass


def is_url(source: str) -> bool:
    """What ADD downloads (builder.fetch) and COPY refuses."""
    return source.startswith(("http://", "https://"))


def is_git(source: str) -> bool:
    """What BuildKit would clone instead of download."""
    if source.startswith(("git@", "git://")):
        return True
    if is_url(source):
        import urllib.parse

        return urllib.parse.urlsplit(source).path.endswith(".git") or ".git#" in source
    return ".git#" in source


@dataclass(frozen=True)
class SourceEntry:
    path: str  # relative to the source root, '/'-separated
    kind: str  # file | dir | symlink
    mode: int  # permission bits (incl. setuid/setgid/sticky)
    link_target: str | None = None


@dataclass(frozen=True)
class Followed:
    path: str  # the resolved path, relative to the source root ('' is the root)
    links: tuple[tuple[str, str], ...]  # (symlink, its target) followed on the way


def follow(path: str, link_target: Callable[[str], str | None]) -> Followed:
    """``path`` (relative to a source root) with its symlinks followed as if the root were '/'
    (BuildKit's FollowLinks: an absolute target starts again at the root, '..' stops there).

    ``link_target(rel)`` gives the target of the symlink at ``rel``, or None."""
    links: list[tuple[str, str]] = []

    def recorded(rel: str) -> str | None:
        target = link_target(rel)
        if target is not None:
            links.append((rel, target))
        return target

    resolved = walk_path(path, recorded,
                         too_many=CopyError(f"{path}: too many levels of symbolic links"))
    return Followed("/".join(resolved), tuple(links))


def _climbs_out(link: str, target: str) -> bool:
    """Whether ``target``, read from the directory of the symlink ``link``, leaves the root:
    an absolute path, or more '..' than the link is deep."""
    if target.startswith("/"):
        return True
    depth = link.count("/")
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def missing_through_links(source: str, followed: Followed, source_name: str) -> str:
    """Why ``source`` is not there although it names something: the symlinks it went through.
    For the build context, a symlink that points out of it is named as such: BuildKit
    follows it inside the context (and fails: "failed to compute cache key: ... not found"),
    never on the host."""
    outside = source_name == _CONTEXT
    for link, target in followed.links:
        if outside and _climbs_out(link, target):
            return (f"{source}: the symlink {link} -> {target} points outside the build context "
                    f"(symlinks are followed inside the context, as Docker does, and there is "
                    f"no /{followed.path} in it)")
    link, target = followed.links[-1]
    return (f"{source}: the symlink {link} -> {target} leads to /{followed.path}, which is not "
            f"in {source_name}")


def select_from_context(ctx, sources: list[str], *, follow_links: bool = True,
                        parents: bool = False) -> list:
    """The build context's entries (hashed ContextFiles) that COPY ``sources`` need. With
    ``follow_links`` a source's symlinks are followed inside the context, as BuildKit's COPY
    does (never on the host): the links on its way are selected with what they lead to, and
    so are the symlinks a glob matches. One that leads nowhere fails here, by name."""
    if not follow_links:
        return ctx.select(sources, parents=parents)
    from builder.ignore import clean_path

    def resolved(source: str, rel: str) -> list[str]:
        f = follow(rel, ctx.link_target)
        if not f.links:
            return [source]
        if not ctx.has(f.path) and not os.path.lexists(os.path.join(ctx.root, f.path)):
            raise CopyError("COPY source " + missing_through_links(repr(source), f, _CONTEXT))
        return [link for link, _ in f.links] + [f.path or "."]

    wanted: list[str] = []
    wildcards: list[tuple[str, str]] = []
    for src in sources:
        rel = clean_path(src.lstrip("/") or ".") if src.strip() else ".."
        if rel == ".." or rel.startswith("../"):
            wanted.append(src)  # refused by select, which says why
        elif globs.has_wildcards(rel):
            fixed = globs.split_wildcards(rel)[0]
            f = follow(fixed, ctx.link_target) if fixed else Followed("", ())
            pattern = posixpath.join(f.path, rel[len(fixed):].lstrip("/"))
            wanted += [link for link, _ in f.links] + [pattern]
            wildcards.append((src, pattern))
        else:
            wanted += resolved(src, "" if rel == "." else rel)
    selected = ctx.select(wanted)
    more = []
    for src, pattern in wildcards:
        more += [p for e in selected if e.kind == "symlink" and globs.matches(pattern, e.path)
                 for p in resolved(src, e.path)]
    return ctx.select(wanted + more) if more else selected


_CONTEXT = "the build context"
