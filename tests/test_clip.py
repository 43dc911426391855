"""CLIP towers: parity with Hugging Face's torch CLIP, position-embedding resampling, the three
heatmap channel modes trained on the synthetic benchmark, a MIMIC-format fine-tune by CLI,
and the errors a user meets.

The checkpoint is ``tests/reference/clip_tiny`` (a random-init Hugging Face CLIP with a real
BPE tokenizer) and the torch outputs ``tests/reference/clip_reference.npz``, both written by
``tests/reference/make_clip_reference.py``; torch is never imported here.
"""

import json
import math
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from safetensors.numpy import load_file, save_file

from daug_jax import cli, train
from daug_jax.config import load_config
from daug_jax.data import registry, synthetic
from daug_jax.data.pipeline import ArraySource
from daug_jax.heatmap_job import write_heatmap_dataset
from daug_jax.models import clip, two_tower
from daug_jax.models import text as text_lib
from daug_jax.models.vision import check_channels
from daug_jax.tower_inputs import assemble_images
from fixtures_real import make_mimic_synthetic_tree

HERE = pathlib.Path(__file__).parent
CKPT = str(HERE / "reference" / "clip_tiny")
TOL = 1e-4  # the bound on max |ours - Hugging Face|
# clip_towers.py at test size: float32 on CPU, 64 text positions (77 cut to 64), projection 16,
# 12 steps of batch 8 at a rate that moves a random-init model in that many steps.
TOWERS = [f"model.vision.path={CKPT}", f"model.text.path={CKPT}", "model.vision.dtype=float32",
          "model.text.dtype=float32", "model.embed_dim=16", "model.text.max_length=64",
          "data.image_size=32", "train.batch_size=8", "train.steps=12", "train.warmup=1",
          "train.lr=3e-4", "train.log_every=1", "train.checkpoint_every=12",
          "model.vision.fill=heatmaps", "model.vision.in_channels=2"]


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(HERE / "reference" / "clip_reference.npz"))


@pytest.fixture(scope="module")
def tiny():
    return clip.load_hf_clip(CKPT)


def _max_err(ours, theirs):
    return float(np.abs(np.asarray(ours) - theirs).max())


# ----------------------------------------------------------------------------- parity
def test_features_match_hugging_face(tiny, ref):
    image_fn, text_fn, params, tokenizer = tiny
    assert _max_err(image_fn(params, ref["pixels"]), ref["image_features"]) <= TOL
    ids, mask = text_lib.tokenize(tokenizer, list(ref["texts"]), ref["input_ids"].shape[1])
    np.testing.assert_array_equal(ids, ref["input_ids"])  # the BPE tokenizer loads as saved
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    assert _max_err(text_fn(params, ids, mask), ref["text_features"]) <= TOL
    ones = np.ones_like(ref["random_ids"])
    assert _max_err(text_fn(params, ref["random_ids"], ones), ref["text_features_random"]) <= TOL


def test_legacy_eos_rule_pools_at_the_largest_id(ref, tmp_path):
    """Configs with eos_token_id 2 (written before Hugging Face's fix) pool at argmax(ids)."""
    path = shutil.copytree(CKPT, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 2
    (path / "config.json").write_text(json.dumps(config))
    _, text_fn, params, _ = clip.load_hf_clip(path)
    out = text_fn(params, ref["random_ids"], np.ones_like(ref["random_ids"]))
    assert _max_err(out, ref["text_features_random_argmax"]) <= TOL
    assert _max_err(out, ref["text_features_random"]) > 0.01  # the two rules pool elsewhere


def test_other_image_size_matches_interpolate_pos_encoding(ref):
    image_fn, _, params, _ = clip.load_hf_clip(CKPT, image_size=48)
    table = params["vision"]["vision_model"]["embeddings"]["position_embedding"]["embedding"]
    assert table.shape == (1 + 6 * 6, 32)
    assert _max_err(image_fn(params, ref["pixels_48"]), ref["image_features_48"]) <= TOL


def test_bicubic_resampling_is_torchs(ref):
    grid = ref["grid"][0]                                     # [D, 4, 4]
    cls = np.arange(grid.shape[0], dtype=np.float32)
    posemb = np.concatenate([cls[None], grid.reshape(len(cls), -1).T])  # [1 + 16, D]
    for n, torch_out in ((6, ref["grid_up"]), (3, ref["grid_down"])):
        out = clip.resample_image_posemb(posemb, n)
        assert out.shape == (1 + n * n, len(cls))
        np.testing.assert_array_equal(out[0], cls)            # the class token's position kept
        np.testing.assert_allclose(out[1:].T.reshape(-1, n, n), torch_out[0], atol=1e-5)


def test_text_positions_resample_linearly(tiny):
    table = np.asarray(tiny[2]["text"]["text_model"]["embeddings"]["position_embedding"]
                       ["embedding"])                         # [77, 32]
    src = (np.arange(154) + 0.5) * (77 / 154) - 0.5           # half-pixel centres, ends held
    expected = np.stack([np.interp(src, np.arange(77), col) for col in table.T], axis=1)
    np.testing.assert_allclose(clip.resample_text_posemb(table, 154), expected, atol=1e-6)
    np.testing.assert_array_equal(clip.resample_text_posemb(table, 40), table[:40])
    _, _, params, _ = clip.load_hf_clip(CKPT, max_length=154)
    loaded = params["text"]["text_model"]["embeddings"]["position_embedding"]["embedding"]
    np.testing.assert_allclose(loaded, expected, atol=1e-6)


def test_remat_and_bfloat16(tiny, ref):
    """``remat`` wraps every block in a rematerialisation (same outputs); bfloat16 compute
    stays near float32."""
    config = clip.ClipConfig.from_json(CKPT).vision_config
    params = {"params": tiny[2]["vision"]["vision_model"]["encoder"]}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 32)), jnp.float32)
    remat = clip.ClipEncoder(config, remat=True)
    assert str(jax.make_jaxpr(remat.apply)(params, x, None)).count("remat") >= \
        config.num_hidden_layers
    np.testing.assert_allclose(jax.jit(remat.apply)(params, x, None),
                               jax.jit(clip.ClipEncoder(config).apply)(params, x, None), atol=1e-6)
    low = jax.jit(clip.ClipVisionModel(config, dtype=jnp.bfloat16).apply)(
        {"params": tiny[2]["vision"]}, jnp.asarray(ref["pixels"]))
    assert low.dtype == jnp.float32
    assert _max_err(low, ref["image_features"]) < 0.05 * np.abs(ref["image_features"]).max()


# ----------------------------------------------------------------------------- towers
def _image_tower(tmp_ckpt=CKPT, **vision):
    """A CLIP image tower of ``model.vision`` ``vision`` with the checkpoint loaded: (module,
    params), for 32 px images."""
    cfg = ml_collections.ConfigDict({"kind": "clip", "path": tmp_ckpt, "dtype": "float32",
                                     "remat": False, **vision})
    tower = two_tower.build_image_tower(cfg, 16)
    images = jnp.zeros((1, 32, 32, int(cfg.in_channels)))
    shapes = jax.eval_shape(tower.init, jax.random.key(0), images)["params"]
    model_config = ml_collections.ConfigDict({"vision": cfg, "text": {"kind": "bert", "path": ""}})
    params = two_tower.load_pretrained({"image_tower": shapes}, model_config, None)
    return tower, params["image_tower"]


def test_image_tower_normalises_with_the_checkpoint_stats(tiny):
    """"replace" with the film in every channel (its baseline) reads [x0, x0, x0] through the
    unchanged stem, normalised by preprocessor_config.json's mean / std."""
    image_fn, _, params, _ = tiny
    film = np.random.default_rng(0).uniform(size=(2, 32, 32, 1)).astype(np.float32)
    stats = json.loads(open(os.path.join(CKPT, "preprocessor_config.json")).read())
    mean, std = np.asarray(stats["image_mean"]), np.asarray(stats["image_std"])
    expected = np.asarray(image_fn(params, (np.repeat(film, 3, -1) - mean) / std))
    tower, tower_params = _image_tower(channels="replace", in_channels=2)
    images = assemble_images(film, None, 2, "repeat")
    assert _max_err(jax.jit(tower.apply)({"params": tower_params}, images), expected) <= 1e-5


def test_adapted_stem_must_match_the_heatmap_count(tmp_path):
    """A checkpoint whose patch kernel was already adapted (2 channels) loads only into a
    tower that reads 2 channels; a 3-channel one is adapted to any count."""
    path = shutil.copytree(CKPT, tmp_path / "adapted")
    config = json.loads((path / "config.json").read_text())
    config["vision_config"]["num_channels"] = 2
    (path / "config.json").write_text(json.dumps(config))
    tensors = load_file(path / "model.safetensors")
    name = "vision_model.embeddings.patch_embedding.weight"
    tensors[name] = np.ascontiguousarray(tensors[name][:, :2])  # [W, 2, p, p]
    save_file(tensors, path / "model.safetensors")
    _, params = _image_tower(str(path), channels="stack", in_channels=2)
    kernel = params["vision_model"]["embeddings"]["patch_embedding"]["kernel"]
    np.testing.assert_array_equal(kernel, tensors[name].transpose(2, 3, 1, 0))
    with pytest.raises(ValueError, match=r"patch embedding takes 2 input channels \(a stem already "
                                         r"adapted from RGB\), but this image tower reads 3"):
        _image_tower(str(path), channels="stack", in_channels=3)
    _, params = _image_tower(channels="add", in_channels=3)  # RGB: the heatmap tower adapts it
    assert params["heatmap"]["vision_model"]["embeddings"]["patch_embedding"]["kernel"].shape \
        == (8, 8, 2, 32)


def test_errors_name_what_is_wrong(tmp_path):
    for missing in ("config.json", "model.safetensors"):
        path = shutil.copytree(CKPT, tmp_path / missing, ignore=shutil.ignore_patterns(missing))
        with pytest.raises(FileNotFoundError, match=f"CLIP checkpoint .* has no {missing}"):
            clip.load_hf_clip(path)
    with pytest.raises(FileNotFoundError, match="CLIP checkpoint directory not found"):
        clip.load_hf_clip(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="image size 30 is not divisible by the checkpoint's "
                                         "patch size 8"):
        clip.load_hf_clip(CKPT, image_size=30)
    one_too_many = r"'replace': ONE heatmap .*in_channels must be 2, got 3 \(1 image \+ 2 heatmap"
    with pytest.raises(ValueError, match=one_too_many):
        check_channels("replace", 3)
    with pytest.raises(ValueError, match=one_too_many):  # already when the config is read
        load_config("clip_towers", ["model.vision.in_channels=3"])
    with pytest.raises(ValueError, match="model.vision.path to a local Hugging Face CLIP"):
        two_tower.build_two_tower(load_config("clip_towers").model, None)
    with pytest.raises(ValueError, match="model.embed_dim is 512 but the CLIP checkpoint .* "
                                         "projects to 16"):
        two_tower.build_image_tower(load_config("clip_towers", TOWERS[:1]).model.vision, 512)


def test_weight_decay_spares_biases_and_layernorm_and_the_logit_scale_can_be_held():
    """Paper defaults (clip_towers.py): AdamW's decay reaches matrices and embeddings only; with
    ``train.learn_logit_scale=False`` the CLIP temperature does not move even with a gradient
    (the training runs below check it stays at exp(4.602))."""
    config = load_config("clip_towers", TOWERS)
    model = two_tower.build_two_tower(config.model, two_tower.text_shape(config.model.text, 0))
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 2)), ids, ids,
                            ids, ids)["params"]
    for path, decayed in jax.tree_util.tree_flatten_with_path(train.weight_decay_mask(shapes))[0]:
        names = [k.key for k in path]
        assert decayed == (names[-1] in ("kernel", "embedding")), names
    params = {"log_logit_scale": jnp.asarray(4.602), "w": jnp.ones((2, 2))}
    grads = jax.tree.map(jnp.ones_like, params)
    for learn in (False, True):
        tx, _ = train.make_optimizer(ml_collections.ConfigDict(
            dict(steps=10, lr=0.1, warmup=0, weight_decay=0.01, grad_clip=1.0,
                 learn_logit_scale=learn)))
        updates, _ = tx.update(grads, tx.init(params), params)
        assert (float(updates["log_logit_scale"]) != 0.0) == learn
        assert float(jnp.abs(updates["w"]).min()) > 0.0


# ----------------------------------------------------------------------------- training
def _clip_config(*extra):
    config = load_config("clip_towers", TOWERS + list(extra))
    # A few steps: compile time dominates, and the low optimisation level halves it.
    config.train.compiler_options = {"xla_backend_optimization_level": 0}
    return config


def _check_training(history):
    """Both loss terms fell over the run and the logit scale stayed at exp(4.602)."""
    first, last = history[0], history[-1]
    assert last["image_text"] < first["image_text"] - 0.05, (first, last)
    assert last["image_class"] < first["image_class"] - 0.05, (first, last)
    assert all(r["logit_scale"] == pytest.approx(math.exp(4.602), rel=1e-6) for r in history)


@pytest.fixture(scope="module")
def shallow(tmp_path_factory):
    """The reference checkpoint cut to one block per tower (config.json says so; the second
    block's tensors go unused): the same towers at less compile time."""
    path = tmp_path_factory.mktemp("clip") / "shallow"
    shutil.copytree(CKPT, path)
    config = json.loads((path / "config.json").read_text())
    for tower in ("text_config", "vision_config"):
        config[tower]["num_hidden_layers"] = 1
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """JAX's persistent compilation cache for this module: the MIMIC fine-tune below has the
    shapes of the "replace" run, so in one process its train step compiles once."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = [getattr(jax.config, n) for n in names]
    for name, value in zip(names, (str(tmp_path_factory.mktemp("jax_cache")), 0, 0)):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield
    for name, value in zip(names, old):
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.mark.parametrize("mode", ["stack", "replace", "add"])
def test_channel_mode_trains_on_the_synthetic_benchmark(mode, shallow, compile_cache, tmp_path):
    """Twelve steps on one batch of 8 synthetic films with a heatmap channel."""
    data = synthetic.generate(8, image_size=32, seed=0)
    source = ArraySource({k: data[k] for k in ("image", "labels", "report", "id")})
    maps = np.random.default_rng(0).uniform(size=(8, 32, 32, 1)).astype(np.float32)
    heatmaps = ArraySource({"id": data["id"], "heatmaps": maps})
    config = _clip_config(f"model.vision.channels={mode}", f"model.vision.path={shallow}",
                          f"model.text.path={shallow}")
    state, history = train.train_towers(config, source, str(tmp_path), heatmaps=heatmaps,
                                        class_names=synthetic.CLASS_NAMES, progress=False)
    _check_training(history)
    towers = {"stack": {"vision_model", "visual_projection"}, "replace": {"tower"},
              "add": {"image", "heatmap"}}
    assert set(state.params["image_tower"]) == towers[mode]


class _FilmMaps:
    """A stand-in translation for a quick heatmap dataset: |x - mean(x)|, one channel."""

    def settings(self):
        return {"targets": ["No Finding"], "image_shape": [32, 32, 1]}

    def __call__(self, x):
        x = np.asarray(x, np.float32)
        return None, np.abs(x - x.mean(axis=(1, 2), keepdims=True))


def test_mimic_format_fine_tune_from_a_clip_directory(shallow, compile_cache, tmp_path):
    """``daug-jax train --config clip_towers`` on a MIMIC-CXR-JPG tree, both towers from a
    checkpoint directory, the heatmap in channel 0 ("replace"); then ``daug-jax evaluate`` on
    its test split, which rebuilds the towers from the saved config and the directory."""
    manual, tfds_dir, maps = tmp_path / "manual", tmp_path / "tfds", tmp_path / "heatmaps"
    make_mimic_synthetic_tree(manual, num_train=16, num_validation=2, num_test=16)
    data = ["--data", "mimic_cxr", "--data-dir", str(tfds_dir)]
    assert cli.main(["data", "prepare", "mimic_cxr", "--manual-dir", str(manual),
                     "--data-dir", str(tfds_dir), "--size", "32"]) == 0
    dataset = registry.open_dataset(ml_collections.ConfigDict(
        dict(name="mimic_cxr", data_dir=str(tfds_dir), image_size=32,
             report_section="findings+impression")))
    for split in ("train", "test"):
        write_heatmap_dataset(dataset.source(split), str(maps / split), _FilmMaps(), 1.0,
                              batch_size=8)
    # The synthetic benchmark's 7 classes (CheXpert names): the "replace" run's program.
    sets = TOWERS + ["model.vision.channels=replace", f"model.vision.path={shallow}",
                     f"model.text.path={shallow}", f"data.heatmaps_dir={maps}",
                     f"model.class_names={tuple(synthetic.CLASS_NAMES)}",
                     "train.compiler_options={'xla_backend_optimization_level': 0}"]
    towers = tmp_path / "towers"
    assert cli.main(["train", "--config", "clip_towers", "--workdir", str(towers), *data,
                     *[a for s in sets for a in ("--set", s)]]) == 0
    history = [json.loads(line) for line in open(towers / "metrics.jsonl")]
    assert [r["step"] for r in history] == list(range(1, 13))
    assert all(np.isfinite(r["loss"]) for r in history)
    assert history[-1]["image_text"] < history[0]["image_text"]
    out = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--towers", str(towers), *data, "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert 0.0 <= metrics["macro_auroc"] <= 1.0 and "i2t_R@5" in metrics
