"""What each Containerfile instruction does to a stage (Docker's semantics).

Each handler takes (builder, stage state, instruction, plan, finished stages).
"""

from __future__ import annotations

import json
import os
import posixpath

from builder import cache
from builder.engine import DEFAULT_SHELL, Builder, BuildError, StageState
from store.fsutil import remove_tree


def _where(inst) -> str:
    return f"{inst.path}:{inst.line}"


def _arg_pairs(inst) -> list[tuple[str, str | None]]:
    from builder.stages import _arg_pairs as pairs

    return pairs(inst)


def _env(state: StageState) -> dict[str, str]:
    """What word expansion sees: the stage's ARG values, then ENV (ENV wins, as docker)."""
    env = dict(state.args)
    for e in state.run_config.get("Env") or []:
        k, _, v = e.partition("=")
        env[k] = v
    return env


def _expand(b: Builder, state: StageState, word: str, inst) -> str:
    from builder.shell import ExpansionError, expand_with_matches

    try:
        value, names = expand_with_matches(word, _env(state), escape=b.escape)
    except ExpansionError as e:
        raise BuildError(f"{_where(inst)}: {e}") from None
    b.used_args.update(n for n in names if n in state.args)
    return value


def _set_env(state: StageState, key: str, value: str) -> None:
    env = [e for e in state.run_config.get("Env") or [] if e.partition("=")[0] != key]
    env.append(f"{key}={value}")
    state.run_config["Env"] = env


def _meta_key(state: StageState, text: str) -> str:
    return cache.step_key(state.key, text)


# -- metadata ----------------------------------------------------------------------------
def env(b: Builder, state: StageState, inst, plan, results) -> None:
    parts = []
    for k, v in inst.key_values():
        value = _expand(b, state, v, inst)
        key = _expand(b, state, k, inst)
        _set_env(state, key, value)
        parts.append(f"{key}={value}")
    text = "ENV " + " ".join(parts)
    b.metadata_done(state, _meta_key(state, text), text)


def arg(b: Builder, state: StageState, inst, plan, results) -> None:
    pairs = _arg_pairs(inst)
    for name, default in pairs:
        if name in b.opts.build_args:
            value = b.opts.build_args[name]
            b.used_args.add(name)
        elif name in state.args and default is None:
            value = state.args[name]  # re-declared global ARG: takes its value
            b.used_args.add(name)
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
    new = posixpath.normpath(posixpath.join(current, path))
    state.run_config["WorkingDir"] = new
    text = f"WORKDIR {new}"
    # the directory is created (as docker) when a later RUN/COPY needs it, and here:
    key = cache.step_key(state.key, text)
    if b.cached(state, key):
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
            os.makedirs(target, 0o755, exist_ok=True)
            if user:
                u = resolve_user(user, passwd=os.path.join(root, "etc/passwd"),
                                 group=os.path.join(root, "etc/group"))
                os.chown(target, u.uid, u.gid)
            return True

        made = with_views([View(b.layer_dirs(state), upper)], make, work)
        if made:
            b.commit(state, key, upper, text)
        else:
            b.metadata_done(state, key, text)
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
    for p in words:
        ports[p if "/" in p else f"{p}/tcp"] = {}
    state.run_config["ExposedPorts"] = ports
    text = "EXPOSE " + " ".join(sorted(ports))
    b.metadata_done(state, _meta_key(state, text), text)


def volume(b: Builder, state: StageState, inst, plan, results) -> None:
    vols = state.run_config.setdefault("Volumes", {}) or {}
    for word in inst.args:
        vols[_expand(b, state, word, inst)] = {}
    state.run_config["Volumes"] = vols
    text = "VOLUME " + json.dumps(list(vols))
    b.metadata_done(state, _meta_key(state, text), text)


def _command(state: StageState, inst) -> list[str]:
    if inst.json:
        return list(inst.args)
    shell = state.run_config.get("Shell") or DEFAULT_SHELL
    return [*shell, " ".join(inst.args)]


def cmd(b: Builder, state: StageState, inst, plan, results) -> None:
    state.run_config["Cmd"] = _command(state, inst)
    text = "CMD " + json.dumps(state.run_config["Cmd"])
    b.metadata_done(state, _meta_key(state, text), text)


def entrypoint(b: Builder, state: StageState, inst, plan, results) -> None:
    state.run_config["Entrypoint"] = _command(state, inst)
    state.run_config.pop("Cmd", None)  # docker: ENTRYPOINT in a stage clears an inherited CMD
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
def run(b: Builder, state: StageState, inst, plan, results) -> None:
    from builder.parser import parse_flags

    flags = parse_flags(inst, {"mount": list, "network": str, "security": str})
    if flags.get("mount"):
        raise BuildError(f"{_where(inst)}: RUN --mount is not supported by kiln yet")
    network = flags.get("network") or b.opts.network
    if inst.heredocs and not inst.json:
        words = " ".join(inst.args).split()
        if len(inst.heredocs) != 1 or len(words) != 1 or not words[0].startswith("<<"):
            raise BuildError(f"{_where(inst)}: only `RUN <<EOF` (a script run by the shell) is "
                             "supported among heredoc forms so far")
        shell_cmd = state.run_config.get("Shell") or DEFAULT_SHELL
        argv = [*shell_cmd, inst.heredocs[0].content]
    else:
        argv = _command(state, inst)
    visible = {k: v for k, v in state.args.items()}
    b.used_args.update(visible)
    text = "RUN " + json.dumps(argv)
    history_text = "RUN " + (" ".join(inst.args) if not inst.json else json.dumps(argv))
    key = cache.step_key(state.key, text, args={k: v for k, v in visible.items()
                                                 if k not in _proxy()},
                         extra={"network": network})
    if b.cached(state, key):
        return
    work, upper = b.new_upper()
    try:
        _run_in_sandbox(b, state, argv, visible, upper, network, inst)
        b.commit(state, key, upper, history_text)
    finally:
        remove_tree(work)


def _run_in_sandbox(b: Builder, state: StageState, argv: list[str], args: dict[str, str],
                    upper: str, network: str, inst) -> None:
    from runtime.capabilities import resolve
    from runtime.cgroups import Limits, create_cgroup
    from runtime.process import Container, ContainerStartError
    from runtime.seccomp import profile_for
    from runtime.spec import ContainerSpec, ProcessSpec

    work = os.path.dirname(upper)
    env = dict(args)
    for e in state.run_config.get("Env") or []:
        k, _, v = e.partition("=")
        env[k] = v
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
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
    spec = ContainerSpec(
        id=os.path.basename(work), layers=b.layer_dirs(state), upper=upper,
        work=os.path.join(work, "work"), rootfs=os.path.join(work, "rootfs"),
        process=ProcessSpec(args=argv, env=[f"{k}={v}" for k, v in env.items()],
                            cwd=state.run_config.get("WorkingDir") or "/",
                            user=state.run_config.get("User") or ""),
        hostname="kiln-build", etc_files={"/etc/hosts": hosts, "/etc/resolv.conf": resolv},
        network=network, capabilities=caps, seccomp=profile_for(None, set(caps)),
    )
    cgroup = create_cgroup(f"kiln-build-{os.path.basename(work)[-12:]}", Limits())
    try:
        container = Container(spec, cgroup)
        try:
            container.start()
        except ContainerStartError as e:
            raise BuildError(f"{_where(inst)}: RUN {' '.join(argv)}: {e}") from None
        status = container.wait()
    finally:
        cgroup.remove()
    _drop_mount_stubs(upper, b.layer_dirs(state))
    if status.code != 0:
        raise BuildError(f"{_where(inst)}: step {b.step_no}/{b.total_steps}: RUN "
                         f"{' '.join(inst.args)[:200]} exited with code {status.code}")


_STUBS = ("etc/hosts", "etc/resolv.conf", "etc/hostname", "proc", "sys", "dev")


def _drop_mount_stubs(upper: str, lowers: list[str]) -> None:
    """Mount points the sandbox had to create are not the step's changes."""
    for rel in _STUBS:
        path = os.path.join(upper, rel)
        if not os.path.lexists(path) or any(os.path.lexists(os.path.join(d, rel))
                                            for d in lowers):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            if not os.listdir(path):
                os.rmdir(path)
        elif os.path.isfile(path) and os.path.getsize(path) == 0:
            os.unlink(path)
    etc = os.path.join(upper, "etc")
    if os.path.isdir(etc) and not os.listdir(etc) and not any(
            os.path.lexists(os.path.join(d, "etc")) for d in lowers):
        os.rmdir(etc)


def copy_(b: Builder, state: StageState, inst, plan, results, *, add: bool = False) -> None:
    from builder.copy import SourceEntry, apply_copy, plan_copy, source_entries_from_tree
    from builder.parser import parse_flags
    from runtime.workspace import View, with_views

    flags = parse_flags(inst, {"from": str, "chown": str, "chmod": str, "link": bool,
                               "parents": bool, "exclude": list, "checksum": str,
                               "keep-git-dir": bool})
    if inst.heredocs:
        raise BuildError(f"{_where(inst)}: COPY <<EOF is not supported by kiln yet")
    words = [_expand(b, state, w, inst) for w in inst.args]
    if len(words) < 2:
        raise BuildError(f"{_where(inst)}: {inst.cmd} needs at least one source and a destination")
    sources, dest = words[:-1], words[-1]
    chmod = None
    if flags.get("chmod"):
        try:
            chmod = int(flags["chmod"], 8)
        except ValueError:
            raise BuildError(f"{_where(inst)}: invalid --chmod {flags['chmod']!r} "
                             "(an octal mode such as 0755)") from None
    chown = _expand(b, state, flags["chown"], inst) if flags.get("chown") else None
    from_ref = flags.get("from")
    workdir_ = state.run_config.get("WorkingDir") or "/"
    work, upper = b.new_upper()
    try:
        views = [View(b.layer_dirs(state), upper)]
        if from_ref is not None:
            src_layers = _from_layers(b, from_ref, plan, results, inst)
            views.append(View(src_layers, readonly=True))
            content = cache.step_key("", "from", extra={"layers": src_layers,
                                                        "sources": sources})
            entries = None
        else:
            ctx = b.context_for(inst)
            selected = ctx.select(sources)
            entries = [SourceEntry(f.path, f.kind, f.mode, f.link_target) for f in selected]
            content = ctx.digest_of(selected)
        text = f"{inst.cmd} " + json.dumps({"src": sources, "dest": dest, "chown": chown,
                                            "chmod": flags.get("chmod"), "from": from_ref})
        key = cache.step_key(state.key, text, content=content, extra={"workdir": workdir_})
        if b.cached(state, key):
            return
        context_root = str(b.opts.context)

        def do_copy(root: str, src_root: str | None = None) -> int:
            from runtime.users import resolve_user

            uid = gid = 0
            if chown:
                u = resolve_user(chown, passwd=os.path.join(root, "etc/passwd"),
                                 group=os.path.join(root, "etc/group"))
                uid, gid = u.uid, u.gid
            source_root = src_root or context_root
            src_entries = entries if entries is not None else _entries_under(
                source_root, sources, source_entries_from_tree)
            actions = plan_copy(sources, dest, src_entries, workdir=workdir_, chmod=chmod)
            return apply_copy(root, source_root, actions, uid=uid, gid=gid)

        with_views(views, do_copy, work)
        created_by = f"{inst.cmd} " + " ".join(inst.args)
        b.commit(state, key, upper, created_by)
    finally:
        remove_tree(work)


def _entries_under(root: str, sources: list[str], walker) -> list:
    return walker(root)


def _from_layers(b: Builder, ref: str, plan, results, inst) -> list[str]:
    stage = plan.lookup(ref)
    if stage is not None:
        done = results.get(stage.index)
        if done is None:
            raise BuildError(f"{_where(inst)}: stage {ref!r} is not built before this step")
        return b.layer_dirs(done)
    image = b.store.image(ref)
    return [str(p) for p in b.store.unpack_image(image)]


def add(b: Builder, state: StageState, inst, plan, results) -> None:
    copy_(b, state, inst, plan, results, add=True)


HANDLERS = {
    "ENV": env, "ARG": arg, "LABEL": label, "MAINTAINER": maintainer, "WORKDIR": workdir,
    "USER": user, "EXPOSE": expose, "VOLUME": volume, "CMD": cmd, "ENTRYPOINT": entrypoint,
    "SHELL": shell, "STOPSIGNAL": stopsignal, "ONBUILD": onbuild, "HEALTHCHECK": healthcheck,
    "RUN": run, "COPY": copy_, "ADD": add,
}
