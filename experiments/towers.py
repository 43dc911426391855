"""Two towers with the Image-Text-Class hybrid loss on the synthetic benchmark, CPU size.

    daug-jax train --config towers --workdir runs/towers
    daug-jax train --config towers --workdir runs/towers_daug \\
        --set model.vision.fill=heatmaps --set data.heatmaps_dir=runs/heatmaps

A tiny ResNet on 32 px films and a small BERT trained from scratch with a WordPiece vocabulary
learnt from the training reports; a few hundred steps take a few minutes on 2 cores.  The four
runs of the ablation differ only in ``model.vision.fill`` ("repeat": the image copied into the
extra channels; "heatmaps": the DAug channels) and ``train.clip_weight`` (1: CLIP loss only).
"""

import math

import ml_collections

from daug_jax.data.synthetic import CLASS_NAMES


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Any registered dataset (`--data NAME --data-dir DIR`); by default the synthetic benchmark.
    config.data = dict(
        name="synthetic_cxr",
        data_dir="runs/tfds",
        num_train=2048,
        num_validation=500,
        num_test=500,
        image_size=32,
        seed=0,
        report_section="findings+impression",  # mimic_cxr only: "findings", "impression"
        train_split="train",   # or a union, e.g. "train+validation" (the paper's training set)
        # Uncertain (-1) labels: "ignore" (masked), "ones" or "zeros"; blank ones always masked.
        label_policy="ignore",
        # Output directory of `daug-jax heatmaps` (split subfolders), read when
        # model.vision.fill is "heatmaps"; records are joined to the films by index and id.
        heatmaps_dir="",
    )

    config.model = dict(
        vision=dict(
            kind="resnet",     # "resnet" (from scratch) or "clip" (from `path`: experiments/clip_towers.py)
            path="",           # kind "clip": a local Hugging Face CLIP checkpoint directory
            preset="tiny",     # "tiny", "resnet18", "resnet34", "resnet50"
            resnet={},         # fields of the preset to replace, e.g. {"widths": (8, 16, 32)}
            in_channels=3,     # 1 image + 2 heatmaps (the targets of experiments/heatmaps.py)
            fill="repeat",     # "repeat" (baseline) or "heatmaps" (DAug)
            # How the tower reads [x0, h_1..h_K]: "stack" (all channels into one stem),
            # "replace" (ONE heatmap in channel 0 of the film x 3) or "add" (a second tower on
            # the heatmaps, embeddings averaged); see daug_jax/models/vision.py.
            channels="stack",
            norm="group",      # "group" or "batch"
            dtype="float32",   # compute dtype; "bfloat16" on accelerators
            remat=False,       # CLIP: recompute each block in the backward pass (memory)
        ),
        text=dict(
            kind="bert",       # "bert" or "clip" (the text tower of the CLIP checkpoint at `path`)
            path="",           # path to a local HF BERT (or CLIP) checkpoint dir; "" = train from scratch
            remat=False,       # CLIP: recompute each block in the backward pass (memory)
            vocab_size=1000,   # WordPiece vocabulary learnt from the training reports
            hidden_size=64,
            num_layers=2,
            num_heads=2,
            intermediate_size=256,
            dropout=0.1,
            # Mean over tokens: an untrained encoder gives every report nearly the same [CLS]
            # state, and the CLIP loss stays at log(batch) (docs/measurements.md).
            pooling="mean",
            max_length=128,    # tokens per report: synthetic reports take 47 (median) to 125
            dtype="float32",
        ),
        embed_dim=64,
        logit_scale_init=math.log(1 / 0.07),  # log of the initial logit scale: CLIP's 1 / 0.07
        # Classes of the image-class term; each gets a prompt for the text tower.
        class_names=CLASS_NAMES,
        # How the image-class term scores a class, trained and evaluated alike: "single" (sigmoid
        # of the scaled similarity to one prompt per class, plus a learned bias) or "paired"
        # (softmax over an absent / present prompt pair per class, as CheXzero).
        prompts="single",
    )

    config.train = dict(
        batch_size=32,
        steps=300,
        lr=2e-3,
        warmup=30,
        weight_decay=1e-4,
        grad_clip=1.0,
        learn_logit_scale=True,  # False holds the CLIP temperature at model.logit_scale_init
        # Loss w * L_image-text + (1 - w) * L_image-class: 1 = CLIP only, 0 = class term only.
        clip_weight=0.5,
        checkpoint_every=100,
        skip_nonfinite=False,  # non-finite loss or gradient: stop with an error, or skip the step
        log_every=10,
        seed=0,
        input_threads=2,  # background threads reading and decoding batches
        # Threefry: a population's members then draw what each run would draw alone, and on
        # CPU it draws the dropout bits faster than RBG (docs/measurements.md).
        prng_impl="threefry2x32",
        # Populations of runs (an ablation, `train_population`): members per vmapped block; 1
        # on CPU, 0 = all members in one vmap, for accelerators (docs/measurements.md).
        member_chunk=1,
        # XLA options of the compiled init and step, e.g. {"xla_backend_optimization_level": 0}
        # halves CPU compile time for short runs at the cost of slower steps.
        compiler_options={},
    )
    return config
