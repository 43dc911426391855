"""Orbax checkpoints with resume: every training stage saves through `Checkpointer`.

A stage that is killed and rerun with the same command restores the latest step and continues;
since batches are a pure function of (seed, step) (see `daug_jax.data.pipeline`) and PRNG keys
are folded from the step, the resumed run is the uninterrupted run.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for a pytree train state plus JSON metadata."""

    def __init__(self, directory: str, *, save_every: int, keep: int = 2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(1, save_every), create=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict | None = None, *, force: bool = False) -> bool:
        """Saves when ``step`` is on the save interval (or ``force``); returns whether it did."""
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(meta or {})),
            force=force)
        return bool(saved)

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores ``(state, meta)`` at ``step`` (default latest) with the shardings of ``template``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                meta=ocp.args.JsonRestore()))
        return restored.state, dict(restored.meta or {})

    def restore_or(self, template: Any) -> tuple[Any, dict, int]:
        """``(state, meta, step)`` from the latest checkpoint, or ``(template, {}, 0)`` if none."""
        step = self.latest_step()
        if step is None:
            return template, {}, 0
        state, meta = self.restore(template, step)
        return state, meta, step

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
