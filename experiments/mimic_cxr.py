"""DAug on MIMIC-CXR-JPG, the paper's setup, for one or more accelerators; read by every stage.

    daug-jax data prepare mimic_cxr --manual-dir /data/mimic-cxr-jpg/2.0.0 --data-dir runs/tfds --size 256
    daug-jax train-diffusion  --config mimic_cxr --workdir runs/mimic/diffusion
    daug-jax train-classifier --config mimic_cxr --workdir runs/mimic/classifier
    daug-jax heatmaps --config mimic_cxr --diffusion runs/mimic/diffusion \\
        --classifier runs/mimic/classifier --out runs/mimic/heatmaps --splits train+validation,test
    daug-jax train    --config mimic_cxr --workdir runs/mimic/towers
    daug-jax evaluate --towers runs/mimic/towers --out runs/mimic/eval.json

What follows the authors (github.com/drjinying/DAug; see README "Deviations"): 256 px films,
ONE heatmap channel — the translation towards "No Finding" (an anomaly map) — so the image tower
reads ``[x0, h]``; training on train + validate, testing on test; 14 CheXpert classes with
uncertain labels read as negative; AdamW lr 2e-5, weight decay 0.01 (none on biases and norm
scales), cosine schedule with 10 warmup steps, 10 epochs of batch 256 (32 x 8 GPUs); the hybrid
weight w = 0.8 of their retrieval setting (0.7 in their classification setting); the
Wolleb et al. diffusion recipe: linear schedule, T = 1000, UNet with 128 channels, multipliers
(1, 1, 2, 2, 4, 4), 2 residual blocks, attention at 16 px, encode to L = 500, guided decode
with classifier scale 100 over every level (500 DDIM moves each way).

The towers here are a ResNet-50 trained from scratch and a BERT from a local checkpoint
directory (``model.text.path``) or from scratch, which runs without any download.  The authors'
backbone, CLIP ViT-B/32 fine-tuned from its checkpoint with their recipe and the heatmap in
channel 0 (``channels="replace"``), is experiments/clip_towers.py: train the towers with
``--config clip_towers --set model.vision.path=DIR --set model.text.path=DIR`` and the same
``--data mimic_cxr --data-dir ...`` (the other stages keep this config).
"""

import math

import ml_collections

from daug_jax.data.real_common import CHEXPERT_CLASSES


def _unet(ch: int) -> dict:
    return dict(ch=ch, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                attention_resolutions=(16,), num_heads=4, norm_groups=32, dtype="bfloat16")


def _diffusion_train(steps: int, save_every: int) -> dict:
    return dict(steps=steps, batch_size=64, learning_rate=1e-4, warmup_steps=1000,
                weight_decay=0.0, grad_clip=1.0, seed=0, save_every=save_every, log_every=100,
                skip_nonfinite=False, input_threads=8, prng_impl="threefry2x32")


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = dict(
        name="mimic_cxr",
        data_dir="runs/tfds",
        image_size=256,                        # every stage: no resampling between them
        report_section="findings+impression",  # or "findings", "impression"
        train_split="train+validation",        # the authors train on train + validate
        label_policy="zeros",                  # uncertain (-1) read as negative; blank masked
        heatmaps_dir="runs/mimic/heatmaps",    # output of `daug-jax heatmaps --out`
        num_train=2000, num_validation=500, num_test=500, seed=0,  # with --data synthetic_cxr
    )

    # ---------------------------------------------------------------- diffusion side
    config.diffusion = dict(schedule="linear", num_steps=1000)
    config.unet = _unet(128)
    config.unet.update(class_cond=False, label_dropout=0.1)  # True: the authors' UNet
    config.unet_train = _diffusion_train(steps=150_000, save_every=5_000)
    config.unet_train.ema_decay = 0.9999
    config.classifier = _unet(128)
    config.classifier.max_level = 500          # trained where the decoder guides: t <= L
    config.classifier_train = _diffusion_train(steps=50_000, save_every=5_000)

    config.heatmaps = dict(
        targets="No Finding",   # one channel: the translation towards healthy
        level=500,              # L = T / 2
        num_steps=500,          # every level from L down (the authors'); 50 is 10x cheaper
        scale=100.0,            # the authors' classifier scale
        smooth_sigma=1.0,
        reference="x0",
        guidance="sigmoid",     # "softmax": the authors' (experiments/authors_translation.py)
        unroll=1,               # rolled DDIM loops: 500 steps unrolled would not compile
        batch_size=32,
        shard_size=1024,
        dtype="uint8",
        calibration=dict(num_images=512, percentile=99.0),
        localization=dict(cases_per_class=100, pool_size=5000, sweep_scales=(10.0, 30.0, 100.0),
                          sweep_levels=(500,), sweep_moves=(500,), validation_cases_per_class=20,
                          examples_per_class=2, batch_size=32),
    )

    # ---------------------------------------------------------------- towers
    config.model = dict(
        vision=dict(
            kind="resnet",       # trained from scratch (CLIP: experiments/clip_towers.py)
            path="",
            preset="resnet50",
            resnet={},
            in_channels=2,       # [x0, h_NoFinding]
            fill="heatmaps",     # "repeat" for the image-only baseline of the ablation
            channels="stack",    # [x0, h] into one stem (daug_jax/models/vision.py)
            norm="group",
            dtype="bfloat16",
            remat=False,
        ),
        text=dict(
            kind="bert",
            path="",  # a local HF BERT checkpoint dir (config.json, model.safetensors, tokenizer
                      # files), e.g. a downloaded CXR-BERT; "" trains this BERT from scratch:
            remat=False,
            vocab_size=30_000,
            hidden_size=768,
            num_layers=12,
            num_heads=12,
            intermediate_size=3072,
            dropout=0.1,
            pooling="cls",
            max_length=154,      # the authors' text length
            dtype="bfloat16",
        ),
        embed_dim=512,
        logit_scale_init=math.log(1 / 0.07),  # log of the initial logit scale: CLIP's 1 / 0.07
        class_names=CHEXPERT_CLASSES,
        prompts="single",
    )

    # 10 epochs of the ~239k frontal train + validate films at batch 256: ~9,400 steps.
    config.train = dict(
        batch_size=256,          # global, split over the devices of the data mesh
        steps=9_400,
        lr=2e-5,
        warmup=10,
        weight_decay=0.01,
        grad_clip=1.0,
        learn_logit_scale=True,
        clip_weight=0.8,         # w of w * L_image-text + (1 - w) * L_image-class
        checkpoint_every=500,
        skip_nonfinite=False,
        log_every=50,
        seed=0,
        prng_impl="threefry2x32",
        member_chunk=0,          # a population's members in one vmap (accelerators)
        compiler_options={},
        input_threads=8,
    )
    return config
