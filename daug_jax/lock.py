"""One writer per work directory: ``<directory>/.daug-lock`` while a command writes there.

Two commands writing the same output (two heatmap jobs on one ``--out``, a ``data prepare``
started twice) would interleave their files; the second one is refused instead, with a message
naming the holder.  The lock file holds JSON ``{"pid", "host", "started", "run", "what"}``:

- ``run`` identifies one multi-process job (``DAUG_COORDINATOR``/``DAUG_NUM_PROCESSES``), whose
  processes share the lock: the first one creates it, the others proceed without taking it;
- a lock left by a process that is gone (same host, pid no longer alive, e.g. after kill -9) is
  taken over with one line of notice;
- the creator removes it when its ``with`` block ends, also through an exception.

A holder on another host cannot be checked for liveness: its lock is reported, not taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from typing import Iterator

LOCK_NAME = ".daug-lock"


def job_id() -> str | None:
    """The id shared by the processes of one multi-process job, None for a single process."""
    coordinator = os.environ.get("DAUG_COORDINATOR")
    if not coordinator:
        return None
    return f"{coordinator}/{os.environ.get('DAUG_NUM_PROCESSES', '?')}"


def _read(path: str) -> dict | None:
    """The lock's content; None when the file is gone.  A file being created right now may be
    empty for a moment, so an unreadable one is read again before it counts as garbage ({})."""
    for attempt in range(5):
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
            if isinstance(holder, dict):
                return holder
        except ValueError:
            pass
        time.sleep(0.05 * (attempt + 1))
    return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _stale(holder: dict) -> bool:
    """True for a lock whose holder is certainly gone: garbage, or a dead pid on this host."""
    if not holder or not isinstance(holder.get("pid"), int):
        return True
    return holder.get("host") == socket.gethostname() and not _alive(holder["pid"])


def _try_create(path: str, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record))
    return True


def _acquire(directory: str, path: str, record: dict) -> bool:
    """Creates the lock (True), or shares the job's lock (False); raises if another holds it."""
    while True:
        if _try_create(path, record):
            return True
        holder = _read(path)
        if holder is None:  # released between the two calls: try again
            continue
        if record["run"] is not None and holder.get("run") == record["run"]:
            return False
        if not _stale(holder):
            raise ValueError(
                f"{directory} is in use by pid {holder.get('pid')} on {holder.get('host')} since "
                f"{holder.get('started')}; wait for it or use another directory")
        # Removed only if unchanged: another process may have taken it over in the meantime.
        if _read(path) == holder:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            gone = (f"pid {holder['pid']} on {holder.get('host')}" if holder
                    else "an unreadable lock file")
            print(f"daug-jax: taking over the lock of {directory} left by {gone} (no longer "
                  f"running)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def workdir_lock(directory: str, *, what: str = "run") -> Iterator[None]:
    """Holds ``<directory>/.daug-lock`` (created if needed) for the ``with`` block.

    Raises ValueError naming the holder's pid, host and start time when another live process,
    not of this job, holds it.  ``what`` (e.g. "heatmaps") is recorded in the file.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_NAME)
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "run": job_id(), "what": what}
    created = _acquire(directory, path, record)
    try:
        yield
    finally:
        if created and _read(path) == record:  # not if it was taken over meanwhile
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
