"""Console entry point (``edgecloud`` and ``python -m edgecloud``).

It imports the CLI inside a guard, so a system whose module fails to import makes every command, ``--help``
included, fail loudly with one line naming that module and the cause (exit 1), instead of a missing command.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from edgecloud.cli import main as cli_main
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    cli_main()


if __name__ == "__main__":
    main()
