"""DAug heatmap channels and their localization check (models of ``experiments/diffusion.py``).

    daug-jax heatmaps --diffusion runs/diffusion --classifier runs/classifier --out runs/heatmaps
    daug-jax localize --diffusion runs/diffusion --classifier runs/classifier --out runs/loc
"""

import ml_collections

from experiments import diffusion


def get_config() -> ml_collections.ConfigDict:
    root = ml_collections.ConfigDict()
    root.data = diffusion.get_config().data  # the films the diffusion models were trained on
    root.heatmaps = _heatmaps()
    return root


def _heatmaps() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Two channels -> [x0, h1, h2], 3 channels for an ImageNet-style stem: one finding and the
    # anomaly map (towards "No Finding").
    config.targets = "Pleural Effusion,No Finding"
    # Encode to L = T/2 with 10 DDIM moves each way (20 network calls per image and target).
    config.level = 500
    config.num_steps = 10
    # Guidance scale: site localization peaks at 10 in the `daug-jax localize` sweep of the
    # default models, stronger guidance spreads the change (docs/measurements.md).
    config.scale = 10.0
    config.smooth_sigma = 1.0        # pixels; takes the edge off single-pixel DDIM noise
    # What a map is measured against: "x0" (the film: guidance change + DDIM inversion error) or
    # "reconstruction" (the unguided DDIM decode: the inversion error cancels; one more decode).
    config.reference = "x0"
    # How far the DDIM step loops unroll inside the compiled program: True (fully) runs the
    # guidance step ~6x faster on XLA:CPU (docs/measurements.md) at a compile time that grows
    # with num_steps; 1 (a rolled loop) for long grids and on accelerators.
    config.unroll = True
    # How the classifier steers (`sampling.GUIDANCE_FORMS`): "sigmoid" of the target's logit, as
    # the classifier is trained, or "softmax" over all logits, as the authors' code guides.
    config.guidance = "sigmoid"
    config.batch_size = 16
    config.shard_size = 256
    config.dtype = "uint8"           # channels stored as round(255 * h), read back as h in [0, 1]
    # The fixed scale constant: this percentile of raw |x_c - x0| over the first images.
    config.calibration = dict(num_images=64, percentile=99.0)
    # `daug-jax localize`: held-out synthetic images, per localized class up to `cases_per_class`
    # positives (anomaly mode) and as many negatives (site mode).
    # `daug-jax experiment` chooses the encode level, DDIM moves and guidance scale on
    # validation films among sweep_levels x sweep_moves x sweep_scales.
    config.localization = dict(cases_per_class=24, pool_size=1000, validation_cases_per_class=8,
                               sweep_scales=(1.0, 3.0, 10.0, 30.0), sweep_levels=(500,),
                               sweep_moves=(10,),
                               examples_per_class=2, batch_size=16)
    return config
