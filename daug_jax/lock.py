"""One writer per work directory: ``<directory>/.daug-lock`` while a command writes there.

Two commands writing the same output (two heatmap jobs on one ``--out``) would interleave their
files; the second one is refused, with a message naming the holder.  The holder takes an
exclusive ``flock``, which the kernel releases however the holder dies (kill -9 included), and
writes JSON ``{"pid", "host", "started", "run", "what"}`` into the file; the processes of one
multi-process job (the same ``run``, `job_id`) share the lock.  The file is emptied, not deleted,
on release (deleting a locked file races with a process that has the old one open).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from typing import Iterator

LOCK_NAME = ".daug-lock"


def job_id() -> str | None:
    """The id shared by the processes of one multi-process job, None for a single process."""
    coordinator = os.environ.get("DAUG_COORDINATOR")
    return f"{coordinator}/{os.environ.get('DAUG_NUM_PROCESSES', '?')}" if coordinator else None


def _take(f) -> dict | None:
    """Takes the flock on ``f`` (None), or returns the JSON of the process holding it, retrying
    while a holder has the flock but no JSON (just after its flock, just before its release); {}
    if that lasts."""
    for attempt in range(20):
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            f.seek(0)
            with contextlib.suppress(ValueError):
                if isinstance(holder := json.loads(f.read()), dict):
                    return holder
        time.sleep(0.01 * (attempt + 1))
    return {}


@contextlib.contextmanager
def workdir_lock(directory: str, *, what: str = "run") -> Iterator[None]:
    """Holds ``<directory>/.daug-lock`` (the directory is created if needed) for the ``with`` block;
    ``what`` (e.g. "heatmaps") is recorded in the file.  Raises ValueError naming the holder's
    pid, host and start time when another process, not of this job, holds it."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, LOCK_NAME), "a+") as f:
        if (holder := _take(f)) is not None:
            if job_id() is None or holder.get("run") != job_id():
                raise ValueError(
                    f"{directory} is in use by pid {holder.get('pid')} on {holder.get('host')} "
                    f"since {holder.get('started')}; wait for it or use another directory")
            yield  # shared: the job's other process holds it
            return
        try:
            f.truncate(0)
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                                "run": job_id(), "what": what}))
            f.flush()
            yield
        finally:
            f.truncate(0)  # a reader sees no holder
            fcntl.flock(f, fcntl.LOCK_UN)
