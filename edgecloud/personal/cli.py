"""``edgecloud personal``: anonymous user embeddings and questioner-aware responders."""

from __future__ import annotations

import typer

app = typer.Typer(help="Personalization: anonymous user embeddings (IDfree-PL) and questioner-aware responders (QAR).",
                  no_args_is_help=True)


@app.command("corpus")
def corpus(json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
           min_turns: int = typer.Option(50, min=1, help="Count senders with at least this many turns.")) -> None:
    """Counts of the chitchat corpus: conversations, turns, senders (all, and with at least --min-turns)."""
    from edgecloud.personal.chitchat import load_conversations, senders
    from edgecloud.results import report

    convs = load_conversations()
    per = senders(convs)
    data = {"corpus": "chitchat-dataset", "conversations": len(convs), "turns": sum(len(c) for c in convs),
            "senders": len(per), "senders_min_turns": sum(v >= min_turns for v in per.values()),
            "min_turns": min_turns}
    if json_out:
        print(report(data))
    else:
        for k, v in data.items():
            print(f"{k}: {v}")
