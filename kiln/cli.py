"""The ``kiln`` command: global options, error printing, exit codes.

Command modules import their heavy dependencies inside the command bodies,
so ``kiln --help`` and the hot paths start quickly.

``kiln run`` and ``kiln build`` go further: click costs them more than starting a
container or a no-op rebuild does, so when their arguments are of the plain kinds
``parse_run_args`` and ``parse_build_args`` know (the options as written out by
``--help``, with their values), they run without click. Any other command line
(``--help``, a mistake, anything unusual) goes to click, which parses, runs or reports
it as for every other command.
"""

from __future__ import annotations

import os
import sys

from kiln import __version__

EXIT_KILN_ERROR = 125  # podman's convention for kiln's own failures
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command that Ctrl-C stopped


class Context:
    def __init__(self, root: str | None):
        self.root_arg = root
        self._store = None

    @property
    def store(self):
        if self._store is None:
            from store.store import Store

            self._store = Store(self.root_arg)
        return self._store


# command name -> module that defines it; a module is imported only when one of its
# commands runs (or --help lists them), keeping `kiln run` and no-op builds quick to start
COMMANDS = {
    "import": "image_commands", "images": "image_commands", "tag": "image_commands",
    "rmi": "image_commands", "inspect": "image_commands", "history": "image_commands",
    "save": "image_commands", "load": "image_commands", "prune": "image_commands",
    "run": "container_commands", "ps": "container_commands", "rm": "container_commands",
    "logs": "container_commands", "stop": "container_commands", "kill": "container_commands",
    "wait": "container_commands", "exec": "container_commands",
    "pause": "container_commands", "unpause": "container_commands",
    "top": "container_commands", "stats": "container_commands",
    "start": "container_commands", "restart": "container_commands",
    "build": "build_commands",
    "pull": "registry_commands", "push": "registry_commands", "copy": "registry_commands",
    "login": "registry_commands", "logout": "registry_commands",
    "key": "sign_commands", "sign": "sign_commands", "verify": "sign_commands",
    "network": "network_commands", "port": "network_commands",
    "version": "system_commands", "info": "system_commands", "system": "system_commands",
}


def __getattr__(name: str):
    """``cli`` (the click group) and ``LazyGroup``: defined, and click imported, on first use."""
    if name in ("cli", "LazyGroup"):
        _define_click_group()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_click_group() -> None:
    import click

    class LazyGroup(click.Group):
        def list_commands(self, ctx: click.Context) -> list[str]:
            return sorted(COMMANDS)

        def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
            module = COMMANDS.get(name)
            if module is None:
                return None
            import importlib

            return importlib.import_module(f"kiln.{module}").COMMANDS[name]

    @click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, "--version", prog_name="kiln",
                          message="%(prog)s %(version)s")
    @click.option("--root", envvar="KILN_ROOT", metavar="DIR",
                  help="Store directory (default /var/lib/kiln as root, $XDG_DATA_HOME/kiln "
                       "otherwise; env KILN_ROOT).")
    @click.pass_context
    def cli(ctx: click.Context, root: str | None) -> None:
        """kiln: build, store, run and ship OCI images without a daemon."""
        ctx.obj = Context(root)

    globals().update(LazyGroup=LazyGroup, cli=cli)


def echo_error(message: str) -> None:
    """click.echo(message, err=True) without importing click unless the text needs it (click
    strips ANSI escapes when stderr is no terminal)."""
    if "\x1b" in message:
        import click

        click.echo(message, err=True)
        return
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def fail(message: str) -> None:
    echo_error(f"kiln: error: {message}")
    sys.exit(EXIT_KILN_ERROR)


# -- Ctrl-C and SIGTERM -----------------------------------------------------------------
# Being stopped is no failure of kiln's: kiln says so in one line and exits 128 + the
# signal, 130 (`kiln: interrupted`) for a Ctrl-C, 143 (`kiln: terminated`) for the SIGTERM
# with which CI systems cancel a job. Under click (every command but the fast `kiln run`,
# which forwards both to its container, as docker does) the first of them stops kiln's
# threads (store.interrupt: each at its next chunk, a blocked read or a retry's wait at
# once) and raises store.interrupt.Interrupted in the main thread: it unwinds through
# every clean-up, and click, which answers a KeyboardInterrupt with a blank line and an
# Abort, lets it pass. An error on that way out (a helper killed mid-copy, a clean-up
# racing a thread) is the interrupt too. Further signals change nothing, and however the
# clean-up goes (a thread blocked in a connect, a big layer being compressed) kiln leaves
# INTERRUPT_GRACE seconds later: what it leaves in tmp/ goes at the store's next use.
# `_signal`: the signal module's enums would cost every start-up.
INTERRUPT_GRACE = 3.0
STOPPED_BY = {2: "kiln: interrupted", 15: "kiln: terminated"}  # SIGINT, SIGTERM
_interrupt = {"signum": 0, "unreported": True}


def _on_signal(signum, _frame) -> None:
    if _interrupt["signum"]:
        return
    _interrupt["signum"] = signum
    import threading

    from store import interrupt  # imported with the handler's installation

    threading.Thread(target=_leave_after, args=(INTERRUPT_GRACE,), name="kiln-interrupted",
                     daemon=True).start()
    interrupt.stop(signum)
    raise interrupt.Interrupted(signum)


def _leave_after(seconds: float) -> None:
    import time

    time.sleep(seconds)
    signum = _interrupt["signum"]
    if _interrupt.pop("unreported", False):  # pop: one thread only says it
        os.write(2, STOPPED_BY[signum].encode() + b"\n")
    os._exit(128 + signum)


def interrupted(signum: int | None = None) -> None:
    """Report the signal that stopped kiln (the first one) and exit with 128 + it."""
    import _signal

    for sig in STOPPED_BY:  # another signal changes nothing now
        _signal.signal(sig, _signal.SIG_IGN)
    signum = _interrupt["signum"] or signum or _signal.SIGINT
    if _interrupt.pop("unreported", False):
        echo_error(STOPPED_BY[signum])
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            echo_error(e.code)
    except KeyboardInterrupt:  # another Ctrl-C (fast path) while the first was reported
        code = EXIT_INTERRUPTED
        if _interrupt.pop("unreported", False):
            echo_error("kiln: interrupted")
    # Every file kiln writes is closed (and fsynced where it matters) by now; skipping
    # the interpreter's teardown saves tens of milliseconds on each kiln run.
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass
    os._exit(code)


def _main(argv: list[str] | None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if args == ["--version"]:  # scripts ask this often: click's import is 20 ms of it
            sys.stdout.write(f"kiln {__version__}\n")
            sys.exit(0)
        if os.geteuid() != 0 and _needs_user_namespace(args):
            from runtime import rootless

            rootless.enter()
        fast = parse_run_args(args)
        if fast is not None:
            root, params = fast
            run_and_exit(root, params)
        fast = parse_build_args(args)
        if fast is not None:
            root, params = fast
            build_and_exit(root, params)
        fast = parse_exec_args(args)
        if fast is not None:
            root, params = fast
            exec_and_exit(root, params)
        _click_main(args)
    except KeyboardInterrupt:
        interrupted()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_KILN_ERROR)
    except Exception as e:  # KilnError and OSError become one line; anything else is a bug
        from store.errors import KilnError

        if _interrupt["signum"]:
            interrupted()
        if isinstance(e, KilnError):
            fail(str(e))
        if isinstance(e, OSError):
            fail(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}")
        raise
    except BaseException as e:  # SystemExit, or our signal handler's Interrupted
        stop = sys.modules.get("store.interrupt")  # imported with the handler, not for run
        if stop is not None and isinstance(e, stop.Interrupted):
            interrupted(e.signum)
        raise
    sys.exit(0)


# commands that touch neither the store's layers nor containers: no user namespace for them
_OUTSIDE_NAMESPACE = {"login", "logout", "version", "help"}


def _needs_user_namespace(args: list[str]) -> bool:
    """Whether a non-root kiln call joins the user's namespace (runtime.rootless) first."""
    if "--help" in args or "-h" in args or not args:
        return False
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 1 if "=" in args[i] else 2  # the only global option is --root DIR
    return i < len(args) and args[i] not in _OUTSIDE_NAMESPACE


def _catch_stop_signals() -> None:
    import _signal

    import store.interrupt  # noqa: F401 - for _on_signal, which should not import

    # not where the signal is ignored (nohup, a shell's background job without job control)
    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
        _signal.signal(_signal.SIGINT, _on_signal)
    if _signal.getsignal(_signal.SIGTERM) == _signal.SIG_DFL:
        _signal.signal(_signal.SIGTERM, _on_signal)


def _click_main(args: list[str]) -> None:
    import click

    if "cli" not in globals():
        _define_click_group()
    _catch_stop_signals()
    try:
        globals()["cli"].main(args=args, prog_name="kiln", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort as e:  # click's word for a KeyboardInterrupt (or EOF at a prompt)
        if _interrupt["signum"] or isinstance(e.__cause__, KeyboardInterrupt):
            interrupted()
        fail("aborted")
    except click.ClickException as e:
        hint = ""
        if isinstance(e, click.UsageError) and e.ctx is not None:
            hint = f" (see '{e.ctx.command_path} --help')"
        fail(e.format_message() + hint)


# -- kiln run without click ---------------------------------------------------------------
# option -> (parameter, kind): kind "flag", "value" (the last one given counts) or "multiple";
# the same options as the click command in container_commands (a test holds them equal)
RUN_OPTIONS = {
    "--rm": ("remove", "flag"),
    "-i": ("interactive", "flag"), "--interactive": ("interactive", "flag"),
    "-t": ("tty", "flag"), "--tty": ("tty", "flag"),
    "-e": ("env", "multiple"), "--env": ("env", "multiple"),
    "--env-file": ("env_file", "multiple"),
    "--entrypoint": ("entrypoint", "value"),
    "-w": ("workdir", "value"), "--workdir": ("workdir", "value"),
    "-u": ("user", "value"), "--user": ("user", "value"),
    "-h": ("hostname", "value"), "--hostname": ("hostname", "value"),
    "--name": ("name", "value"),
    "--read-only": ("read_only", "flag"),
    "-v": ("volumes", "multiple"), "--volume": ("volumes", "multiple"),
    "--tmpfs": ("tmpfs", "multiple"),
    "--network": ("network", "value"), "--net": ("network", "value"),
    "--cap-add": ("cap_add", "multiple"), "--cap-drop": ("cap_drop", "multiple"),
    "--privileged": ("privileged", "flag"),
    "--security-opt": ("security_opt", "multiple"),
    "--init": ("init", "flag"),
    "-m": ("memory", "value"), "--memory": ("memory", "value"),
    "--memory-swap": ("memory_swap", "value"),
    "--cpus": ("cpus", "value"),
    "-c": ("cpu_shares", "value"), "--cpu-shares": ("cpu_shares", "value"),
    "--pids-limit": ("pids_limit", "value"),
    "--stop-timeout": ("stop_timeout", "value"),
    "--verify-key": ("verify_keys", "multiple"),
    "--signature-policy": ("signature_policy", "value"),
    "-p": ("publish", "multiple"), "--publish": ("publish", "multiple"),
    "-P": ("publish_all", "flag"), "--publish-all": ("publish_all", "flag"),
    "--ip": ("ip", "value"),
    "--dns": ("dns", "multiple"),
    "--add-host": ("add_host", "multiple"),
    "--network-alias": ("network_alias", "multiple"),
    "-d": ("detach", "flag"), "--detach": ("detach", "flag"),
    "--restart": ("restart", "value"),
    "--memory-reservation": ("memory_reservation", "value"),
    "--cpuset-cpus": ("cpuset_cpus", "value"), "--cpuset-mems": ("cpuset_mems", "value"),
    "--ulimit": ("ulimit", "multiple"), "--shm-size": ("shm_size", "value"),
    "--sysctl": ("sysctl", "multiple"), "--oom-score-adj": ("oom_score_adj", "value"),
    "--cgroup-parent": ("cgroup_parent", "value"),
    "--blkio-weight": ("blkio_weight", "value"),
    "--device-read-bps": ("device_read_bps", "multiple"),
    "--device-write-bps": ("device_write_bps", "multiple"),
    "--device": ("device", "multiple"),
    "--userns": ("userns", "value"),
}
RUN_DEFAULTS = {"stop_timeout": 10.0}


def _command_start(args: list[str], command: str) -> tuple[str | None, int] | None:
    """``[--root DIR] COMMAND ...``: (the root given or None, the index after COMMAND)."""
    root = None
    i = 0
    while i < len(args) and args[i] != command:
        arg = args[i]
        if arg == "--root" and i + 1 < len(args):
            root = args[i + 1]
            i += 2
        elif arg.startswith("--root="):
            root = arg[len("--root="):]
            i += 1
        else:
            return None
    if i == len(args):
        return None
    return root, i + 1


def _parse_options(args: list[str], i: int, options: dict, params: dict, *,
                   interspersed: bool) -> list[str] | None:
    """Options of ``options``' kinds from ``args[i:]`` into ``params``, as click's parser
    reads them; the positional arguments (all of those after the first when not
    ``interspersed``); None where click would do anything else (help, errors)."""
    positional: list[str] = []
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return positional + args[i + 1:]
        if arg[:1] != "-" or len(arg) == 1:
            if not interspersed:
                return positional + args[i:]
            positional.append(arg)
            i += 1
            continue
        if arg.startswith("--"):
            name, eq, attached = arg.partition("=")
            if name not in options:
                return None
            dest, kind = options[name]
            if kind == "flag" or kind == "off":
                if eq:
                    return None
                params[dest] = kind == "flag"
            else:
                if not eq:
                    i += 1
                    if i == len(args):
                        return None
                    attached = args[i]
                _set_param(params, dest, kind, attached)
        else:
            for j in range(1, len(arg)):
                if "-" + arg[j] not in options:
                    return None
                dest, kind = options["-" + arg[j]]
                if kind == "flag":
                    params[dest] = True
                    continue
                value = arg[j + 1:]
                if not value:
                    i += 1
                    if i == len(args):
                        return None
                    value = args[i]
                _set_param(params, dest, kind, value)
                break
        i += 1
    return positional


def _set_param(params: dict, dest: str, kind: str, value: str) -> None:
    if kind == "multiple":
        params[dest] += (value,)
    else:
        params[dest] = value


def _defaults(options: dict, defaults: dict) -> dict:
    params: dict = {dest: () if kind == "multiple" else (False if kind == "flag" else None)
                    for dest, kind in options.values() if kind != "off"}
    params.update(defaults)
    return params


def _env_root(root: str | None) -> str | None:
    if root is None and os.environ.get("KILN_ROOT"):
        root = os.environ["KILN_ROOT"]  # --root's envvar, as click reads it
    return root


def parse_run_args(args: list[str]) -> tuple[str | None, dict] | None:
    """``[--root DIR] run [OPTIONS] IMAGE [COMMAND]...`` as click would parse it, as
    (root or None, run_cmd's parameters); None for anything else, which click then handles."""
    start = _command_start(args, "run")
    if start is None:
        return None
    root, i = start
    params = _defaults(RUN_OPTIONS, RUN_DEFAULTS)
    positional = _parse_options(args, i, RUN_OPTIONS, params, interspersed=False)
    if not positional:
        return None  # no IMAGE (or not for us): click says so
    params["image"], params["command"] = positional[0], tuple(positional[1:])
    try:
        params["stop_timeout"] = float(params["stop_timeout"])
    except ValueError:
        return None
    if any(os.path.exists(f) and not os.access(f, os.R_OK) for f in params["env_file"]):
        return None  # click.Path(readable=True) refuses it
    return _env_root(root), params


# -- kiln exec without click --------------------------------------------------------------
# as run: exec is on the hot path (a test holds these equal to the click command's options)
EXEC_OPTIONS = {
    "-i": ("interactive", "flag"), "--interactive": ("interactive", "flag"),
    "-t": ("tty", "flag"), "--tty": ("tty", "flag"),
    "-u": ("user", "value"), "--user": ("user", "value"),
    "-w": ("workdir", "value"), "--workdir": ("workdir", "value"),
    "-e": ("env", "multiple"), "--env": ("env", "multiple"),
}


def parse_exec_args(args: list[str]) -> tuple[str | None, dict] | None:
    """``[--root DIR] exec [OPTIONS] CONTAINER COMMAND...`` as click would parse it."""
    start = _command_start(args, "exec")
    if start is None:
        return None
    root, i = start
    params = _defaults(EXEC_OPTIONS, {})
    positional = _parse_options(args, i, EXEC_OPTIONS, params, interspersed=False)
    if not positional or len(positional) < 2:
        return None  # click says what is missing
    params["container"], params["command"] = positional[0], tuple(positional[1:])
    return _env_root(root), params


def exec_and_exit(root: str | None, p: dict) -> None:
    from runtime.exec import exec_in
    from runtime.process import ContainerStartError

    try:
        status = exec_in(root, p["container"], list(p["command"]), user=p["user"],
                         workdir=p["workdir"], env=list(p["env"]), tty=p["tty"],
                         interactive=p["interactive"])
    except ContainerStartError as e:
        echo_error(f"kiln: error: {e}")
        sys.exit(e.exit_code)
    sys.exit(status.code)


# -- kiln build without click -------------------------------------------------------------
# A no-op rebuild is mostly start-up: the plain options of kiln build go without click too
# (kind "off": the --no- side of a boolean flag). Those left out (--secret, --output, --cache-*,
# --sign-key, --verify-key, the registry flags) take click's defaults here and send any
# command line that has them to click. A test holds these to the click command's.
BUILD_OPTIONS = {
    "-t": ("tags", "multiple"), "--tag": ("tags", "multiple"),
    "-f": ("containerfile", "value"), "--file": ("containerfile", "value"),
    "--build-arg": ("build_args", "multiple"),
    "--target": ("target", "value"),
    "--no-cache": ("no_cache", "flag"),
    "--network": ("network", "value"),
    "--compression-format": ("compression", "value"),
    "--timestamp": ("timestamp", "value"),
    "--iidfile": ("iidfile", "value"),
    "--squash": ("squash", "flag"),
    "--layers": ("layers", "flag"), "--no-layers": ("layers", "off"),
    "-q": ("quiet", "flag"), "--quiet": ("quiet", "flag"),
    "--pull": ("pull_policy", "value"),
    "--isolation": ("isolation", "value"),
}
BUILD_DEFAULTS = {
    "network": "host", "compression": "zstd", "layers": True, "pull_policy": "missing",
    # the click command's options the fast path does not take
    "secrets": (), "outputs": (), "sign_key": None, "sign_passphrase_file": None,
    "verify_keys": (), "signature_policy": None, "tls_verify": None, "cert_dir": None,
    "creds": None, "authfile": None, "retry": None, "jobs": 3, "cache_from": (), "cache_to": (),
}
BUILD_CHOICES = {"network": ("host", "none"), "compression": ("zstd", "gzip"),
                 "isolation": ("oci", "chroot")}


def parse_build_args(args: list[str]) -> tuple[str | None, dict] | None:
    """``[--root DIR] build [OPTIONS] [CONTEXT]`` as click would parse it, as (root or None,
    build_cmd's parameters); None for anything else, which click then handles."""
    start = _command_start(args, "build")
    if start is None:
        return None
    from kiln.build_run import PULL_POLICIES, spell_pull

    root, i = start
    params = _defaults(BUILD_OPTIONS, BUILD_DEFAULTS)
    positional = _parse_options(spell_pull(args[i:]), 0, BUILD_OPTIONS, params,
                                interspersed=True)
    if positional is None or len(positional) > 1:
        return None
    params["context"] = positional[0] if positional else "."
    for dest, choices in BUILD_CHOICES.items():
        if params[dest] is not None and params[dest] not in choices:
            return None
    policy = PULL_POLICIES.get(params["pull_policy"].lower())
    if policy is None:
        return None
    params["pull_policy"] = policy
    if params["timestamp"] is not None:
        try:
            params["timestamp"] = int(params["timestamp"])
        except ValueError:
            return None
    return _env_root(root), params


def build_and_exit(root: str | None, params: dict) -> None:
    from kiln.build_run import UsageError, build_image

    _catch_stop_signals()
    try:
        build_image(root, params)
    except UsageError as e:
        fail(f"{e} (see 'kiln build --help')")
    sys.exit(0)


def _verified_image(store, p: dict):
    """--verify-key/--signature-policy: the image's signatures must hold before it runs
    (checked in the store; an image pulled now is checked before its layers come)."""
    from registry_client.trust import check_stored, requirements_for
    from store.errors import KilnError, NotFoundError
    from store.reference import parse_reference
    from store.store import Store

    store = store if isinstance(store, Store) else Store(store)
    name = p["image"]
    try:
        full = str(parse_reference(name))
    except KilnError:
        full = name
    reqs = requirements_for(full, verify_keys=p.get("verify_keys") or (),
                            policy_path=p.get("signature_policy"))
    try:
        desc = store.resolve(name)
    except NotFoundError:
        return store, reqs  # pulled, and checked on the way, by _pulled_missing_image
    if reqs:
        check_stored(store, full, desc, reqs)
    return store, reqs


def _pulled_missing_image(store, name: str, requirements=None) -> bool:
    """``kiln run`` of an image the store lacks pulls it first, as podman does."""
    from store.errors import NotFoundError
    from store.store import Store

    store = store if isinstance(store, Store) else Store(store)
    try:
        store.resolve(name)
        return False  # the image is there: the failure was about something else
    except NotFoundError:
        pass
    from registry_client.pull import pull
    from store.errors import KilnError
    from store.reference import parse_reference

    echo_error(f"pulling {name}")
    try:
        pull(store, name, requirements=requirements)
    except KilnError as e:
        raise KilnError(f"image {parse_reference(name)} is not in the store, and pulling it "
                        f"failed: {e}") from None
    return True


def _run_detached(store, opts, requirements, p: dict) -> None:
    from runtime.monitor import start_detached
    from runtime.process import ContainerStartError
    from store.errors import KilnError

    try:
        try:
            cid = start_detached(store, opts)
        except KilnError as e:
            if isinstance(e, ContainerStartError) or not _pulled_missing_image(
                    store, p["image"], requirements):
                raise
            cid = start_detached(store, opts)
    except ContainerStartError as e:
        echo_error(f"kiln: error: {e}")
        sys.exit(e.exit_code)
    print(cid, flush=True)
    sys.exit(0)


def run_and_exit(store, params: dict) -> None:
    """Run a container with run_cmd's parameters; exit with its code (or kiln's error).

    ``store`` is a Store or a root directory (None: the default one)."""
    from runtime.cgroups import warm_up_migration

    warm_up_migration()  # as early as can be: it overlaps a kernel wait with our imports
    from runtime.containers import RunOptions, run
    from runtime.process import ContainerStartError
    from store.errors import KilnError

    p = params
    pids_limit = p["pids_limit"]
    if pids_limit is None:  # the config file's default (Docker's: none)
        from kiln.config import setting

        configured = setting("run", "pids_limit")
        pids_limit = None if configured is None else str(configured)
    opts = RunOptions(
        image=p["image"], command=list(p["command"]), entrypoint=p["entrypoint"],
        env=list(p["env"]), env_files=list(p["env_file"]), workdir=p["workdir"],
        user=p["user"], hostname=p["hostname"], name=p["name"], remove=p["remove"],
        tty=p["tty"], interactive=p["interactive"], read_only=p["read_only"],
        volumes=list(p["volumes"]), tmpfs=list(p["tmpfs"]), network=p["network"],
        cap_add=list(p["cap_add"]), cap_drop=list(p["cap_drop"]), privileged=p["privileged"],
        security_opts=list(p["security_opt"]), init=p["init"], memory=p["memory"],
        memory_swap=p["memory_swap"], cpus=p["cpus"], cpu_shares=p["cpu_shares"],
        pids_limit=pids_limit, stop_timeout=p["stop_timeout"], publish=list(p["publish"]),
        publish_all=p["publish_all"], ip=p["ip"], dns=list(p["dns"]),
        add_hosts=list(p["add_host"]), network_aliases=list(p["network_alias"]),
        restart=p["restart"], memory_reservation=p["memory_reservation"],
        cpuset_cpus=p["cpuset_cpus"], cpuset_mems=p["cpuset_mems"], ulimits=list(p["ulimit"]),
        shm_size=p["shm_size"], sysctls=list(p["sysctl"]), oom_score_adj=p["oom_score_adj"],
        cgroup_parent=p["cgroup_parent"], blkio_weight=p["blkio_weight"],
        device_read_bps=list(p["device_read_bps"]), device_write_bps=list(p["device_write_bps"]),
        devices=list(p["device"]), userns=p.get("userns"))
    if opts.network != "host" and opts.network != "none" and os.geteuid() == 0:
        from kiln.config import setting

        opts.default_subnet = setting("network", "subnet")
    requirements = None
    if p.get("verify_keys") or p.get("signature_policy"):
        store, requirements = _verified_image(store, p)
    if p["restart"] not in (None, "no"):
        if not p["detach"]:
            fail("--restart needs -d: only a detached container has a monitor to restart it")
        if p["remove"]:
            fail("conflicting options: --restart and --rm")
    if p["detach"]:
        _run_detached(store, opts, requirements, p)
    try:
        try:
            status = run(store, opts, warm_up=False)
        except KilnError:
            if not _pulled_missing_image(store, p["image"], requirements):
                raise
            status = run(store, opts, warm_up=False)
    except ContainerStartError as e:
        echo_error(f"kiln: error: {e}")
        sys.exit(e.exit_code)
    if status.oom_killed:
        echo_error(f"kiln: container was killed: out of memory (--memory {p['memory']})")
        sys.exit(137)
    sys.exit(status.code)
