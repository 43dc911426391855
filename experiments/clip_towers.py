"""CLIP towers fine-tuned from a local Hugging Face checkpoint directory, with the authors' recipe.

    daug-jax train --config clip_towers --workdir runs/clip \\
        --set model.vision.path=/ckpt/clip-vit-base-patch32 \\
        --set model.text.path=/ckpt/clip-vit-base-patch32 \\
        [--set model.vision.fill=heatmaps --set data.heatmaps_dir=runs/heatmaps]

experiments/towers.py with both towers from a CLIP checkpoint (`daug_jax.models.backbones`) and
the authors' fine-tuning (GUIDE §1b): AdamW lr 2e-5, weight decay 0.01 (none on biases and
LayerNorm parameters), a cosine schedule after 10 warmup steps, the CLIP logit scale held at
exp(4.602) ~ 100; images at 256 px (ViT-B/32's 7 x 7 position grid resampled bicubically to
8 x 8), reports of 154 tokens (positions interpolated linearly from 77); ONE heatmap channel in
the authors' "channel" mode: ``channels="replace"`` puts the map (theirs: towards "No
Finding", ``daug-jax heatmaps --targets "No Finding"``) in channel 0 of the film x 3, so the
pretrained stem is used unchanged.  ``fill="repeat"`` is the image-only baseline.
``embed_dim`` must be the checkpoint's ``projection_dim`` (512 for ViT-B/32).  bfloat16 compute
is for accelerators; on a CPU set ``model.vision.dtype=float32`` and ``model.text.dtype=float32``.
"""

import ml_collections

from experiments import towers


def get_config() -> ml_collections.ConfigDict:
    config = towers.get_config()
    config.data.image_size = 256
    config.model.vision.update(
        kind="clip",
        path="",             # the checkpoint directory: config.json, model.safetensors, ...
        in_channels=2,       # [x0, h]
        channels="replace",  # or "stack" ([x0, h] into an adapted patch kernel), "add"
        dtype="bfloat16",
        remat=False,         # True: recompute each block in the backward pass (memory)
    )
    config.model.text.update(
        kind="clip",
        path="",             # usually the same directory as model.vision.path
        max_length=154,      # the authors' text length
        dtype="bfloat16",
        remat=False,
    )
    config.model.embed_dim = 512
    config.model.logit_scale_init = 4.602
    config.train.update(lr=2e-5, weight_decay=0.01, warmup=10, learn_logit_scale=False)
    return config
