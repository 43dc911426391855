"""Diffusion stage config: the epsilon-UNet and the noise-aware classifier on the synthetic benchmark.

    daug-jax train-diffusion  --config diffusion --workdir runs/diffusion
    daug-jax train-classifier --config diffusion --workdir runs/classifier

Sized so that both fit the CPU demo budget (2 cores): a narrow 16/32/32-channel UNet without
attention at 32x32.  On an accelerator, widen with e.g. ``--set unet.ch=64 --set unet.dtype=bfloat16
--set "unet.attention_resolutions=(8,)"``.
"""

import ml_collections


def _model(ch, channel_mult, num_res_blocks):
    return dict(ch=ch, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                attention_resolutions=(), num_heads=1, norm_groups=8, dtype="float32")


def _train(steps, learning_rate, save_every):
    return dict(steps=steps, batch_size=32, learning_rate=learning_rate, warmup_steps=100,
                weight_decay=0.0, grad_clip=1.0, seed=0, save_every=save_every, log_every=25,
                # Non-finite loss or gradient: stop with an error (False) or skip the step.
                skip_nonfinite=False,
                input_threads=2,   # background threads reading and decoding batches
                # JAX's RngBitGenerator keys: faster UNet compiles on XLA:CPU than threefry
                # (docs/measurements.md); any implementation keeps a run a function of its seed.
                prng_impl="rbg")


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Training films: any registered dataset (`--data NAME --data-dir DIR`); by default the
    # synthetic benchmark's training split, built under data_dir when missing.
    config.data = dict(name="synthetic_cxr", data_dir="runs/tfds", image_size=32, num_train=2048,
                       num_validation=500, num_test=500, seed=0, label_policy="ignore",
                       train_split="train",
                       report_section="findings+impression")  # mimic_cxr only
    # T = 1000 levels; cosine keeps more signal at mid levels than linear at 32x32, so an encode
    # level of L = 500 still preserves the anatomy the decoder is meant to keep.
    config.diffusion = dict(schedule="cosine", num_steps=1000)

    # 16/32/32 channels at 32/16/8 px: ~11 GFLOP per batch-32 train step (XLA cost analysis).
    config.unet = _model(ch=16, channel_mult=(1, 2, 2), num_res_blocks=1)
    # Conditioned on the film's healthy / diseased side ("No Finding"), as the authors' UNet
    # (experiments/authors_translation.py); label_dropout: the share of films trained with the
    # null label, so that the model also runs unconditioned (the translation's encode).
    config.unet.update(class_cond=False, label_dropout=0.1)
    config.unet_train = _train(steps=1000, learning_rate=1e-3, save_every=250)
    config.unet_train.ema_decay = 0.995

    config.classifier = _model(ch=16, channel_mult=(1, 2, 2), num_res_blocks=1)
    # Highest level the classifier is trained at: the decoder's encode level L (None = all T).
    config.classifier.max_level = 500
    config.classifier_train = _train(steps=600, learning_rate=1e-3, save_every=200)
    return config
