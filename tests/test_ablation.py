"""The ablation table: mean ± sample std over seeds, per-class means, missing values."""

import numpy as np

from daug_jax.ablation import METRIC_KEYS, aggregate, markdown_table


def _run(base: float, auroc_b):
    run = {key: base + 0.01 * k for k, key in enumerate(METRIC_KEYS)}
    run["per_class_auroc"] = {"A": base, "B": auroc_b}
    return run


def test_aggregate_is_mean_and_sample_std_over_seeds():
    runs = [_run(0.5, 0.7), _run(0.6, None), _run(0.8, 0.9)]
    out = aggregate(runs)
    for k, key in enumerate(METRIC_KEYS):
        values = np.array([0.5, 0.6, 0.8]) + 0.01 * k
        np.testing.assert_allclose(out[key], values.mean())
        np.testing.assert_allclose(out["std"][key], values.std(ddof=1))
    # A class without a value in some seed (no positives there) averages the seeds that have one.
    np.testing.assert_allclose(out["per_class_auroc"]["B"], 0.8)
    np.testing.assert_allclose(out["per_class_auroc"]["A"], np.mean([0.5, 0.6, 0.8]))
    assert out["per_seed"] == runs
    row = markdown_table({"daug": out}).splitlines()[2]
    assert row.startswith("| daug | 0.633 ± 0.153 |"), row


def test_one_seed_reports_no_spread():
    out = aggregate([_run(0.5, None)])
    assert out["macro_auroc"] == 0.5 and out["std"]["macro_auroc"] is None
    assert out["per_class_auroc"]["B"] is None
    table = markdown_table({"baseline": out})
    assert "±" not in table and "| baseline | 0.500 | 0.510 |" in table
