"""Two-tower training: loss decrease, determinism, exact resume, input checks, class prompts."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from daug_jax import tower_inputs, train
from daug_jax.config import load_config
from daug_jax.data import synthetic
from daug_jax.data.pipeline import ArraySource
from daug_jax.models import text as text_lib
from daug_jax.models.two_tower import (TwoTower, build_two_tower, clamp_logit_scale,
                                       l2_normalize, text_shape)

STEPS = 8
QUIET = dict(class_names=synthetic.CLASS_NAMES, progress=False)  # the benchmark's classes


def _config():
    """experiments/towers.py shrunk to compile fast: 32 px, batch 8, a 2-stage ResNet with
    BatchNorm (so running statistics go through the step and the checkpoint), a 1-layer BERT."""
    overrides = ["train.batch_size=8", f"train.steps={STEPS}", "train.warmup=1", "train.lr=0.01",
                 "train.log_every=1", "train.checkpoint_every=4", "model.vision.norm=batch",
                 "model.embed_dim=16", "model.text.hidden_size=16", "model.text.num_layers=1",
                 "model.text.intermediate_size=32", "model.text.vocab_size=300",
                 "model.text.max_length=48"]
    config = load_config("towers", overrides)
    config.model.vision.resnet = dict(stage_sizes=(1, 1), widths=(4, 8), stem_width=4,
                                      norm_groups=2)
    # A few steps: compile time dominates, and the low optimisation level halves it.
    config.train.compiler_options = {"xla_backend_optimization_level": 0}
    return config


@pytest.fixture(scope="module")
def data():
    return synthetic.generate(8, image_size=32, seed=0)


def _src(data):
    """The in-memory films as a random-access split (what the trainer streams from)."""
    return ArraySource({k: data[k] for k in ("image", "labels", "report", "id")})


def _maps(data, heatmaps):
    """A heatmap dataset aligned with ``data`` by index."""
    return ArraySource({"id": data["id"], "heatmaps": heatmaps})


@pytest.fixture(scope="module")
def compile_once(tmp_path_factory):
    """JAX's persistent compilation cache for this module: the runs below trace the same
    program, so only the first one pays for XLA compilation (tens of seconds on 2 cores)."""
    old = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs,
           jax.config.jax_persistent_cache_min_entry_size_bytes)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", old[2])
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def uninterrupted(compile_once, data, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    state, history = train.train_towers(_config(), _src(data), workdir, **QUIET)
    return workdir, jax.device_get(state), history


def test_training_reduces_both_loss_parts(uninterrupted):
    _, state, history = uninterrupted
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))
    first, last = history[0], history[-1]
    assert last["image_text"] < first["image_text"] - 0.05, (first, last)
    assert last["image_class"] < first["image_class"] - 0.05, (first, last)
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in history)
    # The logged total is w * L_it + (1 - w) * L_ic with w = train.clip_weight = 0.5.
    np.testing.assert_allclose(last["loss"], 0.5 * (last["image_text"] + last["image_class"]),
                               rtol=1e-5)
    assert int(state.step) == STEPS
    # BatchNorm running averages were updated by the steps and carried in the state.
    stem = state.batch_stats["image_tower"]["backbone"]["stem_norm"]
    assert float(np.abs(stem["mean"]).max()) > 1e-3


def _without_timing(history):
    return [{k: v for k, v in r.items() if k != "sec_per_step"} for r in history]


def test_resume_is_deterministic_and_equals_uninterrupted_run(uninterrupted, data, tmp_path):
    """Stop after 4 steps, rerun: same parameters, batch statistics and per-step metrics as the
    uninterrupted run (and the first 4 steps of a fresh run reproduce it exactly: determinism)."""
    workdir_a, state_a, history_a = uninterrupted
    workdir = str(tmp_path / "resumed")
    # The vocabulary belongs to the run; share it so both runs see the same token ids.
    shutil.copytree(os.path.join(workdir_a, "tokenizer"), os.path.join(workdir, "tokenizer"))
    _, history_1 = train.train_towers(_config(), _src(data), workdir, until_step=4, **QUIET)
    assert _without_timing(history_1) == _without_timing(history_a[:4])
    # A killed run may have logged steps after its last checkpoint: the rerun drops them.
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({**history_a[4], "loss": -1.0}) + "\n")
    state_b, history_b = train.train_towers(_config(), _src(data), workdir, **QUIET)
    assert _without_timing(history_b) == _without_timing(history_a)
    state_b = jax.device_get(state_b)
    assert int(state_b.step) == STEPS
    same = jax.tree.map(np.array_equal, (state_a.params, state_a.batch_stats),
                        (state_b.params, state_b.batch_stats))
    assert all(jax.tree.leaves(same))


def test_load_towers_restores_the_final_state(uninterrupted, data):
    workdir, state, _ = uninterrupted
    model, variables, tokenizer, config = train.load_towers(workdir)
    assert config.model.vision.norm == "batch"
    same = jax.tree.map(np.array_equal, jax.device_get(variables["params"]), state.params)
    assert all(jax.tree.leaves(same))
    images = tower_inputs.assemble_images(jnp.asarray(data["image"][:2]), None, 3, "repeat")
    emb = model.apply(variables, images, method=TwoTower.encode_image)
    assert emb.shape == (2, 16)
    np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    ids = tokenizer(["small left pleural effusion."])["input_ids"][0]
    assert tokenizer.unk_token_id not in ids


def _lowered_step(config, data, workdir, heatmaps=None):
    """The train step of ``config`` on ``data``, lowered for its real arguments:
    (program text, initial state, batch)."""
    reader = tower_inputs.make_reader(config, _src(data), synthetic.CLASS_NAMES, heatmaps)
    tokenizer = tower_inputs.make_tokenizer(config.model.text, tower_inputs.report_corpus(reader),
                                            workdir)
    length = int(config.model.text.max_length)
    arrays = tower_inputs.tower_batch(config, tokenizer, reader(range(len(data["id"]))))
    class_tokens = text_lib.tokenize(tokenizer, tower_inputs.class_prompts(
        list(config.model.class_names)), length)
    model = build_two_tower(config.model, text_shape(config.model.text, len(tokenizer)))
    tx, schedule = train.make_optimizer(config.train)
    example = {k: v[:1] for k, v in arrays.items()}
    init = train.init_fn(model, tx, example, class_tokens, config.train.prng_impl)
    state = jax.jit(init)(config.train.seed, config.train.clip_weight)
    step = train.make_train_step(model, tx, schedule, class_tokens, config)
    batch = {k: v[:8] for k, v in arrays.items()}
    return jax.jit(step).lower(state, batch).as_text(), state, batch


def test_ablation_variants_run_one_program(compile_once, data, tmp_path):
    """The baseline (image repeated, CLIP loss only) and DAug + hybrid (heatmap channels, λ = 1)
    differ in their data and state (seed, loss weight), not in their compiled train step: one
    compilation serves the whole ablation."""
    rng = np.random.default_rng(0)
    maps = rng.uniform(size=(8, 32, 32, 2)).astype(np.float32)
    baseline = _config()
    baseline.train.clip_weight = 1.0
    daug_hybrid = _config()
    daug_hybrid.model.vision.fill = "heatmaps"
    daug_hybrid.train.seed = 3
    # Separate workdirs: each run learns its own tokenizer, as the ablation's runs do.
    text_a, state_a, batch_a = _lowered_step(baseline, data, str(tmp_path / "a"))
    text_b, state_b, batch_b = _lowered_step(daug_hybrid, data, str(tmp_path / "b"),
                                             _maps(data, maps))
    assert float(state_a.clip_weight) == 1.0 and float(state_b.clip_weight) == 0.5
    assert int(state_a.seed) == 0 and int(state_b.seed) == 3
    np.testing.assert_array_equal(batch_a["image"][..., 1], batch_a["image"][..., 0])
    np.testing.assert_allclose(batch_b["image"][..., 1:], maps)
    assert text_a == text_b


def test_channel_count_mismatch_is_a_clear_error(data, tmp_path):
    config = _config()
    config.model.vision.fill = "heatmaps"
    one_map = _maps(data, np.zeros((8, 32, 32, 1), np.float32))
    with pytest.raises(ValueError,
                       match=r"in_channels is 3 .* got 1 image \+ 1 heatmap channels = 2"):
        train.train_towers(config, _src(data), str(tmp_path), heatmaps=one_map, **QUIET)
    with pytest.raises(ValueError, match=r"no heatmap dataset"):
        train.train_towers(config, _src(data), str(tmp_path), **QUIET)
    with pytest.raises(ValueError, match=r"heatmap dataset has 4 records, the image split 8"):
        train.train_towers(config, _src(data), str(tmp_path), **QUIET,
                           heatmaps=_maps({"id": data["id"][:4]}, np.zeros((4, 32, 32, 2))))
    shuffled = _maps({"id": data["id"][::-1]}, np.zeros((8, 32, 32, 2), np.float32))
    with pytest.raises(ValueError, match=r"record \d+ of the image split has id 'syn-0-\d' but "
                                         r"its heatmap record has id 'syn-0-\d'"):
        train.train_towers(config, _src(data), str(tmp_path), heatmaps=shuffled, **QUIET)
    rgb = {**data, "image": np.repeat(data["image"], 3, axis=-1)}
    with pytest.raises(ValueError, match=r"\[B, H, W, 1\].*\(8, 32, 32, 3\)"):
        train.train_towers(_config(), _src(rgb), str(tmp_path), **QUIET)


def test_unknown_class_name_is_a_clear_error(data, tmp_path):
    config = _config()
    config.model.class_names = ("Cardiomegaly", "Pleural Effusions")
    with pytest.raises(ValueError, match=r"'Pleural Effusions'.*valid: \['No Finding'"):
        train.train_towers(config, _src(data), str(tmp_path), **QUIET)


def test_empty_report_names_the_record(data, tmp_path):
    reports = data["report"].copy()
    reports[5] = "   "
    reports[:] = "   "  # every record: the first batch names one
    with pytest.raises(ValueError, match=r"record id 'syn-0-\d' has an empty report"):
        train.train_towers(_config(), _src({**data, "report": reports}), str(tmp_path),
                           **QUIET)


def test_class_prompts_and_normalisation():
    assert tower_inputs.class_prompts(["No Finding", "Pleural Effusion"]) == [
        "a chest X-ray with no findings", "a chest X-ray showing pleural effusion"]
    x = np.random.default_rng(0).normal(size=(4, 5))
    np.testing.assert_allclose(l2_normalize(jnp.asarray(x)),
                               x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-5)


def test_scalar_parameters_start_and_clip_as_documented():
    model = TwoTower(image_tower=None, text_tower=None)
    params = model.init(jax.random.key(0, impl="rbg"), method=TwoTower.scalars)["params"]
    out = model.apply({"params": params}, method=TwoTower.scalars)
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
    np.testing.assert_allclose(out["class_scale"], 10.0, rtol=1e-5)
    np.testing.assert_allclose(out["class_bias"], -10.0)
    params = {**params, "log_logit_scale": jnp.asarray(np.log(500.0), jnp.float32)}
    capped = model.apply({"params": params}, method=TwoTower.scalars)["logit_scale"]
    np.testing.assert_allclose(capped, 100.0, rtol=1e-5)


def test_logit_scale_parameter_is_clamped_so_its_gradient_survives():
    """CLIP clamps the stored log temperature itself: clipped only when read, a log above the
    cap gets zero gradient and never comes back; clamped, it sits at the cap with a gradient."""
    model = TwoTower(image_tower=None, text_tower=None)
    params = model.init(jax.random.key(0, impl="rbg"), method=TwoTower.scalars)["params"]
    above = {**params, "log_logit_scale": jnp.asarray(np.log(500.0), jnp.float32)}

    def grad_at(p):
        return jax.grad(lambda p: model.apply({"params": p}, method=TwoTower.scalars)
                        ["logit_scale"])(p)["log_logit_scale"]

    assert float(grad_at(above)) == 0.0  # the trap: stuck above the cap
    clamped = clamp_logit_scale(above, model.max_logit_scale)
    np.testing.assert_allclose(clamped["log_logit_scale"], np.log(100.0), rtol=1e-7)
    assert float(grad_at(clamped)) > 0.0
    below = clamp_logit_scale(params, model.max_logit_scale)
    assert float(below["log_logit_scale"]) == float(params["log_logit_scale"])
    assert all(below[k] is params[k] for k in params if k != "log_logit_scale")


def test_train_step_clamps_the_stored_logit_scale(compile_once, data, tmp_path):
    config = _config()
    config.model.logit_scale_init = float(np.log(500.0))  # starts above CLIP's cap of 100
    state, _ = train.train_towers(config, _src(data), str(tmp_path), until_step=1,
                                  **QUIET)
    np.testing.assert_allclose(jax.device_get(state.params["log_logit_scale"]), np.log(100.0),
                               rtol=1e-6)
