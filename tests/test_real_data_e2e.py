"""Every stage on real-format data, through the CLI only, at tiny sizes.

MIMIC-CXR-JPG (films + reports): ``data prepare`` -> ``train-diffusion`` -> ``train-classifier``
-> ``heatmaps`` (two processes over loopback) -> ``train`` with the heatmap channel ->
``evaluate``.  CheXpert (no reports) the same with class-only towers (``train.clip_weight=0``).
The trees are synthetic films written in the datasets' own layouts (tests/fixtures_real.py).
"""

import json
import os

import numpy as np
import pytest

import _subproc
import _tiny
from _cli import ok, user_error
from daug_jax.heatmap_job import HeatmapSource
from fixtures_real import make_chexpert_synthetic_tree, make_mimic_synthetic_tree

SIZE = 32
DIFFUSION = _tiny.diffusion(steps=4, save_every=4) + [f"data.image_size={SIZE}"]
HEATMAPS = ["heatmaps.targets='No Finding'", "heatmaps.num_steps=2", "heatmaps.batch_size=8",
            "heatmaps.shard_size=32", "heatmaps.calibration.num_images=8"]
TOWERS = ["model.vision.resnet={'stage_sizes': (1,), 'widths': (8,), 'stem_width': 8}",
          "model.text.vocab_size=300", "model.text.hidden_size=16", "model.text.num_layers=1",
          "model.text.intermediate_size=32", "model.text.max_length=48", "model.embed_dim=16",
          "train.steps=6", "train.batch_size=8", "train.checkpoint_every=6", "train.log_every=3",
          "train.warmup=1", "train.lr=0.01", f"data.image_size={SIZE}",
          "model.vision.fill=heatmaps", "model.vision.in_channels=2"]




def _heatmaps_two_processes(tmp, data, splits, out):
    """``daug-jax heatmaps`` as two processes of one job (a coordinator on loopback)."""
    env = _subproc.jax_env(str(tmp / "jax-cache"))
    port = _subproc.free_port()
    cmd = _subproc.CLI + ["heatmaps", "--diffusion", tmp / "diffusion", "--classifier",
                          tmp / "classifier", "--out", out, "--splits", splits,
                          *data, *_tiny.sets(HEATMAPS)]
    procs = []
    for rank in range(2):
        penv = {**env, "DAUG_COORDINATOR": f"127.0.0.1:{port}", "DAUG_NUM_PROCESSES": "2",
                "DAUG_PROCESS_ID": str(rank)}
        procs.append(_subproc.start([str(c) for c in cmd], penv, str(tmp / f"heatmaps{rank}.log")))
    try:
        for rank, proc in enumerate(procs):
            proc.wait(timeout=300)
            assert proc.returncode == 0, _subproc.tail(str(tmp / f"heatmaps{rank}.log"))
    finally:
        for proc in procs:
            _subproc.kill(proc)
    logs = [_subproc.tail(str(tmp / f"heatmaps{r}.log"), 10**6) for r in range(2)]
    assert "process 1 of 2" in logs[0] and "process 2 of 2" in logs[1]


def _check_heatmaps(out, split, num, tfds_ids):
    maps = HeatmapSource(os.path.join(out, split))
    ids = [maps[i]["id"] for i in range(len(maps))]
    assert len(ids) == num and ids == tfds_ids  # one record per source id, in split order
    assert maps[0]["heatmaps"].shape == (SIZE, SIZE, 1)
    # Both processes wrote: with 32-record shards, shard 1 belongs to the second process.
    assert len(maps.metadata["shards"]) >= 2


def _split_ids(name, data_dir, split):
    from daug_jax.data import registry
    import ml_collections

    cfg = ml_collections.ConfigDict(dict(name=name, data_dir=str(data_dir), image_size=SIZE,
                                        report_section="findings+impression"))
    source = registry.open_dataset(cfg).source(split)
    return [source[i]["id"].decode() for i in range(len(source))]


@pytest.mark.parametrize("dataset", ["mimic_cxr", "chexpert_cxr"])
def test_every_stage_by_cli(dataset, tmp_path, capsys):
    manual, tfds_dir, out = tmp_path / "manual", tmp_path / "tfds", tmp_path / "heatmaps"
    if dataset == "mimic_cxr":
        info = make_mimic_synthetic_tree(manual, num_train=80, num_validation=16, num_test=40)
        splits, query, towers = "train,test", "test", TOWERS
    else:
        info = make_chexpert_synthetic_tree(manual, num_train=80, num_validation=40)
        splits, query, towers = "train,validation", "validation", TOWERS + ["train.clip_weight=0"]
    data = ["--data", dataset, "--data-dir", tfds_dir]
    ok("data", "prepare", dataset, "--manual-dir", manual, "--data-dir", tfds_dir,
         "--size", SIZE)
    ok("train-diffusion", "--workdir", tmp_path / "diffusion", *data, *_tiny.sets(DIFFUSION))
    ok("train-classifier", "--workdir", tmp_path / "classifier", *data, *_tiny.sets(DIFFUSION))
    meta = json.loads((tmp_path / "classifier" / "meta.json").read_text())
    assert len(meta["class_names"]) == 14 and meta["image_shape"] == [SIZE, SIZE, 1]

    models = ["--diffusion", tmp_path / "diffusion", "--classifier", tmp_path / "classifier"]
    if dataset == "mimic_cxr":
        # The pointing game needs lesion masks: refused on MIMIC, scored on synthetic films.
        user_error(capsys, "mimic_cxr has no lesion masks, sites or boxes", "localize", *models, *data)
        user_error(capsys, "unknown class 'Pneumonitis' in heatmap target", "heatmaps",
                    *models, *data, "--targets", "Pneumonitis", "--out", tmp_path / "bad")
        ok("localize", *models, "--data", "synthetic_cxr", "--data-dir", tfds_dir,
             "--out", tmp_path / "loc", "--sweep", "1", *_tiny.sets(HEATMAPS + [
                 "data.num_train=16", "data.num_validation=4", "data.num_test=48",
                 "heatmaps.localization.cases_per_class=2", "heatmaps.localization.pool_size=48",
                 "heatmaps.localization.examples_per_class=1"]))
        loc = json.loads((tmp_path / "loc" / "localization.json").read_text())
        assert loc["settings"]["dataset"] == "synthetic_cxr" and loc["anomaly"]["n"] > 0
    _heatmaps_two_processes(tmp_path, data, splits, out)
    for split in splits.split(","):
        _check_heatmaps(out, split, info["num_frontal"][split],
                        _split_ids(dataset, tfds_dir, split))

    ok("train", "--workdir", tmp_path / "towers", *data, *_tiny.sets(towers),
         "--set", f"data.heatmaps_dir={out}")
    history = [json.loads(r) for r in open(tmp_path / "towers" / "metrics.jsonl")]
    assert [r["step"] for r in history] == [3, 6]
    assert all(np.isfinite(r["loss"]) for r in history)
    if dataset == "chexpert_cxr":  # class-only: the loss is the class term alone
        assert all(r["loss"] == pytest.approx(r["image_class"], rel=1e-6) for r in history)

    result = tmp_path / "eval.json"
    ok("evaluate", "--towers", tmp_path / "towers", *data, "--query-split", query,
         "--out", result)
    metrics = json.loads(result.read_text())
    assert metrics["dataset"] == dataset and metrics["num_queries"] == info["num_frontal"][query]
    # The authors' protocol: test (here: held-out) queries against the training split.
    assert metrics["gallery_split"] == "train"
    assert metrics["num_gallery"] == info["num_frontal"]["train"]
    assert 0.0 <= metrics["macro_auroc"] <= 1.0 and 0.0 <= metrics["x2x_mAP@10"] <= 1.0
    assert 0.0 <= metrics["weighted_auroc"] <= 1.0 and metrics["chance"]["macro_auroc"] == 0.5
    assert ("i2t_R@5" in metrics) == ("r2x_mAP@5" in metrics) == (dataset == "mimic_cxr")
    if dataset == "chexpert_cxr":  # CheXpert has no test split: the error lists the splits
        user_error(capsys, "split 'test' is not in chexpert_cxr .*; its splits: train, "
                    "validation", "evaluate", "--towers", tmp_path / "towers", *data,
                    "--out", result)


class _ZeroMaps:
    """A stand-in translation for writing heatmap datasets quickly: zero maps, one channel."""

    def settings(self):
        return {"targets": ["No Finding"], "image_shape": [SIZE, SIZE, 1]}

    def __call__(self, x):
        return None, np.zeros((*np.shape(x)[:3], 1), np.float32)


def test_bad_input_is_named_before_training(tmp_path, capsys):
    """Heatmaps of another split or with another channel count, an unregistered dataset, an
    absent split: each stops the command with an error that names it."""
    import ml_collections

    from daug_jax.data import registry
    from daug_jax.heatmap_job import write_heatmap_dataset

    manual, tfds_dir = tmp_path / "manual", tmp_path / "tfds"
    make_mimic_synthetic_tree(manual, num_train=24, num_validation=4, num_test=8)
    ok("data", "prepare", "mimic_cxr", "--manual-dir", manual, "--data-dir", tfds_dir,
         "--size", SIZE)
    dataset = registry.open_dataset(ml_collections.ConfigDict(
        dict(name="mimic_cxr", data_dir=str(tfds_dir), image_size=SIZE,
             report_section="findings+impression")))
    for name, split in (("right", "train"), ("wrong", "test")):
        write_heatmap_dataset(dataset.source(split), str(tmp_path / name / "train"), _ZeroMaps(),
                              1.0, batch_size=4)

    def train(pattern, maps, *extra):
        user_error(capsys, pattern, "train", "--workdir", tmp_path / "towers", "--data",
                    "mimic_cxr", "--data-dir", tfds_dir, *_tiny.sets(TOWERS + list(extra)),
                    "--set", f"data.heatmaps_dir={tmp_path / maps}")

    train(r"has 8 records, the image split 24", "wrong")
    train(r"1 channel\(s\) \['No Finding'\], the towers expect 2", "right",
          "model.vision.in_channels=3")
    assert not (tmp_path / "towers" / "checkpoints").exists()  # nothing was trained
    user_error(capsys, "unknown dataset 'nih'; registered datasets: chexpert_cxr, mimic_cxr, "
                "nih_cxr14, synthetic_cxr", "train-diffusion", "--data", "nih", "--data-dir", tfds_dir)
    with pytest.raises(ValueError, match="split 'validate' is not in mimic_cxr .*; its splits: "
                                         "test, train, validation"):
        dataset.source("validate")
