"""Print, check or rewrite pyproject.toml's ``[tool.flwr.app.config]`` from fedmm's config
dataclasses (``fedmm.config.flwr_app_config``): a new option or a new method's options section
is added there by running this once, never by hand.

    python scripts/flwr_app_config.py            # print the generated tables
    python scripts/flwr_app_config.py --check    # exit 1 when pyproject.toml differs
    python scripts/flwr_app_config.py --write    # rewrite them in pyproject.toml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmm.config import flwr_app_config

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
START = "[tool.flwr.app.config]"


def current_block(text: str) -> tuple[int, int]:
    """(start, end) offsets of the generated tables: from ``[tool.flwr.app.config]`` to the
    first table that is not one of its sub-tables."""
    start = text.index(START)
    end = len(text)
    pos = start + len(START)
    while (pos := text.find("\n[", pos)) != -1:
        header = text[pos + 1 : text.index("]", pos) + 1]
        if not header.startswith("[tool.flwr.app.config."):
            end = pos + 1
            break
        pos += 1
    return start, end


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    generated = flwr_app_config()
    text = PYPROJECT.read_text()
    start, end = current_block(text)
    updated = text[:start] + generated + "\n" + text[end:].lstrip("\n")
    if args.write:
        PYPROJECT.write_text(updated)
        print(f"wrote {PYPROJECT.name} [tool.flwr.app.config]")
        return 0
    if args.check:
        if updated != text:
            print(
                f"{PYPROJECT.name}'s [tool.flwr.app.config] differs from the config "
                "dataclasses; run: python scripts/flwr_app_config.py --write",
                file=sys.stderr,
            )
            return 1
        return 0
    print(generated, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
