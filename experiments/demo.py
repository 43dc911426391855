"""``daug-jax demo``: the experiment (`daug_jax.experiment`) on the synthetic benchmark, sized
for a 2-core CPU; the shape of every experiment config (``daug-jax experiment --config NAME``).

Every stage reuses the stage's own config (experiments/diffusion.py, heatmaps.py, towers.py)
with the sizes below; ``demo:quick`` (``daug-jax demo --quick``) shrinks everything for a smoke
test of the whole pipeline; ``demo:compare`` is the protocol translation recipes are compared by
(README, "Heatmap channels"): every figure on the validation films, the classification setting
of the ablation alone.  Why each size: docs/measurements.md.
"""

import ml_collections

from experiments import diffusion, heatmaps, towers
from experiments.ablation import SETTINGS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "quick", "compare"):
        raise ValueError(f"unknown demo config argument {arg!r}; expected 'quick' or 'compare'")
    quick = arg == "quick"
    config = ml_collections.ConfigDict()
    config.out = "runs/quick" if quick else "runs/demo"
    # Any registered dataset (`--data NAME --data-dir DIR`); here the synthetic benchmark, built
    # under data_dir on first use.  Its splits: train_split (diffusion, classifier, towers; the
    # retrieval gallery), validation (the encode level, DDIM moves and guidance scale are chosen
    # there) and test (every reported figure).
    config.data = dict(name="synthetic_cxr", data_dir="runs/tfds", image_size=32,
                       num_train=1024, num_validation=256, num_test=512, seed=0,
                       train_split="train", label_policy="ignore",
                       report_section="findings+impression")
    # Trained products to reuse instead of training them under `out` ("" = `out`/<stage>): a
    # user with a trained diffusion model runs only what is missing.
    config.diffusion_workdir = ""
    config.classifier_workdir = ""
    config.heatmaps_workdir = ""
    # Every seed trains all eight runs (two settings x four variants); all 24 are one population.
    config.seeds = (0, 1, 2)
    config.ablation = SETTINGS
    # The films every reported figure comes from (towers' queries, localization): the test
    # split, looked at once; "validation" to compare recipes without looking at test films.
    config.eval_split = "test"

    config.diffusion = diffusion.get_config()
    config.heatmaps = heatmaps.get_config().heatmaps
    config.towers = towers.get_config()
    config.diffusion.unet_train.steps = 400
    # The guidance is only as informative as the classifier's gradient.
    config.diffusion.classifier_train.steps = 3000
    config.heatmaps.num_steps = 5
    # The authors' DAug channel: one map, towards "No Finding" ([x0, h] into the ResNet).
    config.heatmaps.targets = "No Finding"
    # Encode levels x DDIM moves x guidance scales tried on the validation films (8 per class
    # and mode); the point whose maps beat their controls (the unguided map; for site mode also
    # the guidance towards another class) by the widest mean margin is used
    # (`experiment.select_guidance`).
    config.heatmaps.localization.update(sweep_levels=(300, 500), sweep_moves=(5,),
                                        sweep_scales=(3.0, 10.0),
                                        validation_cases_per_class=8)
    # 24 runs share this budget: 300 steps of batch 32 each (what the text side needs to learn
    # the reports, docs/measurements.md); reports cut at 64 tokens.
    config.towers.train.update(steps=300, warmup=30)
    config.towers.model.text.max_length = 64
    # The ResNet's stem at stride 2 (stages at 16, 8 and 4 px).
    config.towers.model.vision.resnet = {"stem_stride": 2}
    # The CPU split into this many devices before JAX starts (`cli._set_up_process`; inert on
    # an accelerator); 1 turns it off.
    config.cpu_devices = 2
    if arg == "compare":
        config.out = "runs/compare/demo"
        config.eval_split = "validation"
        config.ablation = {"classification": SETTINGS["classification"]}
    if quick:
        config.data.update(num_train=64, num_validation=48, num_test=48)
        config.seeds = (0, 1)
        d = config.diffusion
        d.unet.update(ch=8, channel_mult=(1, 2), norm_groups=4)
        d.classifier.update(ch=8, channel_mult=(1, 2), norm_groups=4)
        d.unet_train.update(steps=4, batch_size=16, save_every=2, warmup_steps=1, log_every=2)
        d.classifier_train.update(steps=4, batch_size=16, save_every=2, warmup_steps=1,
                                  log_every=2)
        h = config.heatmaps
        h.update(num_steps=2, batch_size=16, shard_size=32)
        h.calibration.num_images = 16
        h.localization.update(cases_per_class=2, batch_size=16, examples_per_class=1,
                              sweep_levels=(300, 500), sweep_moves=(2,),
                              sweep_scales=(3.0, 10.0),
                              validation_cases_per_class=2)
        t = config.towers
        t.model.vision.update(preset="tiny")
        t.model.text.update(vocab_size=200, hidden_size=16, num_layers=1, intermediate_size=32,
                            max_length=48)
        t.model.embed_dim = 16
        t.train.update(steps=3, batch_size=16, warmup=1, checkpoint_every=3, log_every=1)
    return config
