"""DAug on MIMIC-CXR-JPG at 224 px: the paper's setup, sized for one or more GPUs.

Two heatmap targets -> the encoder sees [x0, h_effusion, h_anomaly], 3 channels, so the
ImageNet-style 3-channel ResNet-50 stem is used unchanged.  "No Finding" translates towards
healthy, giving an anomaly map for any finding; "Pleural Effusion" is the most frequent
localized finding in MIMIC-CXR.

Build the dataset first (credentialed download, see ``daug_jax.data.mimic_cxr``):

    daug-jax data prepare mimic_cxr --manual-dir /data/mimic-cxr-jpg/2.0.0 --data-dir runs/tfds
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = dict(
        name="mimic_cxr",
        data_dir="runs/tfds",
        manual_dir="",  # where the PhysioNet files were placed (only needed to build)
        image_size=224,
        report_section="findings+impression",  # or "findings", "impression"
    )
    config.data.num_train = config_dict.placeholder(int)  # None: the whole training split

    # The diffusion model and the noise-aware classifier work at the encoder's resolution, so
    # heatmaps need no resampling.  224 = 7 * 2^5 halves cleanly: five levels, 224 down to 14.
    config.diffusion = dict(
        image_size=224,
        schedule="linear",
        num_steps=1000,
        unet=dict(ch=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                  attention_resolutions=(14,), num_heads=4, norm_groups=32, dtype="bfloat16"),
        classifier=dict(ch=64, channel_mult=(1, 2, 2, 4, 4), num_res_blocks=2,
                        attention_resolutions=(14,), num_heads=4, norm_groups=32,
                        dtype="bfloat16", max_level=500),
        train=dict(batch_size=64, steps=150_000, learning_rate=1e-4, ema_decay=0.9999),
    )

    # Guided DDIM translation (encode to level L, decode with guidance), one map per target.
    config.heatmaps = dict(
        targets=("Pleural Effusion", "No Finding"),
        level=500,       # L = T / 2: keeps the anatomy, frees the finding to change
        num_steps=25,    # respaced grid on [0, L]: 2 * 25 network calls per image and target
        scale=3.0,       # guidance; stronger guidance spreads the change over the whole image
        smooth_sigma=1.0,
        batch_size=64,
    )

    config.model = dict(
        vision=dict(
            preset="resnet50",
            in_channels=3,       # 1 image + len(heatmaps.targets)
            fill="heatmaps",     # "repeat" for the image-only baseline of the ablation
            norm="group",
            dtype="bfloat16",
        ),
        text=dict(
            path="",  # path to a local HF BERT checkpoint dir (config.json, model.safetensors,
                      # tokenizer files), e.g. a downloaded CXR-BERT or BioClinicalBERT
            pooling="cls",
            max_length=128,
            dtype="bfloat16",
        ),
        embed_dim=512,
    )

    config.train = dict(
        batch_size=256,        # global, split over the devices of the data mesh
        steps=20_000,
        lr=1e-4,
        warmup=1_000,
        weight_decay=0.05,
        class_weight=1.0,      # lambda of the image-class term; 0 gives the CLIP-only loss
        checkpoint_every=1_000,
        seed=0,
    )
    return config
