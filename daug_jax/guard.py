"""Non-finite training: detected, stopped before it is saved, or skipped step by step.

Every train step reports ``loss`` and ``grad_norm``.  The loops read them once per logging or
checkpoint interval (no host sync per step) and call `check_finite` BEFORE saving, so a
checkpoint never holds parameters updated by a non-finite step and the last finite one is
kept.  With ``skip_nonfinite`` a step whose loss or gradient norm is not finite leaves the state
as it was (`keep_if_finite`) and reports ``skipped`` = 1; such steps are counted, not fatal.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteError(ValueError):
    """Training produced a non-finite loss or gradient norm."""


def keep_if_finite(loss: jax.Array, grad_norm: jax.Array, new: Any, old: Any) -> tuple[Any, Any]:
    """``(new if loss and grad_norm are finite else old, skipped)`` for any pytrees (jit-safe)."""
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    return kept, 1.0 - ok.astype(jnp.float32)


def check_finite(rows: Sequence[dict], *, name: str, workdir: str,
                 last_saved: int | None) -> int:
    """Raises `NonFiniteError` naming the first step whose loss or grad_norm is not finite
    (steps reported as skipped are counted instead); returns how many were skipped.

    rows: one dict per step with "step", "loss", "grad_norm" (and "skipped" when skipping).
    """
    skipped = 0
    for row in rows:
        if row.get("skipped", 0.0) > 0:
            skipped += 1
            continue
        if not (np.isfinite(row["loss"]) and np.isfinite(row["grad_norm"])):
            kept = (f"the last finite checkpoint (step {last_saved}) is kept in {workdir}"
                    if last_saved else f"no checkpoint was saved in {workdir}")
            raise NonFiniteError(
                f"{name}: non-finite training at step {row['step']} (loss {row['loss']}, "
                f"grad_norm {row['grad_norm']}); {kept}. Lower the learning rate, or set "
                f"skip_nonfinite=True in the train section to skip such steps")
    return skipped
