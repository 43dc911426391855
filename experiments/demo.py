"""``daug-jax demo``: DAug end to end on the synthetic benchmark, sized for a 2-core CPU.

Every stage reuses the stage's own config (experiments/diffusion.py, heatmaps.py, towers.py)
with the sizes below; ``--quick`` shrinks everything for a smoke test of the whole pipeline.
"""

import ml_collections

from experiments import diffusion, heatmaps, towers


def get_config(quick: bool = False) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.out = "runs/quick" if quick else "runs/demo"
    # Films of the synthetic benchmark, from the splits of `synthetic_cxr`: train (diffusion,
    # classifier, towers; the retrieval gallery), validation (the guidance scale is chosen
    # there) and test (every reported figure).
    config.data = dict(image_size=32, num_train=1024, num_validation=256, num_test=512, seed=0)
    # Every seed trains all eight runs (two settings x four variants); all 24 are one population.
    config.seeds = (0, 1, 2)

    config.diffusion = diffusion.get_config()
    config.heatmaps = heatmaps.get_config().heatmaps
    config.towers = towers.get_config()
    # Sized for <= 15 minutes on 2 cores.  400 UNet steps (the epsilon-loss is ~0.05 by then)
    # and 300 classifier steps localise well: pointing game anomaly 0.56 (chance 0.03) and site
    # 0.49 (chance 0.19) on the test split at 10 DDIM moves each way; on other unseen films
    # (seed 1, `daug-jax localize`) the same models scored 0.55 / 0.48 with 4 moves and
    # 0.54 / 0.47 with 6, so the heatmaps take 5 moves each way, half the cost of 10.
    config.diffusion.unet_train.steps = 400
    # The guidance is only as informative as the classifier's gradient.  With these models, on
    # the validation films (x0 reference, 5 moves, scale 10), guided vs unguided anomaly map:
    # 300 classifier steps 0.63 vs 0.60; 1500 steps 0.81 vs 0.60 (Lung Lesion AUROC at t = 0
    # still 0.50); 3000 steps 0.85 vs 0.60, and site 0.83 vs 0.65 for guidance towards another
    # class (classifier AUROC at t = 0: 0.86 macro, 0.72 for Lung Lesion).
    config.diffusion.classifier_train.steps = 3000
    config.heatmaps.num_steps = 5
    # The authors' DAug channel: one map, towards "No Finding" ([x0, h] into the ResNet).
    config.heatmaps.targets = "No Finding"
    # Encode levels x guidance scales tried on the validation films (8 per class and mode); the
    # pair whose maps beat their controls (the unguided map; for site mode also the guidance
    # towards another class) by the widest mean margin is used (`demo.select_guidance`).
    # Measured with these models on 16 validation films per class and mode (pointing game of the
    # consumed "No Finding" channel vs its unguided map): L = 500: scale 3 0.98 vs 0.89, 10 0.95
    # vs 0.89, 30 0.88 vs 0.89, 100 0.68 vs 0.89 (strong guidance spreads the change); L = 300,
    # scale 10: 0.97 vs 0.84 — a lower level leaves less inversion error in the unguided map and
    # the classifier is sharper there.  L = 200 scored within noise of L = 300 (mean margin 0.205
    # vs 0.194 there at scale 10; 0.174 vs 0.243 on 8 films per class) and is left out for time; 10 moves
    # instead of 5 (twice the cost) did not help (L = 500, scale 3: 0.97 vs 0.86); measuring
    # against the unguided reconstruction (heatmaps.reference) was worse everywhere (channel
    # 0.57-0.85, below its unguided map).  Scale 30 lost to scale 10 at both levels on the
    # validation films (mean margin L = 300: 0.208 vs 0.243; L = 500: 0.132 vs 0.167), so the
    # sweep stops at 10 (a third less selection time).
    config.heatmaps.localization.update(sweep_levels=(300, 500),
                                        sweep_scales=(3.0, 10.0),
                                        validation_cases_per_class=8)
    # 24 runs share this budget: 120 steps of batch 32 each (~4 passes over 1024 films);
    # reports cut at 64 tokens (the synthetic reports' median is 47).  Threefry keys: under vmap
    # they draw what each run would draw alone (RBG keys do not).
    config.towers.train.update(steps=120, warmup=12, prng_impl="threefry2x32")
    config.towers.model.text.max_length = 64
    # The ResNet's stem at stride 2 (stages at 16, 8 and 4 px): the full-resolution first stage
    # was most of the image tower's cost.  Measured on a 2-core CPU with the same diffusion
    # models and heatmaps: one tower step 0.17 -> 0.096 s, the towers stage 674 -> 428 s; DAug
    # still raised macro AUROC in the classification setting (+0.13 [+0.11, +0.16]) and x2x / x2r
    # mAP@5 in the retrieval setting (+0.10 / +0.19, both intervals above 0).
    config.towers.model.vision.resnet = {"stem_stride": 2}
    # The CPU split into this many devices (`cli._use_cpu_devices`; inert on an accelerator):
    # XLA:CPU keeps 2 cores only ~1.35 busy on these small convolutions, and the data-parallel
    # steps then run one half-batch per device side by side.  Measured on a 2-core CPU against
    # 1 device: UNet step (batch 32) 0.77 -> 0.46 s, classifier step 0.115 -> 0.076 s, 30 tower
    # steps with their evaluation 208 -> 198 s, the translation stages (selection, heatmaps,
    # localization) 234 -> 243 s.  4 devices: UNet step 0.38 s but translation 375 s and the
    # towers 344 s (more programs to compile, smaller shards).  1 turns it off.
    config.cpu_devices = 2
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
                              sweep_levels=(300, 500), sweep_scales=(3.0, 10.0),
                              validation_cases_per_class=2)
        t = config.towers
        t.model.vision.update(preset="tiny")
        t.model.text.update(vocab_size=200, hidden_size=16, num_layers=1, intermediate_size=32,
                            max_length=48)
        t.model.embed_dim = 16
        t.train.update(steps=3, batch_size=16, warmup=1, checkpoint_every=3, log_every=1)
    return config
