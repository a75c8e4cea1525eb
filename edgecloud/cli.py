"""The ``edgecloud`` command: one Typer app, one sub-command group per system.

One list, :data:`SYSTEMS`, names every system: its group name, the module that exports its Typer ``app``, and a
line of help. A system plugs in by adding one row here and an ``app`` in its ``cli`` module; nothing else. A module
that fails to import is a loud error naming that module (never a silently missing command).

Bad input raises :class:`~edgecloud.errors.UserError` anywhere below; :func:`main` prints it as one line on
stderr and exits with status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console
from rich.markup import escape

from edgecloud import __version__
from edgecloud.errors import UserError

try:  # typer >= 0.25 vendors click; its usage errors are these classes
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer on plain click
    from click import exceptions as click_errors

# (group name, module exporting a Typer ``app``, help)
SYSTEMS: list[tuple[str, str, str]] = [
    ("vmsched", "edgecloud.vmsched.cli", "VM scheduling on multi-NUMA hosts (DVAMP, SPANE)."),
    ("kvcache", "edgecloud.kvcache.cli", "KV-cache systems: MPIC reuse, CSR sparse caches."),
    ("lora", "edgecloud.lora.cli", "VaLoRA: many LoRA adapters served at once (ATMM operator, merge/mixture modes)."),
    ("llm", "edgecloud.llm.cli", "The language-model substrate: batched engine and its benchmark."),
    ("rag", "edgecloud.rag.cli", "DRAGON: device–cloud distributed RAG with speculative aggregation."),
    ("vision", "edgecloud.vision.cli", "SAM-COD: camouflaged object detection from RGB-D with dual-stream adapters."),
    ("route", "edgecloud.route.cli", "LLM route recommendation (PathGPT) on the Helsinki OSM graph."),
    ("personal", "edgecloud.personal.cli", "Personalization: anonymous user embeddings and questioner-aware replies."),
]


class SystemImportError(ImportError):
    """A system's CLI module failed to import; the message names the module and the cause."""


def _version_callback(value: bool) -> None:
    if value:
        print(f"edgecloud {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    app = typer.Typer(
        help="edgecloud: device–cloud AI research systems, runnable and measured.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        rich_markup_mode=None,
    )

    @app.callback()
    def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                           help="Print the version and exit.")) -> None:
        """edgecloud: device–cloud AI research systems, runnable and measured."""

    for name, module, help_ in SYSTEMS:
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - re-raised with the module named
            raise SystemImportError(f"the '{name}' system's CLI module {module} failed to import: "
                                    f"{type(e).__name__}: {e}") from e
        sub = getattr(mod, "app", None)
        if not isinstance(sub, typer.Typer):
            raise SystemImportError(f"the '{name}' system's CLI module {module} exports no Typer `app`")
        app.add_typer(sub, name=name, help=help_)
    return app


app = build_app()
err_console = Console(stderr=True)


def error_line(message: str) -> None:
    """The one line every bad input ends in (on stderr); ``message`` is never read as markup."""
    err_console.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)


def main(args: list[str] | None = None) -> None:
    """Run the CLI: bad input (a :class:`UserError` or a usage error such as an out-of-range option) ends in one
    line on stderr and exit status 2."""
    try:
        rc = app(args=args, standalone_mode=False)
    except UserError as e:
        error_line(str(e))
        sys.exit(2)
    except click_errors.NoArgsIsHelpError as e:
        print(e.format_message())
        sys.exit(2)
    except click_errors.ClickException as e:
        error_line(f"{e.format_message()} (see --help)")
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("interrupted")
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
