"""The synthetic chest X-ray benchmark: contract, determinism, label/mask/report consistency,
findings drawn where their masks say, prevalence, and the ``data show``/``data bench`` commands."""

import math
import re

import numpy as np
import pytest

from daug_jax.data import show, synthetic

C = len(synthetic.CLASS_NAMES)
LOCALIZED = list(range(1, C))

# An independent, CheXpert-style rule labeler: sentence-level mention, negation and hedge cues.
TERMS = {"Cardiomegaly": r"cardiomegaly|enlarge", "Pleural Effusion": r"effusion|blunting",
         "Pneumothorax": r"pneumothora", "Consolidation": r"consolidat|airspace",
         "Atelectasis": r"atelecta", "Lung Lesion": r"nodul|\bmass\b|lesion"}
NEGATION = re.compile(r"\bno\b|\bwithout\b|\bnegative for\b|\bnot\b|\bfree of\b")
HEDGE = re.compile(r"cannot (?:be )?exclude|possibl|may represent|questionable|borderline|suggest")


def rule_label(report: str, cls: str) -> int:
    sentences = re.split(r"\.(?!\d)|\n", report.lower())
    mentions = [s for s in sentences if re.search(TERMS[cls], s)]
    if any(not NEGATION.search(s) and not HEDGE.search(s) for s in mentions):
        return 1
    return -1 if any(HEDGE.search(s) and not NEGATION.search(s) for s in mentions) else 0


@pytest.fixture(scope="module")
def bench2000():
    return synthetic.generate(2000, image_size=32, seed=0)


def dilate(m):
    """One-pixel (3x3) binary dilation of [N, H, W] masks."""
    out = m.copy()
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    grown = out.copy()
    grown[:, :, 1:] |= out[:, :, :-1]
    grown[:, :, :-1] |= out[:, :, 1:]
    return grown


@pytest.mark.parametrize("size", [32, 64])
def test_contract_shapes_dtypes_and_ranges(size):
    d = synthetic.generate(24, image_size=size, seed=3)
    assert d["image"].shape == (24, size, size, 1) and d["image"].dtype == np.float32
    assert 0.0 <= d["image"].min() and d["image"].max() <= 1.0 and d["image"].std() > 0.1
    assert d["labels"].shape == (24, C) and d["labels"].dtype == np.int8
    assert set(np.unique(d["labels"])) <= {-1, 0, 1}
    for key in ("masks", "sites"):
        assert d[key].shape == (24, C, size, size) and d[key].dtype == np.bool_
        assert not d[key][:, 0].any()  # "No Finding" has no region
    assert d["report"].shape == (24,) and all(len(r) > 40 for r in d["report"])
    assert list(d["id"]) == [f"syn-3-{i}" for i in range(24)]
    assert synthetic.LOCALIZED_CLASSES == synthetic.CLASS_NAMES[1:]
    # Sites: non-empty for every localized class in every image; masks lie within them.
    assert d["sites"][:, 1:].any(axis=(2, 3)).all()
    assert not (d["masks"] & ~d["sites"]).any()
    assert not d["masks"][d["labels"] == 0].any()


def test_same_seed_same_records_and_chunks_match_one_call():
    a = synthetic.generate(16, image_size=32, seed=7)
    b = synthetic.generate(16, image_size=32, seed=7)
    parts = [synthetic.generate(n, image_size=32, seed=7, start=s)
             for s, n in ((0, 5), (5, 9), (14, 2))]
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a[key], np.concatenate([p[key] for p in parts]))
    other = synthetic.generate(16, image_size=32, seed=8)
    assert not np.allclose(a["image"], other["image"])
    assert list(a["report"]) != list(other["report"])
    # What a record says does not depend on the size it is drawn at.
    big = synthetic.generate(16, image_size=48, seed=7)
    np.testing.assert_array_equal(a["labels"], big["labels"])
    np.testing.assert_array_equal(a["report"], big["report"])


def test_num_zero_gives_empty_arrays_with_trailing_shapes():
    d = synthetic.generate(0, image_size=40)
    assert d["image"].shape == (0, 40, 40, 1) and d["labels"].shape == (0, C)
    assert d["masks"].shape == d["sites"].shape == (0, C, 40, 40)
    assert d["report"].shape == d["id"].shape == (0,)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num=-1), "num must be >= 0"), (dict(num=2.0), "num must be an int"),
    (dict(num=True), "num must be an int"), (dict(num=2, image_size=31), "image_size must be >= 32"),
    (dict(num=2, image_size="64"), "image_size must be an int"),
    (dict(num=2, seed=-3), "seed must be >= 0"), (dict(num=2, start=-1), "start must be >= 0"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    num = kwargs.pop("num")
    with pytest.raises(ValueError, match=match):
        synthetic.generate(num, **kwargs)


def test_render_rejects_unknown_findings():
    with pytest.raises(ValueError, match="Pneumonia"):
        synthetic.render([synthetic.sample_case(0, 0)], 32, drop=("Pneumonia",))


def test_labels_masks_and_reports_agree(bench2000):
    d = bench2000
    labels, has_mask = d["labels"], d["masks"].any(axis=(2, 3))
    # Positive findings are drawn (at 32 px); findings never stated are not.
    assert has_mask[:, 1:][labels[:, 1:] == 1].all()
    assert not has_mask[labels == 0].any()
    # "No Finding" = 1 exactly when nothing is positive or uncertain.
    np.testing.assert_array_equal(labels[:, 0] == 1, ~(labels[:, 1:] != 0).any(axis=1))
    assert not ((labels[:, 0] == 1) & (labels[:, 1:] == 1).any(axis=1)).any()
    # The report, read by an independent rule labeler, gives back every label.
    for i, report in enumerate(d["report"]):
        got = [rule_label(report, c) for c in synthetic.LOCALIZED_CLASSES]
        assert got == list(labels[i, 1:]), (d["id"][i], report, got, labels[i])
    # Phrasing varies: many distinct reports and many distinct effusion sentences.
    assert len(set(d["report"])) > 0.9 * len(d["report"])
    effusion = {s.strip() for r in d["report"] for s in re.split(r"\.(?!\d)|\n", r.lower())
                if "effusion" in s and "no " not in s}
    assert len(effusion) >= 20


def test_prevalence_and_site_sizes(bench2000):
    labels, sites = bench2000["labels"], bench2000["sites"]
    prevalence = (labels == 1).mean(axis=0)
    table = dict(zip(synthetic.CLASS_NAMES, np.round(prevalence, 3)))
    assert 0.28 <= prevalence[0] <= 0.40, table
    assert (prevalence[1:] >= 0.08).all(), table
    assert ((labels == -1).mean(axis=0)[1:] > 0.005).all()  # hedged findings exist for every class
    chance = sites[:, 1:].mean(axis=(0, 2, 3))  # the pointing game's chance rate
    assert (chance < 0.4).all() and (chance > 0.02).all(), chance


@pytest.mark.parametrize("size", [32, 64])
def test_each_finding_changes_pixels_inside_its_mask(size):
    cases = [synthetic.sample_case(11, i) for i in range(240)]
    labels = np.array([c["labels"] for c in cases])
    for c in LOCALIZED:
        name = synthetic.CLASS_NAMES[c]
        chosen = [case for case, lab in zip(cases, labels[:, c]) if lab == 1][:24]
        assert len(chosen) >= 12, name
        with_f, without = synthetic.render(chosen, size), synthetic.render(chosen, size, drop=(name,))
        diff = np.abs(with_f["image"] - without["image"])[..., 0]
        mask = with_f["masks"][:, c]
        assert not without["masks"][:, c].any()
        mean_inside = (diff * mask).sum(axis=(1, 2)) / mask.sum(axis=(1, 2))
        assert (mean_inside > 0.04).all(), (name, mean_inside.min())  # > 10 grey levels: visible
        # Where pixels change: inside the mask (anti-aliased rim included), at most 1 px outside.
        total = diff.sum(axis=(1, 2))
        inside, near = ((diff * m).sum(axis=(1, 2)) / total for m in (mask, dilate(mask)))
        assert inside.min() > 0.9 and near.min() > 0.98, (name, inside.min(), near.min())


def test_cardiothoracic_ratio_matches_the_drawn_heart():
    """The closed-form heart width equals the width of the tilted ellipse traced point by point."""
    t = np.linspace(0, 2 * np.pi, 20001)
    for i in range(60):
        case = synthetic.sample_case(2, i)
        p = case["p"]
        k = p["card_k"]
        x, y = 0.55 * k * p["hrx"] + k * p["hrx"] * np.cos(t), k * p["hry"] * np.sin(t)
        u = p["hax"] + x * math.cos(p["htilt"]) - y * math.sin(p["htilt"])  # heart frame -> patient
        ctr = (u.max() - u.min()) / (sum(p["lc"]) + sum(p["rx"]))
        if case["labels"][1] == 0:
            assert 0.37 < ctr < 0.49, ctr
        else:
            assert ctr == pytest.approx(case["findings"]["Cardiomegaly"]["ctr"], abs=1e-4)
            assert ctr >= 0.5


def test_field_interpolation_matches_float64_reference():
    rng = np.random.default_rng(0)
    F = rng.random((3, 8, 8)).astype(np.float32)
    a, b = rng.random((2, 3, 5, 7)).astype(np.float32)
    got = synthetic._field(F, a, b)
    ref = np.zeros(a.shape)
    for idx in np.ndindex(a.shape):
        fa, fb = float(a[idx]) * 6.999, float(b[idx]) * 6.999
        ia, ib = int(fa), int(fb)
        wa, wb = fa - ia, fb - ib
        wa, wb = wa * wa * (3 - 2 * wa), wb * wb * (3 - 2 * wb)
        G = F[idx[0]].astype(np.float64)
        ref[idx] = ((1 - wb) * ((1 - wa) * G[ib, ia] + wa * G[ib, ia + 1])
                    + wb * ((1 - wa) * G[ib + 1, ia] + wa * G[ib + 1, ia + 1]))
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_noise_is_a_pure_function_of_seed_and_pixel():
    n = synthetic._noise([5, 6], 64)
    np.testing.assert_array_equal(n[0], synthetic._noise([5], 64)[0])
    assert abs(n.mean()) < 0.03 and abs(n.std() - 1.0) < 0.03  # triangular noise: var (2/12)*6 = 1
    assert abs(np.corrcoef(n[0].ravel(), n[1].ravel())[0, 1]) < 0.05


def test_show_and_bench_commands(tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["--out", str(out), "--num", "3", "--size", "32", "--seed", "1"]
    assert show.main("data show", argv) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert show.main("data bench", ["--num", "32", "--size", "32"]) == 0
    assert re.search(r"32 px, 32 images in [\d.]+ s -> \d+ images/s", capsys.readouterr().out)
