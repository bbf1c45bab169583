"""What each Containerfile instruction does to a stage (Docker's semantics).

Each handler takes (builder, stage state, instruction, plan, finished stages).
"""

from __future__ import annotations

import json
import os
import posixpath

from builder import cache
from builder.engine import DEFAULT_PATH, DEFAULT_SHELL, Builder, BuildError, StageState
from store.errors import KilnError
from store.fsutil import remove_tree


def _where(inst) -> str:
    return f"{inst.path}:{inst.line}"


def _arg_pairs(inst) -> list[tuple[str, str | None]]:
    from builder.stages import _arg_pairs as pairs

    return pairs(inst)


def _env(state: StageState):
    """What word expansion sees: the stage's ENV, then its ARG values (ENV wins, as docker).
    A view, not a copy: a step costs the same however many variables there are."""
    from collections import ChainMap

    return ChainMap(state.env, state.args)


def _expand(b: Builder, state: StageState, word: str, inst) -> str:
    from builder.shell import ExpansionError, expand_with_matches

    try:
        value, names = expand_with_matches(word, _env(state), escape=b.escape)
    except ExpansionError as e:
        raise BuildError(f"{_where(inst)}: {e}") from None
    b.charge(state, len(value))
    b.used_args.update(n for n in names if n in state.args)
    return value


def _meta_key(state: StageState, text: str) -> str:
    return cache.step_key(state.key, text)


# -- metadata ----------------------------------------------------------------------------
def env(b: Builder, state: StageState, inst, plan, results) -> None:
    # every word is expanded with the ENV as it was before this line, then all are set:
    # ``ENV A=new B=$A`` gives B the old A (BuildKit expands the whole instruction first)
    pairs = [(_expand(b, state, k, inst), _expand(b, state, v, inst))
             for k, v in inst.key_values()]
    for key, value in pairs:
        state.set_env(key, value)
    text = "ENV " + " ".join(f"{key}={value}" for key, value in pairs)
    b.metadata_done(state, _meta_key(state, text), text)


def arg(b: Builder, state: StageState, inst, plan, results) -> None:
    pairs = _arg_pairs(inst)
    for name, default in pairs:
        if name in b.opts.build_args:
            value = b.opts.build_args[name]
            b.used_args.add(name)
        elif name in state.globals and default is None:
            value = state.globals[name]  # re-declared global ARG: takes its value
        elif default is not None:
            value = _expand(b, state, default, inst)
        else:
            value = None
        if value is not None:
            state.args[name] = value
        elif name in state.args:
            del state.args[name]
    text = "ARG " + " ".join(f"{n}={state.args[n]}" if n in state.args else n
                             for n, _ in pairs if n not in _proxy())
    b.metadata_done(state, cache.step_key(state.key, text, args={
        n: state.args.get(n, "") for n, _ in pairs}), text)


def _proxy() -> frozenset[str]:
    from builder.engine import PROXY_ARGS

    return PROXY_ARGS


def label(b: Builder, state: StageState, inst, plan, results) -> None:
    labels = state.run_config.setdefault("Labels", {}) or {}
    parts = []
    for k, v in inst.key_values():
        key, value = _expand(b, state, k, inst), _expand(b, state, v, inst)
        labels[key] = value
        parts.append(f"{key}={value}")
    state.run_config["Labels"] = labels
    text = "LABEL " + " ".join(parts)
    b.metadata_done(state, _meta_key(state, text), text)


def maintainer(b: Builder, state: StageState, inst, plan, results) -> None:
    state.config["author"] = " ".join(inst.args)
    text = "MAINTAINER " + state.config["author"]
    b.metadata_done(state, _meta_key(state, text), text)


def workdir(b: Builder, state: StageState, inst, plan, results) -> None:
    path = _expand(b, state, " ".join(inst.args), inst)
    current = state.run_config.get("WorkingDir") or "/"
    # Docker keeps an absolute path as written (``/tmp/`` stays ``/tmp/``: BuildKit's
    # NormalizeWorkdir, the classic builder's normalizeWorkdir); a relative one is joined to
    # the current directory and cleaned
    new = path if path.startswith("/") else posixpath.normpath(posixpath.join(current, path))
    state.run_config["WorkingDir"] = new
    text = f"WORKDIR {new}"
    # the directory is created (as docker) when a later RUN/COPY needs it, and here:
    key = cache.step_key(state.key, text)
    if b.cached(state, key, text):
        return
    work, upper = b.new_upper()
    try:
        from runtime.workspace import View, with_views

        user = state.run_config.get("User") or ""

        def make(root: str) -> bool:
            from builder.copy import resolve_dest
            from runtime.users import resolve_user

            target = resolve_dest(root, new)
            if os.path.isdir(target):
                return False
            missing = []  # every directory WORKDIR creates belongs to USER (as buildah, BuildKit)
            path = target
            while not os.path.exists(path) and path != root:
                missing.append(path)
                path = os.path.dirname(path)
            os.makedirs(target, 0o755, exist_ok=True)
            if user:
                u = resolve_user(user, passwd=os.path.join(root, "etc/passwd"),
                                 group=os.path.join(root, "etc/group"))
                for d in missing:
                    os.chown(d, u.uid, u.gid)
            return True

        made = with_views([View(b.layer_dirs(state), upper)], make, work)
        if made:
            b.commit(state, key, upper, text)
        else:
            b.done_without_layer(state, key, text)
    finally:
        remove_tree(work)


def user(b: Builder, state: StageState, inst, plan, results) -> None:
    value = _expand(b, state, " ".join(inst.args), inst)
    state.run_config["User"] = value
    text = f"USER {value}"
    b.metadata_done(state, _meta_key(state, text), text)


def expose(b: Builder, state: StageState, inst, plan, results) -> None:
    ports = state.run_config.setdefault("ExposedPorts", {}) or {}
    from builder.shell import ExpansionError, expand_words

    try:
        words = expand_words(" ".join(inst.args), _env(state), escape=b.escape)
    except ExpansionError as e:
        raise BuildError(f"{_where(inst)}: {e}") from None
    b.charge(state, sum(map(len, words)))
    added: dict[str, None] = {}
    for word in words:
        try:
            ports_of_word = _exposed_ports(word)
        except ValueError as e:
            raise BuildError(f"{_where(inst)}: EXPOSE {_shown(word)}: {e}") from None
        b.charge(state, sum(map(len, ports_of_word)))
        added.update(dict.fromkeys(ports_of_word))
    for p in added:
        ports[p] = {}
    state.run_config["ExposedPorts"] = ports
    text = "EXPOSE " + " ".join(sorted(added))  # this step's ports, as BuildKit's history
    b.metadata_done(state, _meta_key(state, text), text)


def _exposed_ports(spec: str) -> list[str]:
    """``[ip:][hostport:]port[-port][/proto]`` -> ["port/proto", ...], as BuildKit's
    parsePortSpec: a range is one entry per port, the protocol is lowercased (tcp by
    default; tcp, udp or sctp), an address and host ports are checked and dropped."""
    rest, _, proto = spec.partition("/")
    proto = proto.lower() or "tcp"
    if proto not in ("tcp", "udp", "sctp"):
        raise ValueError(f"invalid protocol {_shown(proto)!r} (tcp, udp or sctp)")
    parts = rest.split(":")
    ip = ":".join(parts[:-2])
    host = parts[-2] if len(parts) > 1 else ""
    if not parts[-1]:
        raise ValueError("no port given")
    if ip:
        import ipaddress

        address = ip[1:-1] if ip.startswith("[") and ip.endswith("]") else ip
        try:
            if "%" in address:
                raise ValueError
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"invalid IP address {_shown(ip)!r}") from None
    start, end = _port_range(parts[-1])
    if host:
        host_start, host_end = _port_range(host)
        if host_end - host_start != end - start and end != start:
            raise ValueError(f"the port ranges {_shown(parts[-1])} and {_shown(host)} differ "
                             "in size")
    return [f"{port}/{proto}" for port in range(start, end + 1)]


def _shown(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _port_range(text: str) -> tuple[int, int]:
    """``80`` or ``8000-8002`` -> (first, last): ports 0-65535, written in decimal digits."""
    first, dash, last = text.partition("-")
    ends = [first, last] if dash else [first]
    if not all(e.isascii() and e.isdigit() and len(e.lstrip("0")) <= 5 and int(e) <= 65535
               for e in ends):
        raise ValueError(f"invalid port {_shown(text)!r} (a number 0-65535 or a range such as "
                         "8000-8010)")
    start, end = int(ends[0]), int(ends[-1])
    if end < start:
        raise ValueError(f"invalid port range {_shown(text)!r} (its end is below its start)")
    return start, end


def volume(b: Builder, state: StageState, inst, plan, results) -> None:
    vols = state.run_config.setdefault("Volumes", {}) or {}
    added = [_expand(b, state, word, inst) for word in inst.args]
    for v in added:
        vols[v] = {}
    state.run_config["Volumes"] = vols
    text = "VOLUME " + json.dumps(added)  # this step's volumes, as BuildKit's history
    b.metadata_done(state, _meta_key(state, text), text)


def _command(state: StageState, inst) -> list[str]:
    if inst.json:
        return list(inst.args)
    shell = state.run_config.get("Shell") or DEFAULT_SHELL
    return [*shell, " ".join(inst.args)]


def cmd(b: Builder, state: StageState, inst, plan, results) -> None:
    state.run_config["Cmd"] = _command(state, inst)
    state.cmd_set = True
    text = "CMD " + json.dumps(state.run_config["Cmd"])
    b.metadata_done(state, _meta_key(state, text), text)


def entrypoint(b: Builder, state: StageState, inst, plan, results) -> None:
    state.run_config["Entrypoint"] = _command(state, inst)
    if not state.cmd_set:  # an inherited CMD goes; one this stage set stays (BuildKit)
        state.run_config.pop("Cmd", None)
    text = "ENTRYPOINT " + json.dumps(state.run_config["Entrypoint"])
    b.metadata_done(state, _meta_key(state, text), text)


def shell(b: Builder, state: StageState, inst, plan, results) -> None:
    if not inst.json:
        raise BuildError(f"{_where(inst)}: SHELL requires the JSON form, e.g. "
                         'SHELL ["/bin/sh", "-c"]')
    state.run_config["Shell"] = list(inst.args)
    text = "SHELL " + json.dumps(list(inst.args))
    b.metadata_done(state, _meta_key(state, text), text)


def stopsignal(b: Builder, state: StageState, inst, plan, results) -> None:
    state.run_config["StopSignal"] = _expand(b, state, " ".join(inst.args), inst)
    text = "STOPSIGNAL " + state.run_config["StopSignal"]
    b.metadata_done(state, _meta_key(state, text), text)


def onbuild(b: Builder, state: StageState, inst, plan, results) -> None:
    inner = inst.onbuild
    text = inner.original.strip() if inner is not None else " ".join(inst.args)
    for h in (inner.heredocs if inner is not None else ()):
        # the trigger is re-parsed when it fires: it carries its heredoc bodies with it
        body = h.content if h.content.endswith("\n") else h.content + "\n"
        text += "\n" + body + h.name
    state.run_config.setdefault("OnBuild", []).append(text)
    b.metadata_done(state, _meta_key(state, "ONBUILD " + text), "ONBUILD " + text)


def healthcheck(b: Builder, state: StageState, inst, plan, results) -> None:
    from builder.parser import parse_flags

    flags = parse_flags(inst, {"interval": str, "timeout": str, "start-period": str,
                               "start-interval": str, "retries": int})
    args = list(inst.args)
    if args and args[0].upper() == "NONE":
        state.run_config["Healthcheck"] = {"Test": ["NONE"]}
    else:
        if args and args[0].upper() == "CMD":
            args = args[1:]
        if inst.json:
            test = ["CMD", *args]
        else:
            test = ["CMD-SHELL", " ".join(args)]
        hc: dict = {"Test": test}
        for flag, key in (("interval", "Interval"), ("timeout", "Timeout"),
                          ("start-period", "StartPeriod"), ("start-interval", "StartInterval")):
            if flags.get(flag):
                hc[key] = _duration_ns(flags[flag], inst)
        if flags.get("retries") is not None:
            hc["Retries"] = int(flags["retries"])
        state.run_config["Healthcheck"] = hc
    text = "HEALTHCHECK " + json.dumps(state.run_config["Healthcheck"], sort_keys=True)
    b.metadata_done(state, _meta_key(state, text), text)


def _duration_ns(text: str, inst) -> int:
    import re

    total = 0.0
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    pos = 0
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise BuildError(f"{_where(inst)}: invalid duration {text!r} (e.g. 30s, 1m30s)")
    return int(total * 1e9)


# -- filesystem steps ------------------------------------------------------------------------
def _network(b: Builder, value: str | None, inst) -> str:
    if value in (None, "", "default"):
        return b.opts.network
    if value not in ("none", "host"):
        raise BuildError(f"{_where(inst)}: RUN --network={value}: kiln knows none, host and "
                         "default")
    return value


def run(b: Builder, state: StageState, inst, plan, results) -> None:
    from builder.parser import parse_flags

    flags = parse_flags(inst, {"mount": list, "network": str, "security": str})
    network = _network(b, flags.get("network"), inst)
    workdir_ = state.run_config.get("WorkingDir") or "/"
    mounts = []
    if flags["mount"]:  # the mount code loads only for steps that use it
        from builder.mounts import MountError, check_secrets, parse_mount

        try:
            mounts = [parse_mount(text, lambda w: _expand(b, state, w, inst), workdir=workdir_)
                      for text in flags["mount"]]
            check_secrets(mounts, b.opts.secrets)
        except MountError as e:
            raise BuildError(f"{_where(inst)}: RUN --mount: {e}") from None
    scripts: dict[str, str] = {}  # heredoc files the command runs from /dev/pipes
    if inst.heredocs and not inst.json:
        argv, scripts = _heredoc_command(state, inst)
    else:
        argv = _command(state, inst)
    visible = {k: v for k, v in state.args.items()}
    # the predefined proxy args reach RUN without an ARG (and never the history or the key)
    for name in _proxy():
        if name in b.opts.build_args and name not in visible:
            visible[name] = b.opts.build_args[name]
    b.used_args.update(visible)
    text = "RUN " + json.dumps(argv)
    history_text = "RUN " + (" ".join(inst.args) if not inst.json else json.dumps(argv))
    sources = {i: _bind_source(b, m, plan, results, inst) for i, m in enumerate(mounts)
               if m.type == "bind"}
    extra: dict = {"network": network}
    if scripts:
        extra["scripts"] = scripts
    if mounts:
        # a secret is in the key by its id only; a bind by what it shows
        extra["mounts"] = [_mount_key(b, m, sources.get(i), plan, results, inst)
                           for i, m in enumerate(mounts)]
    key = cache.step_key(state.key, text, args={k: v for k, v in visible.items()
                                                 if k not in _proxy()}, extra=extra)
    b.cache_mounts.update(m.id for m in mounts if m.type == "cache" and m.sharing != "private")
    if b.cached(state, key, history_text):
        return
    work, upper = b.new_upper()
    from builder.mounts import MountError, prepared_mounts

    try:
        def seed(m, directory: str) -> bool:
            if m.from_:
                _seed_cache(b, m, directory, plan, results, inst, work)
                return True
            source = b.opts.cache_source
            return source is not None and source.fill_mount(m, directory)

        with prepared_mounts(mounts, sources, work=work, store_root=str(b.store.root),
                             context_root=str(b.opts.context), secrets=b.opts.secrets,
                             seed=seed) as prepared:
            _run_in_sandbox(b, state, argv, visible, upper, network, inst, prepared,
                            _script_binds(work, scripts, b.opts.epoch))
        b.commit(state, key, upper, history_text)
    except MountError as e:
        raise BuildError(f"{_where(inst)}: RUN --mount: {e}") from None
    finally:
        remove_tree(work)


def _heredoc_command(state: StageState, inst) -> tuple[list[str], dict[str, str]]:
    """(argv, script files) of a shell-form RUN with heredocs, as BuildKit runs it.

    A line that is a lone heredoc (``RUN <<EOF``) runs its body as the shell's command string,
    or, when the body starts with ``#!``, as an executable file /dev/pipes/<name> that the
    kernel hands to that interpreter. Any other line (``cat <<'EOF' > /f``, ``python3 <<EOF``,
    several heredocs) goes to the shell with its bodies put back below it, so the shell feeds
    them and expands an unquoted one at run time, as a shell does."""
    from builder.parser import parse_heredoc_word

    shell_cmd = state.run_config.get("Shell") or DEFAULT_SHELL
    line = inst.args[0] if inst.args else ""
    full = line + "".join(f"\n{d.content}{d.name}" for d in inst.heredocs)
    try:
        alone = parse_heredoc_word(line.strip(_SPACE)) if len(inst.heredocs) == 1 else None
    except ValueError:
        alone = None
    if alone is None:
        return [*shell_cmd, full], {}
    doc = inst.heredocs[0]
    if not doc.content.startswith("#!"):
        return [*shell_cmd, doc.content], {}
    if "/" in doc.name or doc.name in (".", ".."):
        raise BuildError(f"{_where(inst)}: heredoc name {doc.name!r} cannot be a file name")
    return [*shell_cmd, f"/dev/pipes/{doc.name}"], {doc.name: doc.content}


_SPACE = " \t\r\n\v\f"


def _script_binds(work: str, scripts: dict[str, str], epoch: int | None) -> list:
    """The heredoc scripts of a RUN, written 0755 in a directory the sandbox shows read-only at
    /dev/pipes (where BuildKit mounts them)."""
    if not scripts:
        return []
    from runtime.spec import BindMount

    directory = os.path.join(work, "pipes")
    os.mkdir(directory, 0o755)
    for name, body in scripts.items():
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(body)
        os.chmod(path, 0o755)
        if epoch is not None:
            os.utime(path, (epoch, epoch))
    return [BindMount(directory, "/dev/pipes", readonly=True)]


def _bind_source(b: Builder, m, plan, results, inst):
    """Where a bind mount's files come from: a stage's or image's layers, or the context
    (its ignore file applied, the source's symlinks resolved inside it)."""
    from builder.context import ContextError
    from builder.mounts import BindSource
    from runtime.rootfs import resolve_in_root

    if m.from_:
        return BindSource("layers", layers=tuple(_from_layers(b, m.from_, plan, results, inst)))
    root = os.path.abspath(b.opts.context)
    rel = os.path.relpath(resolve_in_root(root, m.source or "/"), root)
    rel = "" if rel == "." else rel
    try:
        entries = b.context_for(inst).select([rel or "."])
    except ContextError as e:
        raise BuildError(f"{_where(inst)}: RUN --mount source={m.source or '.'}: {e}") from None
    return BindSource("context", entries=entries, base=rel)


def _mount_key(b: Builder, m, src, plan, results, inst) -> dict:
    part = m.describe()
    if src is not None and src.kind == "context":
        prefix = src.base + "/" if src.base else ""
        names = [e.path[len(prefix):] if e.path != src.base else "." for e in src.entries]
        part["content"] = b.context_for(inst).digest_of(src.entries, dest_names=names)
    elif src is not None:
        part["layers"] = [os.path.relpath(p, b.store.root) for p in src.layers]
    elif m.type == "cache" and m.from_:
        part["layers"] = [os.path.relpath(p, b.store.root)
                          for p in _from_layers(b, m.from_, plan, results, inst)]
    return part


def _seed_cache(b: Builder, m, directory: str, plan, results, inst, work: str) -> None:
    """A new cache mount with from=: starts as a copy of that stage's (or image's) source."""
    from builder.mounts import copy_tree
    from runtime.rootfs import resolve_in_root
    from runtime.workspace import View, with_views

    layers = _from_layers(b, m.from_, plan, results, inst)

    def copy_in(root: str) -> None:
        src = resolve_in_root(root, m.source or "/")
        if not os.path.isdir(src):
            raise BuildError(f"{_where(inst)}: cache mount from={m.from_}: {m.source or '/'} "
                             "is not a directory there")
        copy_tree(src, directory)
        if m.uid is not None or m.gid is not None:
            os.chown(directory, m.uid or 0, m.gid or 0)
        if m.mode is not None:
            os.chmod(directory, m.mode)

    scratch = os.path.join(work, "seed")
    os.makedirs(scratch, exist_ok=True)
    with_views([View(layers, readonly=True)], copy_in, scratch)


def _run_in_sandbox(b: Builder, state: StageState, argv: list[str], args: dict[str, str],
                    upper: str, network: str, inst, prepared=None,
                    extra_binds: list | None = None) -> None:
    from builder.mounts import drop_mount_stubs
    from runtime.capabilities import resolve
    from runtime.cgroups import Limits, create_cgroup
    from runtime.process import Container, ContainerStartError
    from runtime.seccomp import profile_for
    from runtime.spec import ContainerSpec, ProcessSpec

    work = os.path.dirname(upper)
    env = dict(args)
    env.update(state.env)
    env.setdefault("PATH", DEFAULT_PATH)
    if prepared is not None:
        env.update(prepared.env)  # secrets given as env=: for this process only
    os.makedirs(os.path.join(work, "work"), exist_ok=True)
    os.makedirs(os.path.join(work, "rootfs"), exist_ok=True)
    hosts = os.path.join(work, "hosts")
    with open(hosts, "w") as f:
        f.write("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    resolv = os.path.join(work, "resolv.conf")
    try:
        with open("/etc/resolv.conf", "rb") as src, open(resolv, "wb") as dst:
            dst.write(src.read(1 << 16))
    except OSError:
        open(resolv, "w").close()
    caps = resolve()
    lowers = b.layer_dirs(state)
    output = b.run_output(state)
    spec = ContainerSpec(
        id=os.path.basename(work), layers=lowers, upper=upper,
        work=os.path.join(work, "work"), rootfs=os.path.join(work, "rootfs"),
        process=ProcessSpec(args=argv, env=[f"{k}={v}" for k, v in env.items()],
                            cwd=state.run_config.get("WorkingDir") or "/",
                            user=state.run_config.get("User") or "",
                            stdout=output.stdout if output else None,
                            stderr=output.stderr if output else None),
        hostname="kiln-build", etc_files={"/etc/hosts": hosts, "/etc/resolv.conf": resolv},
        network=network, capabilities=caps, seccomp=profile_for(None, set(caps)),
        binds=[*(prepared.binds if prepared is not None else ()), *(extra_binds or ())],
        tmpfs=list(prepared.tmpfs) if prepared is not None else [],
    )
    chroot = os.environ.get("KILN_ISOLATION") == "chroot"
    try:
        if chroot:  # no namespaces, no cgroup of its own (runtime.chroot)
            from runtime.cgroups import NoCgroup
            from runtime.chroot import ChrootContainer

            cgroup = NoCgroup([])
        else:
            cgroup = create_cgroup(f"kiln-build-{os.path.basename(work)[-12:]}",
                                   Limits(pids_limit=b.opts.pids_limit))
        try:
            container = ChrootContainer(spec) if chroot else Container(spec, cgroup)
            try:
                container.start()
            except ContainerStartError as e:
                raise BuildError(f"{_where(inst)}: RUN {' '.join(argv)}: {e}") from None
            finally:
                if prepared is not None:
                    prepared.forget_secrets()
                if output is not None:
                    output.started()
            status = container.wait()
            if chroot:
                container.commit()
        finally:
            cgroup.remove()
    finally:
        if output is not None:
            output.close()
    # mount points the sandbox had to make are not the step's changes (BuildKit drops its
    # mount stubs the same way)
    drop_mount_stubs(upper, lowers, [*_STUBS, *(prepared.targets if prepared else [])])
    if status.code != 0:
        b.check_cancelled()  # killed because the build stops: not this step's failure
        if output is not None and output.tail:  # -q: the failing step's output after all
            b.show_output(output.tail)
        raise BuildError(f"{_where(inst)}: step {state.step}/{b.total_steps}: RUN "
                         f"{' '.join(inst.args)[:200]} exited with code {status.code}")


_STUBS = ("/etc/hosts", "/etc/resolv.conf", "/etc/hostname", "/proc", "/sys", "/dev")


def _expand_heredoc(b: Builder, state: StageState, body: str, inst) -> str:
    """A COPY/ADD heredoc body as BuildKit expands it: ``$VAR`` and ``${...}`` work, quotes are
    kept as written, backslash escapes are processed (``\\$`` is a literal ``$``), and the
    escape character is ``\\`` whatever the escape directive says."""
    from builder.shell import MAX_WORD, ExpansionError, expand_with_matches

    out = []
    i, n = 0, len(body)
    while i < n:
        ch = body[i]
        if ch == "\\" and i + 1 < n:
            out.append(body[i:i + 2])
            i += 2
            continue
        out.append("\\" + ch if ch in "'\"" else ch)
        i += 1
    try:  # the body is text of the file: its variables may add MAX_WORD to it
        value, names = expand_with_matches("".join(out), _env(state), escape="\\",
                                           limit=len(body) + MAX_WORD)
    except ExpansionError as e:
        raise BuildError(f"{_where(inst)}: heredoc: {e.reason}") from None
    b.charge(state, len(value))
    b.used_args.update(n for n in names if n in state.args)
    return value


def copy_(b: Builder, state: StageState, inst, plan, results, *, add: bool = False) -> None:
    """COPY and ADD. ``--link`` is accepted and changes nothing: every kiln layer is already
    the diff of its step alone, independent of the layers below, which is what --link asks
    BuildKit for."""
    import hashlib

    # builder.copy, which writes the files, only on a cache miss: a hit needs just the sources
    from builder.parser import parse_flags, parse_heredoc_word
    from builder.sources import CopyError, SourceEntry, is_git, is_url, select_from_context

    allowed: dict[str, type] = {"chown": str, "chmod": str, "link": bool, "exclude": list}
    allowed.update({"checksum": str, "keep-git-dir": bool, "unpack": bool} if add else
                   {"from": str, "parents": bool})
    flags = parse_flags(inst, allowed)
    # ADD --unpack (Dockerfile 1.17): whether archives are extracted; by default local ones
    # are and downloaded ones are not
    unpack_flag = flags["unpack"] if any(f.partition("=")[0] == "--unpack"
                                         for f in inst.flags) else None
    if len(inst.args) < 2:
        raise BuildError(f"{_where(inst)}: {inst.cmd} needs at least one source and a destination")
    docs_by_name = {h.name: h for h in inst.heredocs}
    plain_words, docs = [], []
    for word in inst.args[:-1]:
        try:
            doc = parse_heredoc_word(word) if not inst.json and "<<" in word else None
        except ValueError as e:
            raise BuildError(f"{_where(inst)}: bad heredoc {word!r}: {e}") from None
        if doc is not None and doc.name in docs_by_name:
            docs.append(docs_by_name[doc.name])
        else:
            plain_words.append(word)
    try:
        dest_doc = parse_heredoc_word(inst.args[-1]) if "<<" in inst.args[-1] else None
    except ValueError:
        dest_doc = None
    if dest_doc is not None and not inst.json:
        raise BuildError(f"{_where(inst)}: a heredoc cannot be the destination of {inst.cmd}")
    sources = [_expand(b, state, w, inst) for w in plain_words]
    if add:  # downloads: a COPY needs nothing of builder.fetch (it refuses URLs)
        from builder.fetch import FetchError, fetch, parse_checksum, url_filename
    dest = _expand(b, state, inst.args[-1], inst)
    exclude = [_expand(b, state, w, inst) for w in flags["exclude"]]
    parents = bool(flags.get("parents"))
    urls = [s for s in sources if add and is_url(s)]
    for s in sources:
        if is_git(s) and (add or is_url(s)):
            raise BuildError(f"{_where(inst)}: {inst.cmd} {s}: git sources are not supported "
                             "by kiln yet")
        if not add and is_url(s):
            raise BuildError(f"{_where(inst)}: COPY {s}: source can't be a URL for COPY (use ADD)")
    local = [s for s in sources if s not in urls]
    unpack_local = add if unpack_flag is None else unpack_flag
    checksum = _expand(b, state, flags["checksum"], inst) if flags.get("checksum") else None
    if checksum is not None:
        if len(sources) + len(docs) != 1 or not urls:
            raise BuildError(f"{_where(inst)}: ADD --checksum needs exactly one source, an "
                             "http(s) URL")
        try:
            parse_checksum(checksum)
        except FetchError as e:
            raise BuildError(f"{_where(inst)}: {e}") from None
    total = len(sources) + len(docs)
    if total > 1 and not parents and not dest.endswith(("/", "/.")):
        raise BuildError(f"{_where(inst)}: when using {inst.cmd} with more than one source "
                         f"file, the destination must be a directory and end with a / "
                         f"(got {dest!r})")
    for h in docs:
        if "/" in h.name:
            raise BuildError(f"{_where(inst)}: heredoc name {h.name!r} cannot be a file name")
    chmod = None
    if flags.get("chmod"):
        from builder.chmod import ChmodError, parse_chmod

        value = _expand(b, state, flags["chmod"], inst)
        try:
            chmod = parse_chmod(value)
        except ChmodError as e:
            raise BuildError(f"{_where(inst)}: invalid --chmod {value!r}: {e}") from None
    dir_mode = chmod.created_dir_mode if chmod else 0o755
    chown = _expand(b, state, flags["chown"], inst) if flags.get("chown") else None
    from_ref = flags.get("from")
    workdir_ = state.run_config.get("WorkingDir") or "/"
    bodies = [(h.name, _expand_heredoc(b, state, h.content, inst) if h.expand else h.content)
              for h in docs]
    work = upper = None  # made on a cache miss (or for a download): a hit writes nothing
    try:
        content_parts: list = []
        context_actions = None
        src_layers = None
        if from_ref is not None:
            src_layers = _from_layers(b, from_ref, plan, results, inst)
            content_parts.append(["from", [os.path.relpath(p, b.store.root) for p in src_layers]])
        elif local:
            ctx = b.context_for(inst)
            try:
                # the sources' own symlinks are followed inside the context (BuildKit),
                # but not by --parents, which copies what its patterns match as it is
                selected = select_from_context(ctx, local, follow_links=not parents,
                                               parents=parents)
                dirs = _context_dirs(ctx, local, selected, parents)
                if parents:  # recreated with their modes: part of what the step copies
                    selected = sorted(selected + dirs, key=lambda f: f.path.encode(
                        "utf-8", "surrogateescape"))
                entry_files = selected if parents else selected + dirs
                if parents or exclude:
                    from builder.copy import plan_copy

                    entries = [SourceEntry(f.path, f.kind, f.mode, f.link_target)
                               for f in entry_files]
                    context_actions = plan_copy(local, dest, entries, workdir=workdir_,
                                                chmod=chmod, parents=parents, exclude=exclude,
                                                unpack=unpack_local, force_dir=total > 1)
                    used = {a.src for a in context_actions if a.src}
                    selected = [f for f in selected if f.path in used or f.kind == "dir"]
                # else everything selected is copied: the plan waits for a cache miss
            except (CopyError, KilnError) as e:
                raise BuildError(f"{_where(inst)}: {e}") from None
            content_parts.append(["context", ctx.digest_of(selected)])
            links = ctx.hardlink_groups(selected)
            if links:  # the copy keeps them: their structure is part of what it makes
                content_parts.append(["links", links])
        fetched = {}
        for url in urls:
            if checksum is not None:
                content_parts.append(["url", url_filename(url), checksum])
                continue
            b.made_nothing = False  # what the URL serves may change: no builder.memo
            if work is None:
                work, upper = b.new_upper()
            try:
                got = fetch(url, os.path.join(work, f"fetch{len(fetched)}"),
                            cache_dir=str(b.store.cache_dir), tmp_dir=str(b.store.tmp),
                            conditional=not b.opts.no_cache)
            except FetchError as e:
                raise BuildError(f"{_where(inst)}: {e}") from None
            fetched[url] = got
            content_parts.append(["url", got.filename, got.digest])
        for name, body in bodies:
            content_parts.append(["heredoc", name, hashlib.sha256(
                body.encode("utf-8", "surrogateescape")).hexdigest()])
        described = {
            "src": sources, "heredocs": [h.name for h in docs], "dest": dest, "chown": chown,
            "chmod": flags.get("chmod"), "from": from_ref, "parents": parents or None,
            "exclude": exclude or None, "checksum": checksum}
        if unpack_flag is not None:  # only then: the keys of other steps stay as they were
            described["unpack"] = unpack_flag
        text = f"{inst.cmd} " + json.dumps(described)
        content = hashlib.sha256(json.dumps(content_parts).encode()).hexdigest()
        key = cache.step_key(state.key, text, content=content, extra={"workdir": workdir_})
        created_by = f"{inst.cmd} " + " ".join(inst.args)
        parent_key = state.key
        if b.cached(state, key, created_by):
            return
        if work is None:
            work, upper = b.new_upper()
        from builder.copy import apply_copy, plan_copy

        file_reuse = lineage = None
        if not add and local and from_ref is None and not urls and not docs \
                and not b.opts.no_cache:  # see builder.reuse
            from builder import reuse

            lineage = reuse.lineage_key(parent_key, text, workdir_)
            file_reuse = reuse.FileReuse({f.path: f.digest for f in selected if f.digest},
                                         upper=upper)
            earlier = reuse.load(b.store, lineage)
            if earlier is not None:
                file_reuse.earlier_dir, file_reuse.earlier = earlier

        if local and from_ref is None and context_actions is None:
            try:
                entries = [SourceEntry(f.path, f.kind, f.mode, f.link_target)
                           for f in entry_files]
                context_actions = plan_copy(local, dest, entries, workdir=workdir_, chmod=chmod,
                                            unpack=unpack_local, force_dir=total > 1)
            except (CopyError, KilnError) as e:
                raise BuildError(f"{_where(inst)}: {e}") from None
        singles = []  # (source root, actions): downloads and heredoc files
        for i, url in enumerate(urls):
            got = fetched.get(url)
            if got is None or got.path is None:
                try:
                    got = fetch(url, os.path.join(work, f"fetch{i}-get"), checksum=checksum,
                                cache_dir=str(b.store.cache_dir), tmp_dir=str(b.store.tmp))
                except FetchError as e:
                    raise BuildError(f"{_where(inst)}: {e}") from None
            singles.append((os.path.dirname(got.path), _plan_single(
                plan_copy, got.filename, 0o600, dest, workdir_, chmod, total > 1,
                unpack=bool(unpack_flag))))
        for i, (name, body) in enumerate(bodies):
            directory = os.path.join(work, f"heredoc{i}")
            os.mkdir(directory, 0o700)
            with open(os.path.join(directory, name), "w", encoding="utf-8",
                      errors="surrogateescape") as f:
                f.write(body)
            if b.opts.epoch is not None:
                os.utime(os.path.join(directory, name), (b.opts.epoch, b.opts.epoch))
            singles.append((directory, _plan_single(plan_copy, name, 0o644, dest, workdir_,
                                                    chmod, total > 1)))
        context_root = str(b.opts.context)

        # where a missing source was looked for
        source_name = "the build context" if from_ref is None else \
            f"stage {from_ref}" if plan.lookup(from_ref) is not None else f"image {from_ref}"

        def do_copy(root: str, src_root: str | None = None):
            try:
                return copy_in(root, src_root)
            except OSError as e:  # not a traceback from the workspace process
                raise CopyError(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"
                                ) from None

        def copy_in(root: str, src_root: str | None):
            """Runs in the workspace process; returns the bytes copied, the warnings and
            what the copy left for file_reuse.link_into."""
            from builder.chown import ChownError, resolve_owner
            from builder.copy import source_entries_from_tree, tree_entries_for

            uid = gid = 0
            warnings: tuple[str, ...] = ()
            if chown:
                try:
                    owner = resolve_owner(chown, root)
                except ChownError as e:
                    raise CopyError(f"{inst.cmd} --chown: {e}") from None
                uid, gid, warnings = owner.uid, owner.gid, owner.warnings
            copied = 0
            if src_root is not None and local:
                # --parents needs the directories above its sources: the whole tree
                tree = source_entries_from_tree(src_root) if parents else \
                    tree_entries_for(src_root, local)
                actions = plan_copy(local, dest, tree, workdir=workdir_, chmod=chmod,
                                    parents=parents, exclude=exclude, force_dir=total > 1,
                                    source_name=source_name)
                # another stage's files keep their owners unless --chown (moby/moby#38599)
                copied += apply_copy(root, src_root, actions, uid=uid, gid=gid,
                                     keep_owner=not chown, dir_mode=dir_mode)
            archive_owner = (uid, gid) if chown else None
            if context_actions is not None:
                copied += apply_copy(root, context_root, context_actions, uid=uid, gid=gid,
                                     archive_owner=archive_owner, dir_mode=dir_mode,
                                     reuse=file_reuse)
            for source_root, actions in singles:
                copied += apply_copy(root, source_root, actions, uid=uid, gid=gid,
                                     archive_owner=archive_owner, dir_mode=dir_mode)
            return copied, warnings, file_reuse

        from runtime.workspace import View, with_views

        views = [View(b.layer_dirs(state), upper)]
        if src_layers is not None:
            views.append(View(src_layers, readonly=True))
        try:
            _, warnings, file_reuse = with_views(views, do_copy, work)
            if file_reuse is not None:
                file_reuse.link_into()
        except KilnError as e:  # the copy's, --chown's, the workspace's: all at this line
            raise BuildError(f"{_where(inst)}: {e}") from None
        for warning in warnings:
            b.say_stage(state, f"[Warning] {_where(inst)}: {inst.cmd} --chown: {warning}")
        b.commit(state, key, upper, created_by,
                 reuse=(lineage, file_reuse.written) if file_reuse is not None else None)
    finally:
        if work is not None:
            remove_tree(work)


def _plan_single(plan_copy, name: str, mode: int, dest: str, workdir_: str, chmod, force_dir,
                 *, unpack: bool = False):
    from builder.sources import SourceEntry

    return plan_copy([name], dest, [SourceEntry(name, "file", mode)], workdir=workdir_,
                     chmod=chmod, force_dir=force_dir, unpack=unpack)


def _context_dirs(ctx, sources: list[str], selected: list, parents: bool) -> list:
    """Context directories a COPY plan needs that ``select`` does not name: the one each glob
    is matched in (an empty wildcard there is no error) and, with --parents, every directory
    above a selected entry (the copy recreates them with their modes)."""
    from builder import globs
    from builder.sources import follow

    want: set[str] = set()
    for src in sources:
        if parents:
            pivot, sep, _ = src.partition("/./")
            want.add(globs.split_wildcards(globs.clean(pivot if sep else ""))[0])
        elif globs.has_wildcards(src):  # where its fixed part's symlinks lead (as COPY does)
            want.add(follow(globs.split_wildcards(globs.clean(src))[0], ctx.link_target).path)
    if parents:
        for f in selected:
            parent = f.path.rpartition("/")[0]
            while parent and parent not in want:
                want.add(parent)
                parent = parent.rpartition("/")[0]
    if not want:
        return []
    have = {f.path for f in selected}
    found = [ctx.entry(d) for d in sorted(want - have) if d]
    return [f for f in found if f is not None and f.kind == "dir"]


def _from_layers(b: Builder, ref: str, plan, results, inst) -> list[str]:
    stage = plan.lookup(ref)
    if stage is not None:
        done = results.get(stage.index)
        if done is None:
            raise BuildError(f"{_where(inst)}: stage {ref!r} is not built before this step")
        return b.layer_dirs(done)
    image = b._store_image(ref)
    return [str(p) for p in b.store.unpack_image(image)]


def add(b: Builder, state: StageState, inst, plan, results) -> None:
    copy_(b, state, inst, plan, results, add=True)


HANDLERS = {
    "ENV": env, "ARG": arg, "LABEL": label, "MAINTAINER": maintainer, "WORKDIR": workdir,
    "USER": user, "EXPOSE": expose, "VOLUME": volume, "CMD": cmd, "ENTRYPOINT": entrypoint,
    "SHELL": shell, "STOPSIGNAL": stopsignal, "ONBUILD": onbuild, "HEALTHCHECK": healthcheck,
    "RUN": run, "COPY": copy_, "ADD": add,
}
