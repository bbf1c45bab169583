"""Containerfile -> image: stages, instruction semantics, the step cache, the executor.

Each filesystem step (RUN, COPY, ADD) runs against the merged view of the
stage's layers with a fresh upper dir, which then becomes the step's layer
(tarred once, by a thread while the next steps run, then moved into layers/).
Metadata steps only change the config.
A step's cache key chains its parent's key with the expanded instruction,
the build args it can see and, for COPY/ADD, the content of its sources.

Every step costs the same whatever came before it: the stage's ENV is a dict (written back
into the config once, at the end of the stage), cache records hold only the history
entries and layer of the steps they cover (builder/cache.py), and a run of metadata steps
shares one record. What a build may make from a Containerfile is bounded (MAX_BUILD_TEXT),
and so is a word (builder.shell.MAX_WORD) and the file (builder.parser).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from builder import cache
from store.documents import (
    MAX_CONFIG_BYTES,
    MAX_DOCUMENT_BYTES,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    canonical_json,
)
from store.errors import KilnError
from store.store import Store, host_platform

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on start-up
if TYPE_CHECKING:
    from typing import TextIO

DEFAULT_SHELL = ["/bin/sh", "-c"]
# What BuildKit puts in the Env of an image whose base has no PATH (scratch among them)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROXY_ARGS = frozenset({"HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "FTP_PROXY",
                        "ftp_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"})
METADATA = {"ENV", "ARG", "WORKDIR", "USER", "LABEL", "EXPOSE", "CMD", "ENTRYPOINT", "VOLUME",
            "SHELL", "STOPSIGNAL", "HEALTHCHECK", "ONBUILD", "MAINTAINER"}

# Characters that word expansion and metadata history texts may add up to in one build (the
# global ARGs and every stage): four times the largest Containerfile
# (builder.parser.MAX_FILE_SIZE), so a file's own text, expanded once and kept in the
# history, always fits, while values that feed on each other stop here.
MAX_BUILD_TEXT = 64 << 20
# A run of metadata steps shares one cache record, cut at this many steps or characters of
# history text, so that no record grows large and an edit deep in a long run of ENV lines
# still finds the runs before it in the cache.
_META_RECORD_STEPS = 2048
_META_RECORD_CHARS = 256 << 10


class BuildError(KilnError):
    pass


class PullError(BuildError):
    """Pulling a base image failed (the registry's own error); FROM names its line."""


@dataclass
class BuildOptions:
    context: Path
    containerfile: Path | None = None
    # the Containerfile itself (`kiln build -f -` reads it from stdin); the context's
    # ignore file still applies
    containerfile_text: bytes | None = None
    # how errors name the Containerfile: "<stdin>" for containerfile_text, the path given
    # by default (a context from stdin names its files relative to the context)
    containerfile_name: str | None = None
    # keep the context's stat cache in the store (False for a context made for this build
    # alone: from stdin)
    context_cache: bool = True
    tags: list[str] = field(default_factory=list)
    build_args: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    network: str = "host"
    compression: str = "zstd"
    epoch: int | None = None
    quiet: bool = False
    iidfile: str | None = None
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)  # id -> {src|env: ...}
    # {"type": oci|oci-archive|docker-archive, "dest": ..., "name": ... (default: tags[0])}
    outputs: list[dict[str, str]] = field(default_factory=list)
    squash: bool = False
    layers: bool = True  # False: each stage's new layers become one, on top of its base
    pids_limit: int | None = None  # of each RUN step's processes (<= 0 or None: no limit)
    # Called with a base image's name to pull it (the CLI pulls it from its registry; the
    # builder itself never talks HTTP): when the store lacks it, and as ``pull`` says
    fetch_image: Callable[[str], None] | None = None
    # --pull: "missing" (pull what the store lacks), "always" (pull each base image once per
    # build, even when the store has it), "newer" (pull when the registry's digest, from
    # ``remote_digest``, is not the stored one; registry errors leave the stored image in
    # use, with a warning), "never" (no fetch_image: a missing image is an error)
    pull: str = "missing"
    # "newer": the digest the registry has for a name (None when it has none); raises a
    # KilnError when the registry cannot be asked
    remote_digest: Callable[[str], str | None] | None = None
    # Called with each base image's name before it is used: raises when its signatures
    # do not hold (kiln build --verify-key / --signature-policy).
    check_base: Callable[[str], None] | None = None
    # builder.memo's key of this build: a build that makes nothing new leaves a memo there
    memo_key: str | None = None
    # --cache-from: a builder.cache_transfer.CacheSource, consulted on a miss in the store
    cache_source: object = None
    # --cache-to: called after the build with the keys of each stage's steps in order, of
    # the target's stage chain (mode=min) and of every stage (mode=max), and the ids of the
    # RUN --mount=type=cache dirs its RUN steps name (mode=max exports them too)
    cache_export: Callable[[list[list[str]], list[list[str]], list[str]], None] | None = None
    # --cache-to type=inline: the cache of the image's own steps goes into its config
    inline_cache: bool = False
    # where an --output with dest "-" goes (a binary stream: kiln's stdout)
    output_stream: object = None


@dataclass
class Layer:
    digest: str
    diff_id: str
    media_type: str
    size: int

    def to_json(self) -> dict:
        return {"digest": self.digest, "diff_id": self.diff_id, "mediaType": self.media_type,
                "size": self.size}


@dataclass
class StageState:
    name: str | None
    index: int
    config: dict  # the OCI image config, "rootfs" and "history" included; its Env: see env
    layers: list[Layer]
    key: str
    args: dict[str, str]  # ARG values in scope (declared in this stage)
    globals: dict[str, str] = field(default_factory=dict)  # ARGs before FROM: an ARG re-declares
    workdir_made: bool = False
    cmd_set: bool = False  # a CMD of this stage's own (not inherited): ENTRYPOINT keeps it
    base_layer_count: int = 0
    pending: list[_PendingCommit] = field(default_factory=list, repr=False)  # oldest first
    # ENV while the stage builds (key -> value, the last one set last); put into the
    # config's Env by sync_env when the stage is done
    env: dict[str, str] = field(default_factory=dict, repr=False)
    env_changed: bool = False
    # metadata steps whose history entries wait for Builder.flush_metadata: their texts,
    # and the key of the last one
    meta: list[str] = field(default_factory=list, repr=False)
    meta_chars: int = 0
    meta_key: str = ""
    inst: object = field(default=None, repr=False)  # the instruction running, for errors
    step: int = 0  # its number in the build's "STEP n/total" lines

    @property
    def run_config(self) -> dict:
        return self.config.setdefault("config", {})

    def set_env(self, key: str, value: str) -> None:
        self.env[key] = value  # a key set again keeps its place (BuildKit's addEnv)
        self.env_changed = True

    def sync_env(self) -> None:
        if self.env_changed:
            self.run_config["Env"] = [f"{k}={v}" for k, v in self.env.items()]
            self.env_changed = False

    @property
    def where(self) -> str:
        inst = self.inst
        return f"{inst.path}:{inst.line}" if inst is not None else str(self.name or self.index)


# Signals that kiln forwards to a RUN step's container (runtime.process.FORWARDED): a commit
# thread blocks them, so that they reach the thread that forwards them.
_COMMIT_THREAD_BLOCKS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


# Stages building at once (each in a thread; most wait on a RUN's process).
_MAX_STAGE_THREADS = 8

# Layers of a stage being committed at once; one more commit waits for the oldest first.
# Three: a big RUN's layer, a small step's (WORKDIR) and the COPY after it go on while
# the big one is written (each costs at most 24 MiB of buffers and zstd's workers).
_MAX_PENDING = 3


@dataclass
class _PendingCommit:
    """A step's layer being tarred, hashed and compressed in a thread while the next steps
    run (a RUN's container mostly waits on its process, so two cores stay busy).

    The step's upper dir waits in ``path`` (moved out of the step's work dir) and serves as
    the layer's dir for the steps meanwhile; ``Builder._finish_commits`` moves it into
    layers/ once it has its diff_id and no overlay uses it any more, then writes the
    step's cache record (``key``, its history ``entry`` and the layer)."""

    layer: Layer  # digest, diff_id, media type and size filled in when finished
    path: str
    stage_dir: str  # the store tmp dir holding ``path``
    key: str
    entry: dict
    where: str  # the step, for its errors: "Containerfile:3: COPY big /big"
    reuse: tuple[str, dict[str, str]] | None = None  # a COPY's lineage record (builder.reuse)
    thread: threading.Thread | None = None
    result: tuple[Descriptor, str] | None = None
    error: BaseException | None = None

    def run(self, store: Store, compression: str, epoch: int | None) -> None:
        # The build forks (RUN containers, COPY workspaces) while this thread runs: it
        # imports nothing (a module lock held across a fork would stay held in the child).
        import signal

        signal.pthread_sigmask(signal.SIG_BLOCK,
                               [getattr(signal, name) for name in _COMMIT_THREAD_BLOCKS])
        try:
            self.result = store.write_layer_blob(self.path, compression=compression,
                                                 epoch=epoch)
        except BaseException as e:  # noqa: BLE001 - raised again by _finish_commits
            self.error = e


def _now(epoch: int | None) -> str:
    from store.importer import rfc3339

    return rfc3339(epoch if epoch is not None else time.time())


def _os_error(e: OSError) -> str:
    return f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"


class Builder:
    def __init__(self, store: Store, opts: BuildOptions, out: TextIO | None = None):
        self.store = store
        self.opts = opts
        self.out = out or sys.stderr
        self.used_args: set[str] = set()
        self.total_steps = 0
        self.context = None
        self.escape = "\\"
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()
        self._pull_done: set[str] = set()  # names --pull has been applied to (full references)
        # set on Ctrl-C, or when a stage fails: every thread stops at its next step
        self.cancelled = threading.Event()
        self._out_lock = threading.Lock()  # one line at a time on kiln's stdout/stderr
        self.stages_at_once = False  # RUN output is prefixed with its stage (builder.output)
        self.text_chars = 0  # counted against MAX_BUILD_TEXT (stages build in threads)
        self._text_lock = threading.Lock()
        # for builder.memo: whether the build made nothing new (every step a cache hit,
        # nothing pulled or downloaded), the image names it looked up in the store and
        # what they were, and what it printed
        self.made_nothing = True
        self.used_keys: list[tuple[int, str]] = []  # (stage index, cache key): for --cache-to
        self.cache_mounts: set[str] = set()  # ids of the shared RUN --mount=type=cache dirs
        self.looked_up: dict[str, str | None] = {}
        self.said: list[str] = []

    def context_for(self, inst):
        """The build context, scanned once (with its stat cache) when a COPY first needs it.

        Stages build in threads; the scanner is not thread-safe, so callers get a view
        whose every call holds the builder's lock."""
        with self._lock:
            return _Locked(self._context_locked(), self._lock)

    def _context_locked(self):
        if self.context is None:
            from builder.context import open_build_context

            self.context = open_build_context(
                self.store.cache_dir, self.opts.context,
                None if self.opts.containerfile_text is not None else self._containerfile(),
                stat_cache=self.opts.context_cache)
        return self.context

    # -- output ---------------------------------------------------------------------
    def say(self, text: str) -> None:
        if not self.opts.quiet:  # one write: print's two mix the lines of parallel stages
            with self._out_lock:
                self.said.append(text)
                self.out.write(text + "\n")
                self.out.flush()

    def say_stage(self, state: StageState, text: str) -> None:
        """A line about a step of ``state``: prefixed with the stage when several build."""
        self.say(f"[{state.name or state.index}] {text}" if self.stages_at_once else text)

    def show_output(self, data: bytes) -> None:
        """A failed RUN step's output, which -q kept back: shown before its error."""
        text = data.decode("utf-8", "replace")
        with self._out_lock:
            self.out.write(text if text.endswith("\n") else text + "\n")
            self.out.flush()

    def run_output(self, state: StageState):
        """Where a RUN step of ``state`` writes (builder.output): None for kiln's own stdout
        and stderr, a relay that prefixes each line with the stage when several stages
        build, or one that keeps the output for an error (-q)."""
        if not self.opts.quiet and not self.stages_at_once:
            return None
        from builder.output import RunOutput

        prefix = None if self.opts.quiet else f"[{state.name or state.index}] ".encode()
        return RunOutput(prefix=prefix, lock=self._out_lock)

    # -- entry point ------------------------------------------------------------------
    def build(self) -> Descriptor:
        """Called from the main thread, the build runs in a thread of its own, so that a
        Ctrl-C (a KeyboardInterrupt, which Python raises only in the main thread) stops it
        wherever its steps are: see ``stop``."""
        if threading.current_thread() is not threading.main_thread():
            return self._build()
        from runtime.children import now
        from store.interrupt import Interrupted  # what the CLI's signal handler raises

        started = now()
        outcome: list = []
        # waited for with an Event: a KeyboardInterrupt in Thread.join marks a thread that
        # still runs as stopped (CPython 3.11, bpo-45274's fix)
        finished = threading.Event()

        def work() -> None:
            try:
                outcome.append(self._build())
            except BaseException as e:  # noqa: BLE001 - raised again in the main thread
                outcome.append(e)
            finally:
                finished.set()

        threading.Thread(target=work, name="kiln-build").start()
        try:
            while not finished.wait(0.1):  # a SIGINT another thread took is seen at a turn
                pass
        except (KeyboardInterrupt, Interrupted):
            self.stop(finished, started)
            raise
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def stop(self, finished: threading.Event, started: float) -> None:
        """After a Ctrl-C: the build's threads stop at their next step, and the processes
        they wait for (RUN containers, COPY helpers: what kiln started since ``started``)
        are killed until the threads have unwound, removing their work dirs and cgroups
        as they go. Another Ctrl-C leaves at once (the CLI leaves after a few seconds
        anyway): what they started dies with kiln, and the store's next user clears tmp/."""
        from runtime.children import kill_children

        self.cancelled.set()
        try:
            while not finished.is_set():
                kill_children(started)
                finished.wait(0.05)
        except KeyboardInterrupt:
            pass
        kill_children(started)

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise KeyboardInterrupt

    def _build(self) -> Descriptor:
        from builder.parser import parse, parse_file
        from builder.stages import plan_stages

        started = time.monotonic()
        df = self._parse(parse, parse_file)
        self.escape = df.escape
        plan = plan_stages(df, build_args=self.opts.build_args, target=self.opts.target,
                           image_exists=self._image_exists)
        self.total_steps = sum(len(s.instructions) + 1 for s in plan.needed)
        self.stages_at_once = len(plan.needed) > 1
        self.text_chars = plan.text_chars  # what the global ARGs and FROM lines expanded to
        # a build arg that a global ARG declares is consumed (FROM may use it)
        self.used_args.update(set(self.opts.build_args) & set(plan.declared_globals))
        hashing = self._hash_context_ahead(plan)
        try:
            results = self._build_stages(plan)
        finally:
            if hashing is not None:
                hashing[1].set()
                hashing[0].join()
        self.check_cancelled()
        final = results[plan.target.index]
        if self.context is not None:
            self.context.save_cache()
        if self.opts.squash:
            self._squash(final)
        elif not self.opts.layers:
            self._merge_new_layers(final)
        inline = None
        if self.opts.inline_cache:
            if self.opts.squash or not self.opts.layers:
                self.say("[Warning] --cache-to type=inline: a squashed image has not the "
                         "layers of its steps; no cache written into it")
            else:
                from builder.cache_transfer import inline_document

                inline = inline_document(self.store, self._chains(plan)[0],
                                         {la.digest for la in final.layers})
        desc = self._write_image(final, inline)
        unused = set(self.opts.build_args) - self.used_args - PROXY_ARGS
        for name in sorted(unused):
            self.say(f"[Warning] one or more build args were not consumed: {name}")
        self.check_cancelled()
        for tag in self.opts.tags:
            self.store.tag(tag, desc)
        if not self.opts.tags:  # listed as <none> until named, removed or pruned
            self.store.keep_untagged(desc)
        self._outputs(desc)
        if self.opts.cache_export is not None:
            self.opts.cache_export(*self._chains(plan), sorted(self.cache_mounts))
        image_id = self.store.image_for(desc).config_descriptor().digest
        if self.opts.iidfile:
            Path(self.opts.iidfile).write_text(image_id)
        if self.opts.memo_key is not None and self.made_nothing:
            self._save_memo(desc, image_id, final)
        tags = ", ".join(self.opts.tags) or "no tag"
        self.say(f"--> {image_id[7:19]} ({tags}) in {time.monotonic() - started:.2f}s")
        return desc

    def _hash_context_ahead(self, plan) -> tuple[threading.Thread, threading.Event] | None:
        """When a step will COPY or ADD from the context: a thread that hashes its files
        while the steps before run (a RUN leaves a core idle), so that a cold build's COPY
        does not wait for thousands of files to be read. Returns the thread and the event
        that stops it (the build's end), or None."""
        if not any(inst.cmd in ("COPY", "ADD")
                   and not any(f.startswith("--from") for f in inst.flags)
                   for stage in plan.needed for inst in stage.instructions):
            return None
        try:
            with self._lock:  # the imports here: the thread imports nothing (forks meanwhile)
                context = self._context_locked()
        except KilnError:  # a bad ignore file: the COPY that reads the context says so
            return None
        stop = threading.Event()
        thread = threading.Thread(target=context.hash_ahead, args=(self._lock, stop),
                                  name="kiln-context", daemon=True)
        thread.start()
        return thread, stop

    def _save_memo(self, desc: Descriptor, image_id: str, final: StageState) -> None:
        from builder import memo

        context = containerfile = fingerprint = None
        if self.opts.containerfile_text is None:
            containerfile = str(self._containerfile())
        if self.context is not None:
            context = memo.context_digest(self.context)
            fingerprint = self.context.fingerprint()
        try:
            memo.save(self.store, self.opts.memo_key,
                      image={"mediaType": desc.media_type, "digest": desc.digest,
                             "size": desc.size},
                      config=image_id, layers=[la.digest for la in final.layers],
                      refs=self.looked_up, context=context, containerfile=containerfile,
                      said=list(self.said), fingerprint=fingerprint,
                      tagged=sorted(self.opts.tags))
        except OSError:
            pass  # only the next no-op's speed is lost

    def _image_exists(self, ref: str) -> bool:
        from store.errors import NotFoundError, ReferenceError_

        try:
            self._apply_pull_policy(ref)
            self.looked_up[ref] = self.store.resolve(ref).digest
            return True
        except (ReferenceError_, NotFoundError):
            self.looked_up[ref] = None
            return False

    def _apply_pull_policy(self, ref: str) -> None:
        """Pull the image ``ref`` as --pull says, once per build (stages that name it
        share the one look-up)."""
        if self.opts.fetch_image is None:
            return
        from store.errors import NotFoundError
        from store.reference import parse_reference

        key = str(parse_reference(ref))
        with self._fetch_lock:
            if key in self._pull_done:
                return
            try:
                local = self.store.resolve(ref).digest
            except NotFoundError:
                local = None
            if local is None:
                self._pull(ref)
            elif self.opts.pull == "always":
                self._pull(ref, " (--pull=always)")
            elif self.opts.pull == "newer":
                self._pull_if_newer(ref, local)
            self._pull_done.add(key)

    def _pull_if_newer(self, ref: str, local: str) -> None:
        """--pull=newer: pull when the registry's digest is not the stored one. As podman
        does, a registry that cannot be asked (offline, no such tag, a failed pull) leaves
        the stored image in use, with a warning."""
        try:
            remote = self.opts.remote_digest(ref) if self.opts.remote_digest else None
            if remote is None:
                self.say(f"[Warning] {ref}: its registry has no such image; using the "
                         f"stored {local}")
                return
            if remote == local:
                return
            self._pull(ref, f": its registry has {remote}, the store {local}")
        except KilnError as e:
            self.say(f"[Warning] {ref}: cannot check its registry for a newer image ({e}); "
                     f"using the stored {local}")

    def _pull(self, ref: str, why: str = "") -> None:
        self.made_nothing = False
        self.say(f"pulling {ref}{why}")
        try:
            self.opts.fetch_image(ref)
        except BuildError:
            raise
        except KilnError as e:
            raise PullError(str(e)) from None

    def _store_image(self, name: str):
        self._apply_pull_policy(name)
        desc = self.store.resolve(name)
        self.looked_up[name] = desc.digest
        image = self.store.image_for(desc)
        if self.opts.check_base is not None:
            self.opts.check_base(name)
        return image

    def _parse(self, parse, parse_file):
        name = self.opts.containerfile_name
        if self.opts.containerfile_text is not None:
            return parse(self.opts.containerfile_text, name or "<stdin>")
        path = self._containerfile()
        if name is None:
            return parse_file(path)
        from builder.parser import MAX_FILE_SIZE, ParseError

        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_SIZE + 1)
        except OSError as e:
            raise ParseError(name, None, f"cannot read: {e.strerror or e}") from None
        return parse(data, name)

    def _containerfile(self) -> Path:
        if self.opts.containerfile_text is not None:
            return Path(self.opts.containerfile_name or "<stdin>")
        if self.opts.containerfile:
            return Path(self.opts.containerfile)
        from builder.context import default_containerfile

        found = default_containerfile(self.opts.context)
        if found is None:
            raise BuildError(f"no Containerfile or Dockerfile in {self.opts.context}")
        return Path(found)

    def _chains(self, plan) -> tuple[list[list[str]], list[list[str]]]:
        """The keys of each stage's steps in order: of the target's stage chain, of all."""
        by_index = {s.index: s for s in plan.needed}
        chain, stage = set(), plan.target
        while stage is not None:
            chain.add(stage.index)
            stage = by_index.get(stage.base_stage) if stage.base_stage is not None else None
        chains: dict[int, list[str]] = {}  # each stage's keys in order
        for index, key in self.used_keys:
            chains.setdefault(index, []).append(key)
        return ([chains[i] for i in sorted(chains) if i in chain],
                [chains[i] for i in sorted(chains)])

    # -- stages ---------------------------------------------------------------------
    def _base_state(self, stage, results: dict[int, StageState]) -> StageState:
        base = stage.base
        if base == "scratch":
            # BuildKit's emptyImage: the root as working directory and the default PATH
            config = {**host_platform(),
                      "config": {"Env": [f"PATH={DEFAULT_PATH}"], "WorkingDir": "/"},
                      "rootfs": {"type": "layers", "diff_ids": []}, "history": []}
            return StageState(stage.name, stage.index, config, [], cache.step_key("", "scratch"),
                              {}, stage.args, env={"PATH": DEFAULT_PATH})
        if stage.base_stage is not None:
            parent = results[stage.base_stage]
            # history entries are never changed in place (see _squash): the list is copied,
            # not each entry, so a stage costs the same however long its parent's history
            config = copy.deepcopy({k: v for k, v in parent.config.items() if k != "history"})
            config["history"] = list(parent.config.get("history") or [])
            return StageState(stage.name, stage.index, config,
                              list(parent.layers), parent.key, {}, stage.args,
                              base_layer_count=len(parent.layers), env=dict(parent.env))
        from builder.shell import env_from_list
        from store.errors import NotFoundError

        inst = stage.from_inst
        try:
            image = self._store_image(base)
        except NotFoundError as e:
            why = "; --pull=never forbids pulling it" if self.opts.pull == "never" else ""
            raise BuildError(f"{inst.path}:{inst.line}: {_step_text(inst)}: {e}{why}") from None
        except PullError as e:
            raise BuildError(f"{inst.path}:{inst.line}: {_step_text(inst)}: pulling it: {e}"
                             ) from None
        layers = [Layer(la.digest, la.diff_id, la.media_type, la.size) for la in image.layers()]
        self.store.unpack_image(image)
        config = copy.deepcopy(image.config())
        config.setdefault("config", {})
        config.setdefault("history", [])
        env = env_from_list(e for e in config["config"].get("Env") or [] if isinstance(e, str))
        state = StageState(stage.name, stage.index, config, layers,
                           cache.step_key("", "FROM " + image.digest), {}, stage.args,
                           base_layer_count=len(layers), env=env)
        if "PATH" not in env:  # BuildKit makes sure every stage has one, after the image's
            state.set_env("PATH", DEFAULT_PATH)
        return state

    def _build_stages(self, plan) -> dict[int, StageState]:
        """Stages that do not depend on each other build at the same time, in threads."""
        results: dict[int, StageState] = {}
        if len(plan.needed) == 1:
            stage = plan.needed[0]
            results[stage.index] = self._build_stage(stage, plan, results)
            return results
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

        from runtime.children import now

        futures: dict = {}
        started = now()

        def run(stage) -> StageState:
            for dep in stage.deps:
                results[dep] = futures[dep].result()
            return self._build_stage(stage, plan, results)

        # stages start in file order, so one waits only for stages already started: any
        # number of workers is safe, and a few keep two cores busy
        with ThreadPoolExecutor(max_workers=min(len(plan.needed), _MAX_STAGE_THREADS)) as pool:
            for stage in plan.needed:  # dependencies always come earlier in the file
                futures[stage.index] = pool.submit(run, stage)
            done, running = wait(futures.values(), return_when=FIRST_EXCEPTION)
            if running:  # a stage failed: the others stop now, its error is the build's
                failed = next(f for f in futures.values() if f in done and f.exception())
                self._stop_stages(running, started)
                raise failed.exception()
            for index, future in futures.items():
                results[index] = future.result()
        return results

    def _stop_stages(self, running, started: float) -> None:
        """A stage failed: the others stop at their next step, and what they wait for (RUN
        containers, COPY helpers: what kiln started since ``started``) is killed until they
        have unwound, as after a Ctrl-C (see ``stop``)."""
        from concurrent.futures import wait

        from runtime.children import kill_children

        self.cancelled.set()
        while running:
            kill_children(started)
            _, running = wait(running, timeout=0.05)

    def _build_stage(self, stage, plan, results) -> StageState:
        self.check_cancelled()
        # steps are numbered in file order, whichever stage's thread gets to them first
        number = 1 + sum(len(s.instructions) + 1 for s in plan.needed
                         if s.index < stage.index)
        self.say(f"[{stage.label}] STEP {number}/{self.total_steps}: {stage.from_line}")
        state = self._base_state(stage, results)
        onbuild = state.run_config.pop("OnBuild", None) or []
        try:
            if onbuild:
                from builder.parser import parse

                triggers = parse("\n".join(onbuild),
                                 path=f"{stage.base} (ONBUILD)").instructions
                for inst in triggers:
                    self._step(state, inst, plan, results, number)
            for i, inst in enumerate(stage.instructions):
                self._step(state, inst, plan, results, number + i + 1)
            try:
                self.flush_metadata(state)
            except OSError as e:
                raise BuildError(f"{state.where}: writing the build cache: {_os_error(e)}"
                                 ) from None
        except BaseException:
            self._finish_commits(state, quiet=True)  # the step's own error is the one to show
            raise
        self._finish_commits(state)
        state.sync_env()
        return state

    # -- one step -----------------------------------------------------------------------
    def _step(self, state: StageState, inst, plan, results, number: int) -> None:
        from builder import instructions

        self.check_cancelled()
        label = f"[{state.name or state.index}] STEP {number}/{self.total_steps}: "
        self.say(label + inst.original.strip().replace("\n", " ")[:200])
        t0 = time.monotonic()
        handler = instructions.HANDLERS.get(inst.cmd)
        if handler is None:
            raise BuildError(f"{inst.path}:{inst.line}: {inst.cmd} is not supported by kiln yet")
        state.inst, state.step = inst, number
        try:
            handler(self, state, inst, plan, results)
        except OSError as e:  # the disk filled up, a file vanished: say which step met it
            raise BuildError(f"{inst.path}:{inst.line}: {_step_text(inst)}: {_os_error(e)}"
                             ) from None
        if inst.cmd not in METADATA:
            self.say_stage(state, f"    ({time.monotonic() - t0:.2f}s)")

    def history(self, state: StageState, created_by: str, *, empty: bool) -> dict:
        entry = {"created": _now(self.opts.epoch), "created_by": created_by}
        if empty:
            entry["empty_layer"] = True
        state.config.setdefault("history", []).append(entry)
        return entry

    def charge(self, state: StageState, chars: int) -> None:
        """Count text a step adds (an expanded word, a history entry) against the build's
        MAX_BUILD_TEXT; called as each piece is made, so memory stays bounded."""
        with self._text_lock:
            self.text_chars += chars
            over = self.text_chars > MAX_BUILD_TEXT
        if over:
            raise BuildError(
                f"{state.where}: the values this build expands and records add up to more "
                f"than {MAX_BUILD_TEXT >> 20} MiB (kiln's limit); is an ARG, ENV or LABEL "
                "value growing on every line?")

    # -- metadata steps -----------------------------------------------------------------
    def metadata_done(self, state: StageState, key: str, created_by: str) -> None:
        """A config-only step. Its history entry waits (with those of the metadata steps
        next to it) for flush_metadata, which takes their times from the cache when the
        same steps ran before, so a rebuild from an unchanged Containerfile is the same
        image, byte for byte."""
        self.charge(state, len(created_by))
        state.key = state.meta_key = key
        state.meta.append(created_by)
        state.meta_chars += len(created_by)
        if len(state.meta) >= _META_RECORD_STEPS or state.meta_chars >= _META_RECORD_CHARS:
            self.flush_metadata(state)

    def flush_metadata(self, state: StageState) -> None:
        """The waiting metadata steps go into the history: with the entries of the cache
        record of the last one's key when it covers the same steps, else with new ones,
        which make that record. Runs before every filesystem step and at the end of a
        stage; one record read (or written) for the whole run of steps."""
        if not state.meta:
            return
        texts, key = state.meta, state.meta_key
        rec = None if self.opts.no_cache else self._load(key, len(texts))
        if rec is not None and cache.describes(rec, texts):
            entries = rec["history"]
        else:
            now = _now(self.opts.epoch)
            entries = [{"created": now, "created_by": t, "empty_layer": True} for t in texts]
            self._record(key, history=entries, layer=None)
        self.used_keys.append((state.index, key))
        state.meta, state.meta_chars = [], 0
        state.config.setdefault("history", []).extend(entries)

    # -- filesystem steps -------------------------------------------------------------
    def cached(self, state: StageState, key: str, created_by: str) -> bool:
        """Whether the cache has the step of ``key`` (whose history says ``created_by``):
        if so its history entry and layer are the stage's now."""
        self.flush_metadata(state)
        if self.opts.no_cache:
            return False
        rec = self._load(key, 1)
        if rec is None:
            return False
        self.used_keys.append((state.index, key))
        self._finish_commits(state)
        if cache.describes(rec, [created_by]):
            state.config.setdefault("history", []).extend(rec["history"])
        else:  # the same step written another way: its layer, and its own history entry
            self.made_nothing = False
            self.history(state, created_by, empty=rec["layer"] is None)
        if rec["layer"] is not None:
            la = rec["layer"]
            state.layers.append(Layer(la["digest"], la["diff_id"], la["mediaType"], la["size"]))
        state.key = key
        self.say_stage(state, "--> CACHED")
        return True

    def _load(self, key: str, steps: int) -> dict | None:
        """The store's record of ``key``, else one --cache-from has (brought in)."""
        rec = cache.load(self.store, key, steps)
        source = self.opts.cache_source
        if rec is None and source is not None and source.bring(key, steps):
            self.made_nothing = False
            rec = cache.load(self.store, key, steps)
        return rec

    def _record(self, key: str, *, history: list[dict], layer: dict | None) -> None:
        """A step's cache record written: this build made something (no builder.memo)."""
        self.made_nothing = False
        cache.save(self.store, key, history=history, layer=layer)

    def done_without_layer(self, state: StageState, key: str, created_by: str) -> None:
        """A filesystem step that changed nothing (WORKDIR of a directory that exists): an
        empty history entry, cached under the step's own key, which ``cached`` looks up."""
        self.flush_metadata(state)
        entry = self.history(state, created_by, empty=True)
        state.key = key
        self._record(key, history=[entry], layer=None)
        self.used_keys.append((state.index, key))

    def commit(self, state: StageState, key: str, upper: str, created_by: str, *,
               reuse: tuple[str, dict[str, str]] | None = None) -> None:
        """``upper`` becomes the step's layer. Its blob is written by a thread meanwhile the
        next steps run (see _PendingCommit); a cache hit or the end of the stage waits for
        it, and so does a commit when _MAX_PENDING are in flight."""
        # what the thread uses is loaded here, not there: see _PendingCommit.run
        import contextlib  # noqa: F401
        import signal  # noqa: F401
        import tempfile  # noqa: F401

        from store import layer_writer  # noqa: F401
        from store.fsutil import remove_tree

        self.flush_metadata(state)
        if len(state.pending) >= _MAX_PENDING:  # the oldest only: the newer keeps going
            self._finish_commits(state, keep=_MAX_PENDING - 1)
        stage_dir = self.store.mkdtemp("pending-layer-")
        path = os.path.join(stage_dir, "diff")
        try:
            os.rename(upper, path)
        except BaseException:
            remove_tree(stage_dir)
            raise
        layer = Layer("", "", "", 0)
        state.layers.append(layer)
        state.config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
        entry = self.history(state, created_by, empty=False)
        state.key = key
        inst = state.inst
        where = f"{state.where}: {_step_text(inst)}" if inst is not None else state.where
        pending = _PendingCommit(layer, path, stage_dir, key, entry, where, reuse)
        pending.thread = threading.Thread(
            target=pending.run, args=(self.store, self.opts.compression, self.opts.epoch),
            name="kiln-commit")
        try:
            pending.thread.start()
        except BaseException:
            remove_tree(stage_dir)
            raise
        state.pending.append(pending)
        self.used_keys.append((state.index, key))  # in step order: its record comes later

    def _finish_commits(self, state: StageState, *, quiet: bool = False, keep: int = 0) -> None:
        """Wait for the stage's pending commits but the newest ``keep``; their layers go into
        layers/ and their steps into the cache. ``quiet``: a failure only cleans up (another
        error is on its way). A failure names the step whose layer it was (it shows up steps
        later)."""
        if len(state.pending) <= keep:
            return
        from store.fsutil import remove_tree

        cut = len(state.pending) - keep
        pending, state.pending = state.pending[:cut], state.pending[cut:]
        failed: tuple[_PendingCommit, BaseException] | None = None
        try:
            for p in pending:
                p.thread.join()
                if failed is None and p.error is not None:
                    failed = (p, p.error)
            for p in pending:
                if failed is None:
                    try:
                        desc, diff_id = p.result
                        self.store.adopt_layer_dir(p.path, diff_id)
                        p.layer.digest, p.layer.diff_id = desc.digest, diff_id
                        p.layer.media_type, p.layer.size = desc.media_type, desc.size
                        self._record(p.key, history=[p.entry], layer=p.layer.to_json())
                        if p.reuse is not None:  # a hint for the step's next run
                            from builder import reuse

                            lineage, files = p.reuse
                            with contextlib.suppress(OSError):
                                reuse.save(self.store, lineage, diff_id, files)
                    except Exception as e:  # noqa: BLE001 - raised below, naming the step
                        failed = (p, e)
        finally:
            for p in pending:
                remove_tree(p.stage_dir)
        if failed is not None:
            if quiet:
                return
            p, e = failed
            if not isinstance(e, (OSError, KilnError)):
                raise e
            reason = _os_error(e) if isinstance(e, OSError) else str(e)
            raise BuildError(f"{p.where}: writing its layer: {reason}") from None
        diff_ids = [la.diff_id for la in state.layers if la.diff_id]  # those still pending last
        state.config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
        state.config["rootfs"]["diff_ids"] = diff_ids

    def layer_dirs(self, state: StageState) -> list[str]:
        """The dirs of the stage's layers, bottom first. A layer still being committed is
        where it waits: valid for the current step (commits finish only at a cache hit, at
        a commit, after the step's work, or at the end of the stage)."""
        dirs = []
        staged = {id(p.layer): p.path for p in state.pending}
        for la in state.layers:
            if id(la) in staged:
                dirs.append(staged[id(la)])
                continue
            dirs.append(self._unpacked(la))
        return dirs

    def _unpacked(self, la: Layer) -> str:
        """A layer's dir, unpacked from its blob first if need be: a step taken from an
        imported cache brings only the blob, which a build that runs nothing on top of it
        never unpacks."""
        if self.store.has_layer_dir(la.diff_id):
            return str(self.store.layer_dir(la.diff_id))
        from store.image import BlobLayer

        if not self.store.has_blob(la.digest):
            raise BuildError(f"layer {la.diff_id} is missing from the store")
        desc = Descriptor(la.media_type, la.digest, la.size)
        return str(self.store.ensure_layer_dir(BlobLayer(desc, la.diff_id,
                                                         self.store.open_blob)))

    def new_upper(self) -> tuple[str, str]:
        work = self.store.mkdtemp("step-")
        upper = os.path.join(work, "upper")
        os.mkdir(upper, 0o755)
        return work, upper

    # -- the image ------------------------------------------------------------------------
    def _squash(self, state: StageState) -> None:
        """--squash: the whole merged filesystem as one layer (as buildah --squash)."""
        from runtime.workspace import View, with_views
        from store.image import BlobLayer
        from store.layer_writer import write_layer

        self.say("--> squashing the image's layers into one")
        work = self.store.mkdtemp("squash-")
        blob_path = os.path.join(work, "layer.blob")
        compression, epoch = self.opts.compression, self.opts.epoch

        def write(root: str):
            with open(blob_path, "wb") as out:
                blob = write_layer(root, out, compression=compression, source_date_epoch=epoch)
                out.flush()
                os.fsync(out.fileno())
            return blob

        try:
            blob = with_views([View(self.layer_dirs(state), readonly=True)], write, work)
            self.store.layout.install_file(blob_path, blob.digest)
        finally:
            from store.fsutil import remove_tree

            remove_tree(work)
        desc = Descriptor(blob.media_type, blob.digest, blob.size)
        self.store.ensure_layer_dir(BlobLayer(desc, blob.diff_id, self.store.open_blob))
        state.config["history"] = [{**entry, "empty_layer": True}
                                   for entry in state.config.get("history", [])]
        self.history(state, "kiln build --squash", empty=False)
        state.layers = [Layer(desc.digest, blob.diff_id, desc.media_type, desc.size)]

    def _merge_new_layers(self, state: StageState) -> None:
        """--layers=false: the layers this stage added are replayed into one."""
        from builder.squash import replay_layer
        from runtime.workspace import View, with_views
        from store.fsutil import remove_tree

        new = state.layers[state.base_layer_count:]
        if len(new) <= 1:
            return
        base = state.layers[:state.base_layer_count]
        new_dirs = [self._unpacked(la) for la in new]
        work, upper = self.new_upper()
        try:
            def replay(root: str) -> None:
                for d in new_dirs:
                    replay_layer(d, root)

            with_views([View(self.layer_dirs(StageState(None, 0, {}, base, "", {})), upper)],
                       replay, work)
            desc, diff_id = self.store.commit_layer(upper, compression=self.opts.compression,
                                                    epoch=self.opts.epoch)
        finally:
            remove_tree(work)
        history = state.config.get("history", [])
        non_empty = [i for i, h in enumerate(history) if not h.get("empty_layer")]
        for i in non_empty[state.base_layer_count:-1]:  # the last one carries the merged layer
            history[i] = {**history[i], "empty_layer": True}
        state.layers = base + [Layer(desc.digest, diff_id, desc.media_type, desc.size)]

    def _outputs(self, desc: Descriptor) -> None:
        if not self.opts.outputs:
            return
        from store.reference import parse_reference
        from store.transfer import save_images

        # the full name, as `kiln save` writes it: "x" would load into podman as
        # localhost/x:latest, or not at all from a docker-archive ("does not contain a tag")
        for out in self.opts.outputs:
            dest = out["dest"]
            fmt = out["type"]
            stream = self.opts.output_stream if dest == "-" else None
            if fmt == "oci" and dest.endswith(".tar"):
                fmt = "oci-archive"
            if fmt == "tar":
                self._export_filesystem(desc, dest, stream)
            else:
                names = [str(parse_reference(t)) for t in
                         ([out["name"]] if out.get("name") else self.opts.tags[:1])]
                save_images(self.store, [(self.store.image_for(desc), names)], dest, fmt=fmt,
                            stream=stream)
            self.say(f"--> wrote {fmt} {'to stdout' if stream else dest}")

    def _export_filesystem(self, desc: Descriptor, dest: str, stream) -> None:
        """--output type=tar: the image's merged filesystem as one tarball (buildx's tar
        exporter), written from a read-only overlay of its layers."""
        from runtime.workspace import View, with_views
        from store.fsutil import new_file_in_place, remove_tree
        from store.layer_writer import write_layer

        image = self.store.image_for(desc)
        dirs = [self._unpacked(Layer(la.digest, la.diff_id, la.media_type, la.size))
                for la in image.layers()]
        epoch = self.opts.epoch

        def write_to(out) -> None:
            out.flush()  # the writer runs in a forked child: nothing buffered twice

            def write(root: str) -> None:
                write_layer(root, out, compression="none", source_date_epoch=epoch)
                out.flush()

            work = self.store.mkdtemp("export-")
            try:
                with_views([View(dirs, readonly=True)], write, work)
            finally:
                remove_tree(work)

        if stream is not None:
            write_to(stream)
            return
        with new_file_in_place(dest) as out:
            write_to(out)

    def _write_image(self, state: StageState, inline_cache: dict | None = None) -> Descriptor:
        if not state.layers:
            # an OCI manifest needs a layer (the image-spec schema says minItems 1): an empty one
            work, upper = self.new_upper()
            try:
                desc, diff_id = self.store.commit_layer(upper, compression=self.opts.compression,
                                                        epoch=self.opts.epoch or 0)
            finally:
                from store.fsutil import remove_tree

                remove_tree(work)
            state.layers.append(Layer(desc.digest, diff_id, desc.media_type, desc.size))
        config = dict(state.config)  # only top-level keys change below
        config["rootfs"] = {"type": "layers", "diff_ids": [la.diff_id for la in state.layers]}
        # the last step's time: a rebuild served wholly from the cache is the same image
        history = config.get("history") or []
        config["created"] = history[-1]["created"] if history and self.opts.epoch is None \
            else _now(self.opts.epoch)
        config.pop("container_config", None)
        config.pop("container", None)
        config.pop(cache.INLINE_KEY, None)  # a base image's says nothing of this one
        if inline_cache is not None:
            config[cache.INLINE_KEY] = inline_cache
        raw = canonical_json(config)
        if len(raw) > MAX_CONFIG_BYTES:
            raise BuildError(f"{self._containerfile()}: the image config would be {len(raw)} "
                             f"bytes, over the {MAX_CONFIG_BYTES} byte limit for configs "
                             "(each instruction adds a history entry)")
        if len(raw) > MAX_DOCUMENT_BYTES:
            self.say(f"[Warning] the image config is {len(raw)} bytes: kiln reads it, but "
                     f"podman and skopeo refuse configs over {MAX_DOCUMENT_BYTES} bytes")
        config_desc = self.store.put_bytes(raw, OCI_CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": config_desc.to_json(),
                    "layers": [Descriptor(la.media_type, la.digest, la.size).to_json()
                               for la in state.layers]}
        return self.store.put_bytes(canonical_json(manifest), OCI_MANIFEST)


def _step_text(inst) -> str:
    """An instruction as an error names it: its first line, shortened."""
    text = inst.original.strip().split("\n", 1)[0]
    return text if len(text) <= 80 else text[:77] + "..."


class _Locked:
    def __init__(self, target, lock: threading.Lock):
        self._target, self._lock = target, lock

    def __getattr__(self, name):
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with self._lock:
                return attr(*args, **kwargs)

        return call


def build(store: Store, opts: BuildOptions, out: TextIO | None = None) -> Descriptor:
    with store.writing():
        return Builder(store, opts, out).build()
