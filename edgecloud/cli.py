"""The ``edgecloud`` command: one Typer app, one sub-command group per system.

Bad input raises :class:`~edgecloud.errors.UserError` anywhere below; :func:`main` prints it as one line on
stderr and exits with status 2, never a traceback.
"""

from __future__ import annotations

import importlib.util
import sys

import typer
from rich.console import Console

from edgecloud.errors import UserError

app = typer.Typer(
    help="edgecloud: device–cloud AI research systems, runnable and measured.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _register() -> None:
    from edgecloud.vmsched.cli import app as vmsched_app

    app.add_typer(vmsched_app, name="vmsched", help="VM scheduling on multi-NUMA hosts (DVAMP, SPANE).")
    if _has_module("edgecloud.kvcache.cli"):
        from edgecloud.kvcache.cli import app as kvcache_app

        app.add_typer(kvcache_app, name="kvcache", help="KV-cache systems: MPIC reuse, CSR sparse caches.")


_register()


def main() -> None:
    try:
        app()
    except UserError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
