"""Whole-file writes: every product is written to a temporary name and renamed into place, so
a killed job never leaves a half-written JSON, text or PNG behind (a rerun sees the old file or
none); `pause_for_test` is the hook the kill-and-resume tests stop a job with."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def _temp_name(path: str, suffix: str = "") -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return f"{path}.tmp{os.getpid()}{suffix}"


def write_text(path: str, text: str) -> None:
    tmp = _temp_name(path)
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1))


def as_json(obj: Any) -> Any:
    """``obj`` as JSON stores and reads it back (tuples become lists), so that a fresh value and
    a stored one compare equal."""
    return json.loads(json.dumps(obj))


def read_json(path: str, default: Any = None) -> Any:
    """``path``'s JSON, or ``default`` when there is no such file."""
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def save_figure(fig: Any, path: str, **savefig_kwargs: Any) -> None:
    """Saves a Matplotlib figure as PNG (dpi 110 unless given) and closes it."""
    import matplotlib.pyplot as plt  # here: only figure writers pay for importing Matplotlib

    tmp = _temp_name(path, ".png")  # the suffix tells savefig the format
    try:
        fig.savefig(tmp, **{"dpi": 110, **savefig_kwargs})
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def pause_for_test(variable: str, value: Any, message: str) -> None:
    """Test/fault-injection hook, a no-op unless the environment sets ``variable`` to ``value``:
    then prints ``variable=value: message`` and blocks until the process is killed, so that a
    test SIGKILLs a job at a known point however fast the machine is."""
    if os.environ.get(variable) != str(value):
        return
    print(f"{variable}={value}: {message}", file=sys.stderr, flush=True)
    while True:
        time.sleep(60)
