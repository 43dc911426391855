"""Heatmap targets, input checks, the fixed-constant scaling, the resumable heatmap dataset job and
the localization bookkeeping, all with closed-form closures instead of trained networks."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial
from scipy import ndimage

from daug_jax import heatmap_job, localization
from daug_jax.data.pipeline import ArraySource
from daug_jax.diffusion.schedule import alphas_cumprod
from daug_jax.heatmaps import (TranslationModels, blur_matrix, calibrate_scale,
                               check_images, make_heatmap_fn, make_translation, parse_targets,
                               scale_heatmaps)

H = W = 8
CLASSES = ("No Finding", "Left", "Right")
ALPHA_BAR = alphas_cumprod("linear", 1000)


def zero_eps(x, t, y=None):
    """eps = 0: the unguided DDIM walk is a pure rescaling, so encode + decode is the identity."""
    del t, y
    return jnp.zeros_like(x)


def linear_logits(x, t):
    """"Left" looks at the left half of the image, "Right" at the right half."""
    del t
    left = jnp.mean(x[:, :, : W // 2], axis=(1, 2, 3))
    right = jnp.mean(x[:, :, W // 2:], axis=(1, 2, 3))
    return jnp.stack([-(left + right), 8 * left, 8 * right], axis=1)


def closed_form_models(max_level=None):
    return TranslationModels(Partial(zero_eps), Partial(linear_logits), ALPHA_BAR,
                             (H, W, 1), CLASSES, None, max_level=max_level)


SETTINGS = dict(level=300, num_steps=2, smooth_sigma=0.0, reference="x0", unroll=1,
                guidance="sigmoid")


def small_heatmap_fn(targets="Left,no:Right", scale=2.0):
    models = closed_form_models()
    return make_heatmap_fn(models, targets, make_translation(models, SETTINGS), scale)


# ----------------------------------------------------------------------------- targets, checks
def test_parse_targets():
    targets = parse_targets("left, no:Right ,No Finding", CLASSES)
    assert [(t.spec, t.index, t.direction) for t in targets] == [
        ("Left", 1, 1.0), ("no:Right", 2, -1.0), ("No Finding", 0, 1.0)]
    with pytest.raises(ValueError, match=r"unknown class 'Lfet'.*valid classes: No Finding, Left"):
        parse_targets("no:Lfet", CLASSES)
    with pytest.raises(ValueError, match="unknown class 'No Finding'"):
        parse_targets("No Finding", ("Left", "Right"))     # a classifier without that class
    with pytest.raises(ValueError, match="given twice"):
        parse_targets("Left,left", CLASSES)
    with pytest.raises(ValueError, match="non-empty"):
        parse_targets("Left,", CLASSES)


def test_bad_images_give_clear_errors():
    fn = small_heatmap_fn()
    good = np.zeros((2, H, W, 1), np.float32)
    with pytest.raises(ValueError, match=r"3 channels.*trained on 1 \(expected \[B, 8, 8, 1\]"):
        fn(np.zeros((2, H, W, 3), np.float32))
    with pytest.raises(ValueError, match=r"16x16.*trained on 8x8"):
        fn(np.zeros((2, 16, 16, 1), np.float32))
    nan = good.copy()
    nan[1, 3, 4, 0] = np.nan
    with pytest.raises(ValueError, match="image 1 of the batch has NaN"):
        fn(nan)
    with pytest.raises(ValueError, match=r"image 0 has pixels in \[0, 255\]; expected \[-1, 1\]"):
        check_images(np.full((1, H, W, 1), 255.0) * (np.arange(W) > 3)[:, None], (H, W, 1))


def test_blur_matches_scipy_reflect():
    rng = np.random.default_rng(0)
    for size, sigma in ((7, 1.0), (7, 3.0), (5, 0.7)):
        v = rng.standard_normal(size)
        np.testing.assert_allclose(blur_matrix(size, sigma) @ v,
                                   ndimage.gaussian_filter1d(v, sigma, mode="reflect"), atol=1e-12)


# ----------------------------------------------------------------------------- scaling
def test_fixed_constant_keeps_nothing_changed_at_zero():
    """A film the classifier already calls "Left" (saturated logit) is left alone by guidance
    towards "Left"; its channel stays ~0 instead of being stretched to full contrast."""
    fn = small_heatmap_fn("Left", scale=2.0)
    x = np.zeros((2, H, W, 1), np.float32)
    x[0, :, : W // 2] = 1.0            # logit_Left = 8: sigmoid' ~ 3e-4, nothing to change
    x[1] = -0.2                        # logit_Left = -1.6: guidance brightens the left half
    translated, raw = fn(x)
    raw = np.asarray(raw)
    assert raw[0].max() < 1e-2 * raw[1].max()
    constant = 2.0 * float(raw[1].max())
    scaled = scale_heatmaps(raw, constant)
    np.testing.assert_allclose(scaled, np.clip(raw / constant, 0, 1), rtol=1e-6)
    assert scaled[0].max() < 0.01 and abs(scaled[1].max() - 0.5) < 1e-6
    assert scaled[1, :, W // 2:].max() < 1e-3            # "Left" never touches the right half
    assert calibrate_scale(raw, 90.0) == pytest.approx(np.percentile(raw.astype(np.float64), 90.0))
    with pytest.raises(ValueError, match="change nothing"):
        calibrate_scale(np.zeros((2, 4, 4, 1)), 99.0)


# ----------------------------------------------------------------------------- dataset job
def _source(n=10):
    rng = np.random.default_rng(1)
    images = rng.integers(60, 200, (n, H, W, 1)).astype(np.uint8)
    return ArraySource({"id": np.array([f"rec-{i}" for i in range(n)]), "image": images})


class FailAfter:
    """A heatmap function that dies after ``calls`` calls, as a killed job would."""

    def __init__(self, fn, calls):
        self.fn, self.left, self.calls = fn, calls, 0

    def settings(self):
        return self.fn.settings()

    def __call__(self, x):
        self.calls += 1
        if self.calls > self.left:
            raise KeyboardInterrupt("injected interruption")
        return self.fn(x)


def _read_all(directory):
    source = heatmap_job.HeatmapSource(directory)
    return [source[i] for i in range(len(source))]


def test_dataset_job_resumes_to_the_uninterrupted_result(tmp_path):
    fn, source = small_heatmap_fn(), _source()
    kwargs = dict(batch_size=2, shard_size=3)                  # 4 shards of 3, 3, 3, 1 records
    heatmap_job.write_heatmap_dataset(source, str(tmp_path / "once"), fn, 0.05, **kwargs)
    reference = _read_all(str(tmp_path / "once"))
    assert [r["id"] for r in reference] == [f"rec-{i}" for i in range(10)]
    assert [r["index"] for r in reference] == list(range(10))
    assert reference[0]["heatmaps"].shape == (H, W, 2) and reference[0]["heatmaps"].max() > 0

    out = str(tmp_path / "resumed")
    dying = FailAfter(fn, 3)                                     # shard 0 done, dies in shard 1
    with pytest.raises(KeyboardInterrupt):
        heatmap_job.write_heatmap_dataset(source, out, dying, 0.05, **kwargs)
    assert sorted(os.listdir(out)) == ["heatmaps-00000-of-00004.array_record", "metadata.json"]
    with pytest.raises(FileNotFoundError, match="incomplete"):
        heatmap_job.HeatmapSource(out)
    # A hard kill leaves a temp file behind: the rerun must not pick it up.
    with open(os.path.join(out, "heatmaps-00001-of-00004.array_record.tmp"), "wb") as f:
        f.write(b"partial")
    counting = FailAfter(fn, 10**6)
    heatmap_job.write_heatmap_dataset(source, out, counting, 0.05, **kwargs)
    assert counting.calls == 2 + 2 + 1                          # shards 1-3 only
    resumed = _read_all(out)
    assert [r["id"] for r in resumed] == [r["id"] for r in reference]
    for a, b in zip(resumed, reference):
        np.testing.assert_array_equal(a["heatmaps"], b["heatmaps"])
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]

    with pytest.raises(ValueError, match="scale_constant"):   # other settings are not mixed in
        heatmap_job.write_heatmap_dataset(source, out, fn, 0.07, **kwargs)
    # The towers check a heatmap dataset against the image split before training.
    maps = heatmap_job.HeatmapSource(out)
    maps.check_matches(source, 2)
    reordered = ArraySource({k: v[::-1] for k, v in source.arrays.items()})
    with pytest.raises(ValueError, match="image record 0 has id 'rec-9', its heatmap record id "
                                         "'rec-0'"):
        maps.check_matches(reordered, 2)
    with pytest.raises(ValueError, match=r"2 channel\(s\) \['Left', 'no:Right'\], the towers "
                                         r"expect 1"):
        maps.check_matches(source, 1)
    small = ArraySource({**source.arrays, "image": source.arrays["image"][:, :H // 2]})
    with pytest.raises(ValueError, match=rf"the heatmaps are {H}x{W}, the images {H // 2}x{W}"):
        maps.check_matches(small, 2)
    with pytest.raises(ValueError, match="has 10 records, the image split 9"):
        maps.check_matches(ArraySource({k: v[:9] for k, v in source.arrays.items()}), 2)


def test_processes_write_disjoint_shards_and_a_rerun_completes(tmp_path, monkeypatch):
    """Process p of P writes shards p, p + P, ...; the other process's temp files are left
    alone; whichever process is rerun completes its own shards, the result is one dataset."""
    fn, source = small_heatmap_fn(), _source()
    out, kwargs = str(tmp_path / "two"), dict(batch_size=2, shard_size=3)
    # Process 1 of a 2-process heatmap job (`heatmap_job.job_process`: from the environment).
    monkeypatch.setenv("DAUG_COORDINATOR", "127.0.0.1:1")
    monkeypatch.setenv("DAUG_NUM_PROCESSES", "2")
    monkeypatch.setenv("DAUG_PROCESS_ID", "1")
    os.makedirs(out)
    other = os.path.join(out, "heatmaps-00000-of-00004.array_record.tmp")  # process 0, running
    with open(other, "wb") as f:
        f.write(b"in progress")
    heatmap_job.write_heatmap_dataset(source, out, fn, 0.05, **kwargs)
    assert os.path.exists(other)
    assert sorted(n for n in os.listdir(out) if n.endswith(".array_record")) == [
        "heatmaps-00001-of-00004.array_record", "heatmaps-00003-of-00004.array_record"]
    os.remove(other)  # process 0 was killed; its rerun completes shards 0 and 2
    monkeypatch.setenv("DAUG_PROCESS_ID", "0")
    counting = FailAfter(fn, 10**6)
    heatmap_job.write_heatmap_dataset(source, out, counting, 0.05, **kwargs)
    assert counting.calls == 2 + 2
    assert [r["id"] for r in _read_all(out)] == [f"rec-{i}" for i in range(10)]


# ----------------------------------------------------------------------------- localization
def test_select_cases_and_pointing_on_known_regions():
    """"Left" regions are the left half, "Right" regions the right half: guidance towards or away
    from a class changes only the half its logit reads, so every case is a hit."""
    n = 6
    labels = np.zeros((n, 3), np.int8)
    labels[:3, 1], labels[3:, 2], labels[2, 2] = 1, 1, -1
    left = np.zeros((H, W), bool)
    left[:, : W // 2] = True
    masks = np.zeros((n, 3, H, W), bool)
    masks[labels[:, 1] == 1, 1], masks[labels[:, 2] != 0, 2] = left, ~left
    sites = np.zeros((n, 3, H, W), bool)
    sites[:, 1], sites[:, 2] = left, ~left
    cases = localization.select_cases(labels, {"masks": masks, "sites": sites}, CLASSES,
                                      ("Left", "Right"), 2)
    for mode, want in (("anomaly", {1: [0, 1, 2], 2: [3, 4, 5]}),
                       ("site", {1: [3, 4, 5], 2: [0, 1]})):   # film 2 is uncertain for "Right"
        for c, films in want.items():
            chosen = cases[mode]["image"][cases[mode]["class"] == c]
            assert len(chosen) == 2 and set(chosen) <= set(films)
    np.testing.assert_array_equal(cases["anomaly"]["region"][cases["anomaly"]["class"] == 1],
                                  np.broadcast_to(left, (2, H, W)))

    models = closed_form_models()
    images = np.random.default_rng(0).uniform(-0.3, 0.3, (n, H, W, 1)).astype(np.float32)
    out = localization.translate_cases(models, make_translation(models, SETTINGS), images, cases,
                                       scales=[0.0, 2.0], batch_size=3, data_classes=CLASSES)
    assert np.abs(out["scales"][0.0]["anomaly"]["translated"]
                  - images[cases["anomaly"]["image"]]).max() < 1e-5
    assert set(cases) == {"anomaly", "channel", "site"}  # masks also score the "No Finding" map
    result = localization.score(out, 2.0, cases, CLASSES)
    for mode in localization.MODES:
        assert result[mode]["pointing_game"] == 1.0 and result[mode]["n"] == 4
        assert result[mode]["chance"] == pytest.approx(0.5)
        assert set(result[mode]["per_class"]) == {"Left", "Right"}
        # Controls.  Swapped: each film guided towards the other class changes the other half:
        # every case a miss, difference exactly 1.  Unguided: zero eps reconstructs the film
        # (to float rounding), so the map holds no signal; its difference is guided − control.
        swapped, unguided = result[mode]["swapped"], result[mode]["unguided"]
        assert swapped["pointing_game"] == 0.0 and swapped["n"] == 4
        assert swapped["difference"] == {"mean": 1.0, "ci95": [1.0, 1.0], "n": 4}
        assert np.abs(out["unguided"][mode]).max() < 1e-5
        assert unguided["difference"]["mean"] == pytest.approx(1.0 - unguided["pointing_game"])
    # Direction: anomaly cases were guided away from their class, site cases towards it.
    logit = lambda x, c: np.asarray(linear_logits(x, None))[:, c]
    for mode, sign in (("anomaly", -1), ("site", 1)):
        img, cls = cases[mode]["image"], cases[mode]["class"]
        moved = logit(out["scales"][2.0][mode]["translated"], cls) - logit(images[img], cls)
        assert np.all(sign * np.diag(moved) > 0)


def test_channel_region_is_the_union_of_the_films_findings():
    """The "No Finding" map is one map for every finding: its region is every finding of the
    film (uncertain ones left out), while the anomaly mode keeps the case's own class."""
    left = np.zeros((H, W), bool)
    left[:, : W // 2] = True
    labels = np.array([[0, 1, 1], [0, 1, -1]], np.int8)
    masks = np.zeros((2, 3, H, W), bool)
    masks[:, 1], masks[:, 2] = left, ~left
    cases = localization.select_cases(labels, {"masks": masks}, CLASSES, ("Left", "Right"), 2)
    channel, anomaly = cases["channel"], cases["anomaly"]
    both = channel["region"][(channel["image"] == 0) & (channel["class"] == 1)][0]
    assert both.all()  # film 0 has both findings: the whole film
    only_left = channel["region"][channel["image"] == 1][0]
    np.testing.assert_array_equal(only_left, left)  # film 1's "Right" is uncertain
    np.testing.assert_array_equal(anomaly["region"][anomaly["image"] == 0][0], left)


def test_level_above_the_classifier_s_trained_levels_is_rejected():
    """Every translation (heatmap job, localization, benchmark) is made by `make_translation`."""
    with pytest.raises(ValueError, match=r"L = 600 is above.*max_level = 500"):
        make_translation(closed_form_models(max_level=500), SETTINGS, level=600)
    # At the trained level, and for models of unknown training (None), it builds.
    assert make_translation(closed_form_models(max_level=500), SETTINGS, level=500).grid[-1] == 500
    assert make_translation(closed_form_models(), SETTINGS, level=600).grid[-1] == 600
