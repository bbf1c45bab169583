"""The ``kiln`` command: global options, error printing, exit codes.

Command modules import their heavy dependencies inside the command bodies,
so ``kiln --help`` and the hot paths start quickly.
"""

from __future__ import annotations

import os
import sys

import click

from kiln import __version__

EXIT_KILN_ERROR = 125  # podman's convention for kiln's own failures


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
    "build": "build_commands",
}


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
@click.version_option(__version__, "--version", prog_name="kiln", message="%(prog)s %(version)s")
@click.option("--root", envvar="KILN_ROOT", metavar="DIR",
              help="Store directory (default /var/lib/kiln as root, $XDG_DATA_HOME/kiln "
                   "otherwise; env KILN_ROOT).")
@click.pass_context
def cli(ctx: click.Context, root: str | None) -> None:
    """kiln: build, store, run and ship OCI images without a daemon."""
    ctx.obj = Context(root)


def fail(message: str) -> None:
    click.echo(f"kiln: error: {message}", err=True)
    sys.exit(EXIT_KILN_ERROR)


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            click.echo(e.code, err=True)
    # Every file kiln writes is closed (and fsynced where it matters) by now; skipping
    # the interpreter's teardown saves tens of milliseconds on each kiln run.
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass
    os._exit(code)


def _main(argv: list[str] | None) -> None:
    try:
        cli.main(args=argv, prog_name="kiln", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        fail("aborted")
    except click.ClickException as e:
        hint = ""
        if isinstance(e, click.UsageError) and e.ctx is not None:
            hint = f" (see '{e.ctx.command_path} --help')"
        fail(e.format_message() + hint)
    except KeyboardInterrupt:
        fail("interrupted")
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_KILN_ERROR)
    except Exception as e:  # KilnError and OSError become one line; anything else is a bug
        from store.errors import KilnError

        if isinstance(e, KilnError):
            fail(str(e))
        if isinstance(e, OSError):
            fail(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}")
        raise
    sys.exit(0)
