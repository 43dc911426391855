"""A population of towers (one vmapped program) ends where each member trained alone ends.

Tolerance: float32, after 6 steps at lr 0.01.  The batched products of the vmapped step sum in
another order than the single step's (logged losses agree to 1e-6), and Adam's division by
sqrt(v) turns that rounding into differences of up to ~1e-3 in the few parameters whose gradient
is near zero (zero-initialised norm scales and the kernels feeding them: measured 25 of 288
elements of one kernel, at most 9e-4; 1.4 % of all elements off by more than 1e-4).  So: every
parameter within 2e-3, and fewer than 5 % of all elements off by more than 1e-4; the wrong run
(another fill and clip weight, same seed) differs by 1e-2 or more in most elements (checked).
"""

import os
import shutil

import jax
import numpy as np
import pytest

from daug_jax import train
from daug_jax.data import synthetic
from tests.test_two_tower import QUIET, _config, _maps, _src, compile_once  # noqa: F401

STEPS = 6
MEMBERS = [
    {"name": "baseline", "seed": 0, "fill": "repeat", "clip_weight": 1.0},
    {"name": "daug_hybrid", "seed": 1, "fill": "heatmaps", "clip_weight": 0.5},
    {"name": "class_only", "seed": 0, "fill": "heatmaps", "clip_weight": 0.0},
]


def _pop_config():
    config = _config()
    config.train.update(steps=STEPS, batch_size=8, checkpoint_every=3, log_every=3,
                        prng_impl="threefry2x32",
                        member_chunk=2)  # a vmapped block of 2 and one of 1
    return config


@pytest.fixture(scope="module")
def films():
    data = synthetic.generate(16, image_size=32, seed=3)
    maps = np.random.default_rng(0).uniform(size=(16, 32, 32, 2)).astype(np.float32)
    return data, _maps(data, maps)


@pytest.fixture(scope="module")
def population_run(compile_once, films, tmp_path_factory):  # noqa: F811
    data, maps = films
    workdir = str(tmp_path_factory.mktemp("population"))
    state, histories = train.train_population(_pop_config(), MEMBERS, _src(data), workdir,
                                              heatmaps=maps, **QUIET)
    return workdir, jax.device_get(state), histories


def _alone(member, films, workdir, tokenizer_dir):
    data, maps = films
    # The population learnt one vocabulary from the reports; a class-only run alone would learn
    # one from the prompts only.  Same vocabulary, same parameter shapes: start from its copy.
    shutil.copytree(tokenizer_dir, os.path.join(workdir, "tokenizer"))
    config = _pop_config()
    config.train.seed, config.train.clip_weight = member["seed"], member["clip_weight"]
    config.model.vision.fill = member["fill"]
    state, history = train.train_towers(config, _src(data), workdir,
                                        heatmaps=maps if member["fill"] == "heatmaps" else None,
                                        **QUIET)
    return jax.device_get(state), history


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def _share_off(a, b, atol=1e-4):
    """Fraction of all elements of two equal-structure trees that differ by more than atol."""
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return sum(int((np.abs(x - y) > atol).sum()) for x, y in pairs) / sum(x.size for x, _ in pairs)


def test_population_members_equal_runs_trained_alone(population_run, films, tmp_path):
    workdir, state, histories = population_run
    assert int(state.step[0]) == STEPS and state.step.shape == (len(MEMBERS),)
    alone = {}
    for i, member in enumerate(MEMBERS):
        alone[member["name"]], history = _alone(member, films, str(tmp_path / member["name"]),
                                                os.path.join(workdir, "tokenizer"))
        mine = jax.tree.map(lambda x: x[i], (state.params, state.batch_stats))
        theirs = (alone[member["name"]].params, alone[member["name"]].batch_stats)
        assert _max_diff(mine, theirs) < 2e-3, member["name"]
        assert _share_off(mine, theirs) < 0.05, member["name"]
        got = histories[member["name"]]
        assert [r["step"] for r in got] == [r["step"] for r in history] == [3, 6]
        keys = ["image_class"] + (["image_text", "loss"] if member["clip_weight"] else [])
        for key in keys:  # a class-only member alone trains on a placeholder text
            np.testing.assert_allclose([r[key] for r in got], [r[key] for r in history],
                                       rtol=1e-4, err_msg=f"{member['name']} {key}")
    # The comparison can fail: members with another fill and weight are far apart.
    a, b = alone["baseline"].params, alone["class_only"].params  # same seed, other fill and w
    assert _max_diff(a, b) > 1e-2 and _share_off(a, b) > 0.5


def test_load_towers_reads_one_member(population_run, films):
    workdir, state, _ = population_run
    with pytest.raises(ValueError, match=r"holds 3 towers; name one of \['baseline'"):
        train.load_towers(workdir)
    with pytest.raises(ValueError, match=r"no member 'nope'"):
        train.load_towers(workdir, "nope")
    _, variables, _, config = train.load_towers(workdir, "daug_hybrid")
    assert config.model.vision.fill == "heatmaps" and config.train.clip_weight == 0.5
    assert config.train.seed == 1
    same = jax.tree.map(lambda x, y: np.array_equal(x, y[1]),
                        jax.device_get(variables["params"]), state.params)
    assert all(jax.tree.leaves(same))


def test_resumed_population_equals_uninterrupted(population_run, films, tmp_path):
    data, maps = films
    _, expected, _ = population_run
    workdir = str(tmp_path / "resumed")
    train.train_population(_pop_config(), MEMBERS, _src(data), workdir, heatmaps=maps,
                           until_step=3, **QUIET)
    state, histories = train.train_population(_pop_config(), MEMBERS, _src(data), workdir,
                                              heatmaps=maps, **QUIET)
    same = jax.tree.map(np.array_equal, jax.device_get(state.params), expected.params)
    assert all(jax.tree.leaves(same))
    assert [r["step"] for r in histories["daug_hybrid"]] == [3, 6]


def test_chunks_split_join_round_trip():
    """`Chunks` splits a stacked tree into blocks of the member axis and joins them back."""
    from daug_jax.population import Chunks

    tree = {"a": np.arange(5 * 3, dtype=np.float32).reshape(5, 3),
            "b": {"c": np.arange(5, dtype=np.int32)}}
    chunks = Chunks(5, 2)
    parts = chunks.split(tree)
    assert [p["b"]["c"].tolist() for p in parts] == [[0, 1], [2, 3], [4]]
    np.testing.assert_array_equal(parts[1]["a"], tree["a"][2:4])
    joined = chunks.join(parts)
    for got, want in zip(jax.tree.leaves(joined), jax.tree.leaves(tree)):
        np.testing.assert_array_equal(got, want)
    whole = Chunks(5, None)
    assert len(whole.split(tree)) == 1
    np.testing.assert_array_equal(whole.join(whole.split(tree))["a"], tree["a"])
