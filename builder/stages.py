"""Stages of a Containerfile: names, bases, ARG scopes, dependencies, --target pruning."""

from __future__ import annotations

from dataclasses import dataclass, field

from builder.engine import BuildError

# Stages in one Containerfile. Real files have a handful, generated ones a few dozen; each
# stage that is built costs a base image lookup and a copy of its parent's config, so a
# file of 100,000 FROM lines is refused here rather than built for an hour.
MAX_STAGES = 1000


@dataclass
class Stage:
    index: int
    name: str | None
    base: str  # expanded FROM image, "scratch", or the name of an earlier stage
    base_stage: int | None  # index of the stage FROM refers to, if any
    from_inst: object
    instructions: list = field(default_factory=list)
    # global ARGs this stage can re-declare: the one dict of the plan, never changed once
    # the first FROM is read
    args: dict[str, str] = field(default_factory=dict)
    deps: set[int] = field(default_factory=set)

    @property
    def label(self) -> str:
        return self.name or str(self.index)

    @property
    def from_line(self) -> str:
        return self.from_inst.original.strip()


@dataclass
class Plan:
    stages: list[Stage]
    target: Stage
    needed: list[Stage]  # in build order
    global_args: dict[str, str]
    declared_globals: set[str] = field(default_factory=set)
    text_chars: int = 0  # what expanding the global ARGs and FROM lines made

    def lookup(self, ref: str) -> Stage | None:
        for s in self.stages:
            if s.name is not None and s.name == ref.lower():
                return s
        if ref.isdigit() and int(ref) < len(self.stages):
            return self.stages[int(ref)]
        return None


class _Budget:
    """What expanding the global ARGs and FROM lines makes: the first part of the build's
    MAX_BUILD_TEXT."""

    def __init__(self) -> None:
        self.chars = 0

    def expand(self, word: str, args: dict[str, str], escape: str, inst, what: str = "") -> str:
        from builder.engine import MAX_BUILD_TEXT
        from builder.shell import ExpansionError, expand_word

        try:
            value = expand_word(word, args, escape=escape)
        except ExpansionError as e:
            raise BuildError(f"{_where(inst)}: {what}{e}") from None
        self.chars += len(value)
        if self.chars > MAX_BUILD_TEXT:
            raise BuildError(f"{_where(inst)}: the global ARGs and FROM lines expand to more "
                             f"than {MAX_BUILD_TEXT >> 20} MiB (kiln's limit); is an ARG value "
                             "growing on every line?")
        return value


def _check_platform(inst, wanted: str, args: dict[str, str], escape: str,
                    budget: _Budget) -> None:
    """FROM --platform: kiln builds for the host only (no emulation), so another platform
    is a clear error rather than a host image under the wrong name."""
    value = budget.expand(wanted, args, escape, inst, "--platform: ")
    host = platform_args()["BUILDPLATFORM"]
    parts, have = value.split("/"), host.split("/")
    if parts[:2] != have[:2] or (len(parts) > 2 and len(have) > 2 and parts[2] != have[2]):
        raise BuildError(f"{_where(inst)}: FROM --platform={value}: kiln builds for the host "
                         f"platform ({host}) only; it has no emulator for {value}")


def platform_args() -> dict[str, str]:
    """BuildKit's automatic platform ARGs (global scope; a stage re-declares them to use
    them). kiln builds for the host, so target and build platform are the same."""
    from store.store import host_platform

    p = host_platform()
    platform = f"{p['os']}/{p['architecture']}" + (f"/{p['variant']}" if "variant" in p else "")
    values = {"OS": p["os"], "ARCH": p["architecture"], "VARIANT": p.get("variant", ""),
              "PLATFORM": platform}
    out = {f"TARGET{k}": v for k, v in values.items()}
    out.update({f"BUILD{k}": v for k, v in values.items()})
    return out


def _where(inst) -> str:
    return f"{inst.path}:{inst.line}"


def _arg_pairs(inst) -> list[tuple[str, str | None]]:
    out = []
    for word in inst.args:
        name, eq, value = word.partition("=")
        out.append((name, value if eq else None))
    return out


def plan_stages(df, *, build_args: dict[str, str], target: str | None,
                image_exists=None) -> Plan:
    """``image_exists(ref) -> bool`` lets a ``--from`` that is neither a stage nor a known
    image fail here, with its file:line, before any step runs."""
    from builder.parser import parse_flags

    global_args: dict[str, str] = platform_args()
    budget = _Budget()
    declared: set[str] = set()
    stages: list[Stage] = []
    by_name: dict[str, Stage] = {}  # stages named so far
    # where each name is first given to a stage: a --from to a name given later is circular
    named_at = {inst.args[2].lower(): i for i, inst in reversed(list(enumerate(df.instructions)))
                if inst.cmd == "FROM" and len(inst.args) == 3}
    current: Stage | None = None
    for position, inst in enumerate(df.instructions):
        if inst.cmd == "FROM":
            words = list(inst.args)
            wanted = parse_flags(inst, {"platform": str})["platform"]
            if wanted:
                _check_platform(inst, wanted, global_args, df.escape, budget)
            if len(words) not in (1, 3) or (len(words) == 3 and words[1].lower() != "as"):
                raise BuildError(f"{_where(inst)}: FROM takes IMAGE [AS NAME]")
            base = budget.expand(words[0], global_args, df.escape, inst)
            if not base:
                raise BuildError(f"{_where(inst)}: FROM names no image (an ARG expanded to "
                                 "nothing?)")
            name = words[2].lower() if len(words) == 3 else None
            if name is not None and name in by_name:
                raise BuildError(f"{_where(inst)}: duplicate stage name {name!r}")
            parent = by_name.get(base.lower())
            base_stage = parent.index if parent is not None else None
            if len(stages) >= MAX_STAGES:
                raise BuildError(f"{_where(inst)}: more than {MAX_STAGES} stages (kiln's "
                                 "limit for one Containerfile)")
            current = Stage(len(stages), name, base if base_stage is None else base.lower(),
                            base_stage, inst, args=global_args)
            if base_stage is not None:
                current.deps.add(base_stage)
            stages.append(current)
            if name is not None:
                by_name[name] = current
            continue
        if current is None:
            if inst.cmd != "ARG":
                raise BuildError(f"{_where(inst)}: {inst.cmd} before the first FROM "
                                 "(only ARG may come first)")
            for name, default in _arg_pairs(inst):
                declared.add(name)
                if name in build_args:
                    global_args[name] = build_args[name]
                elif default is not None:
                    global_args[name] = budget.expand(default, global_args, df.escape, inst)
            continue
        current.instructions.append(inst)
        for ref in _stage_refs(inst):
            dep = _find_before(stages, by_name, ref)
            if dep is None and ref.isdigit():
                raise BuildError(f"{_where(inst)}: --from={ref}: there is no stage {ref} "
                                 "before this one")
            if dep is None and current.name is not None and current.name == ref.lower():
                raise BuildError(f"{_where(inst)}: --from={ref} refers to its own stage "
                                 "(circular dependency)")
            if dep is None and named_at.get(ref.lower(), -1) > position:
                raise BuildError(f"{_where(inst)}: --from={ref} refers to a later stage "
                                 "(circular dependency)")
            if dep is not None:
                current.deps.add(dep.index)
            elif image_exists is not None and not image_exists(ref):
                raise BuildError(f"{_where(inst)}: --from={ref}: no stage of that name before "
                                 "this one, and no such image in the store")
    if not stages:
        raise BuildError(f"{df.path}: no FROM instruction")
    # stages' ARG defaults: the global values (re-declared with ARG inside a stage)
    chosen = stages[-1]
    if target is not None:
        chosen = _find(stages, target)
        if chosen is None:
            names = ", ".join(s.name for s in stages if s.name) or "none named"
            raise BuildError(f"target stage {target!r} not found (stages: {names})")
    needed_ix: set[int] = set()
    todo = [chosen.index]
    while todo:
        i = todo.pop()
        if i in needed_ix:
            continue
        needed_ix.add(i)
        todo.extend(stages[i].deps)
    needed = [s for s in stages if s.index in needed_ix]
    return Plan(stages, chosen, needed, global_args, declared, budget.chars)


def _find(stages: list[Stage], ref: str) -> Stage | None:
    for s in stages:
        if s.name is not None and s.name == ref.lower():
            return s
    if ref.isdigit() and int(ref) < len(stages):
        return stages[int(ref)]
    return None


def _find_before(stages: list[Stage], by_name: dict[str, Stage], ref: str) -> Stage | None:
    """The stage ``ref`` names among those before the last one (the current stage)."""
    s = by_name.get(ref.lower())
    if s is not None and s is not stages[-1]:
        return s
    if ref.isdigit() and int(ref) < len(stages) - 1:
        return stages[int(ref)]
    return None


def _stage_refs(inst) -> list[str]:
    refs = []
    for flag in inst.flags:
        if flag.startswith("--from="):
            refs.append(flag[len("--from="):])
        elif flag.startswith("--mount="):
            for part in flag[len("--mount="):].split(","):
                if part.startswith("from="):
                    refs.append(part[5:])
    return refs
