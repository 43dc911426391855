"""Summaries with honest uncertainty: mean ± sample std over seeds, paired differences with a
95 % interval (seeds of an ablation, films of a pointing game).  The interval is Student's t on
the paired differences, mean ± t(0.975, n − 1) · s / √n: with three seeds t = 4.30, so only an
effect that is consistent across seeds excludes 0.  NumPy in, Python floats out (None where
there is nothing to report), ready for JSON.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats as _scipy_stats


def _values(values: Sequence[float | None], name: str) -> np.ndarray:
    arr = np.asarray([np.nan if v is None else v for v in values], np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence, got shape {arr.shape}")
    return arr


def mean_std(values: Sequence[float | None]) -> dict:
    """{"mean", "std" (sample, ddof 1; None for a single value), "per_seed"}; None entries
    (an undefined metric in one run) are left out of mean and std but kept in per_seed."""
    arr = _values(values, "values")
    ok = arr[~np.isnan(arr)]
    per_seed = [None if np.isnan(v) else float(v) for v in arr]
    if not len(ok):
        return {"mean": None, "std": None, "per_seed": per_seed}
    return {"mean": float(ok.mean()), "std": float(ok.std(ddof=1)) if len(ok) > 1 else None,
            "per_seed": per_seed}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of a − b over pairs and its 95 % t-interval: {"mean", "ci95": [low, high], "n"}.
    a, b: [n] paired measurements (the same seed, or the same film, under two conditions); pairs
    where either is undefined (None / NaN) are dropped.  With fewer than 2 pairs the interval is
    None; with identical differences it has zero width."""
    a, b = _values(a, "a"), _values(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same length, got {a.shape} and {b.shape}")
    diff = (a - b)[~(np.isnan(a) | np.isnan(b))]
    n = len(diff)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = float(diff.mean())
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n}
    half = float(_scipy_stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / np.sqrt(n))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def excludes_zero(effect: dict) -> bool:
    """Whether an effect's 95 % interval lies wholly on one side of 0 (resolved)."""
    ci = effect.get("ci95")
    return ci is not None and (ci[0] > 0 or ci[1] < 0)
