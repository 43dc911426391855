"""Orbax checkpoints with resume: every training stage saves through `Checkpointer`.

A stage that is killed and rerun with the same command restores the latest step and continues;
since batches are a pure function of (seed, step) (see `daug_jax.data.pipeline`) and PRNG keys
are folded from the step, the resumed run is the uninterrupted run.  A checkpoint that cannot be
read back (truncated by a full disk, half-copied) is skipped with one line of warning for the
newest older step that reads; resuming also moves the damaged steps aside (``<step>.damaged``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

from daug_jax.files import pause_for_test

# A failed read makes these log tracebacks; a damaged checkpoint is reported by one line of ours.
_NOISY_LOGGERS = ("absl", "orbax", "tensorstore", "asyncio")

# Test-only fault injection (`files.pause_for_test`); unset in normal runs.
PAUSE_AFTER_CHECKPOINT = "DAUG_TEST_PAUSE_AFTER_CHECKPOINT"


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    hook = sys.unraisablehook
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    # Silenced: tensorstore reads, in flight when a read failed, completing into the closed loop.
    sys.unraisablehook = lambda u: None if str(u.exc_value) == "Event loop is closed" else hook(u)
    try:
        yield
    finally:
        gc.collect()  # unretrieved tasks of failed reads are reported now, while quiet
        sys.unraisablehook = hook
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _short_reason(err: BaseException) -> str:
    """The most specific part of a read error, e.g. "ValueError: Requested byte range [0, 273)
    is not valid for value of size 136" out of tensorstore's chain of contexts and specs."""
    text = " ".join(str(err).split("[tensorstore_spec")[0].split())
    if len(text) > 120:  # "Error opening ...: Error reading ...: <cause>": keep the cause
        text = text.rsplit(": ", 1)[-1][:120]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for a pytree train state plus JSON metadata;
    ``restored_step``: the step that the last `restore` / `restore_or` returned (None before)."""

    def __init__(self, directory: str, *, save_every: int, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.restored_step: int | None = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(1, save_every), create=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The newest saved step (not checked for damage: restoring it may fall back)."""
        return self._manager.latest_step()

    def latest_meta(self) -> dict | None:
        """The JSON metadata of the newest step, read without the state (None when there is no
        checkpoint or its metadata does not read: restoring will then fall back)."""
        step = self.latest_step()
        if step is None:
            return None
        try:
            with _quiet_orbax():
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception:  # noqa: BLE001 - a damaged step is reported by the restore that follows
            return None
        return dict(restored.meta or {})

    def save(self, step: int, state: Any, meta: dict | None = None, *, force: bool = False) -> bool:
        """Saves when ``step`` is on the save interval (or ``force``); returns whether it did."""
        saved = self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})), force=force)
        if saved and os.environ.get(PAUSE_AFTER_CHECKPOINT) == str(step):
            self._manager.wait_until_finished()  # the pause comes after a committed checkpoint
            pause_for_test(PAUSE_AFTER_CHECKPOINT, step,
                           f"paused after checkpoint {step} in {self.directory}")
        return bool(saved)

    def _restore_newest(self, template: Any, step: int | None) -> tuple[Any, dict, int, list]:
        """``(state, meta, step, damaged)`` from ``step`` (default latest) or, when that one
        fails to read, the newest older step that reads; damaged: [(step, reason)] skipped."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"no checkpoint {step} in {self.directory} (it has "
                                    f"{', '.join(map(str, sorted(steps)))})")
        candidates = [s for s in steps if step is None or s <= step]
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        damaged = []
        with _quiet_orbax():
            for candidate in candidates:
                try:
                    restored = self._manager.restore(candidate, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                except Exception as err:  # noqa: BLE001 - any failure to read counts as damage
                    damaged.append((candidate, _short_reason(err)))
                    continue
                self.restored_step = candidate
                return restored.state, dict(restored.meta or {}), candidate, damaged
        raise FileNotFoundError(
            f"no checkpoint in {self.directory} restores (tried "
            f"{', '.join(str(s) for s, _ in damaged)}; {damaged[0][0]}: {damaged[0][1]})")

    def _report(self, damaged: list, used: int, suffix: str = "") -> None:
        if not damaged:
            return
        names = ", ".join(str(s) for s, _ in damaged)
        what = (f"checkpoint {names} in {self.directory} is damaged" if len(damaged) == 1 else
                f"checkpoints {names} in {self.directory} are damaged")
        print(f"daug-jax: warning: {what} ({damaged[0][1]}); using checkpoint {used}{suffix}",
              file=sys.stderr, flush=True)

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores ``(state, meta)`` at ``step`` (default latest), or the newest older step that
        reads (``self.restored_step`` tells which), with the shardings of ``template``.  Raises
        FileNotFoundError when there is none or none reads."""
        state, meta, used, damaged = self._restore_newest(template, step)
        self._report(damaged, used)
        return state, meta

    def restore_or(self, template: Any) -> tuple[Any, dict, int]:
        """``(state, meta, step)`` to resume from: the newest checkpoint that reads, or
        ``(template, {}, 0)`` if there is none.  Damaged newer steps are moved aside, so that the
        resumed run's `latest_step` is the restored step and it saves the lost steps again."""
        if self.latest_step() is None:
            self.restored_step = 0
            return template, {}, 0
        state, meta, used, damaged = self._restore_newest(template, None)
        moved = self._set_aside([s for s, _ in damaged])
        self._report(damaged, used, f"; moved aside to {', '.join(moved)}" if moved else "")
        return state, meta, used

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Renames the step directories ``steps`` out of orbax's view (process 0; the others
        wait for it); returns the new names."""
        if not steps:
            return []
        names = []
        for step in steps:
            base, n = f"{step}.damaged", 1
            while os.path.exists(os.path.join(self.directory, base)):
                base, n = f"{step}.damaged{n}", n + 1
            names.append(base)
        multi = jax.process_count() > 1
        if multi:  # every process has read and named before anything moves
            ocp.multihost.sync_global_processes("daug_checkpoint_read")
        if jax.process_index() == 0:
            for step, base in zip(steps, names):
                os.replace(os.path.join(self.directory, str(step)),
                           os.path.join(self.directory, base))
        if multi:
            ocp.multihost.sync_global_processes("daug_checkpoint_set_aside")
        self._manager.reload()
        return names

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
