"""`imgcls` / `python -m imgcls`: the command-line tool (today one command: predict)."""

from __future__ import annotations

import sys

COMMANDS = ("predict",)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: imgcls predict SOURCE... [options]   (imgcls predict --help for the options)", file=sys.stderr)
        return 2
    from .predict.cli import main as predict

    return predict(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
