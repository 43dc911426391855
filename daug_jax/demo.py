"""``daug-jax demo``: the end-to-end run on the synthetic benchmark (not built yet)."""

import sys


def main(command: str, argv: list[str]) -> int:
    print("daug-jax demo: not built yet (the end-to-end pipeline lands with the evaluation stage)",
          file=sys.stderr)
    return 1
