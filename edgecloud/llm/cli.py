"""``edgecloud llm``: the shared language-model substrate (batched engine benchmark)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.command("models")
def models_cmd() -> None:
    """List the registry models that load offline."""
    from edgecloud.llm.models import REGISTRY

    for name, spec in REGISTRY.items():
        print(f"{name}\t{'chat' if spec.chat else 'base'}\t{spec.install}")
