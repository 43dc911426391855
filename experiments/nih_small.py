"""The experiment on 1,000 real NIH ChestX-ray14 films at 64 px, sized for a 2-core CPU (≤ 60 min).

    python scripts/nih1000_manual_dir.py --films NIH1000 --labels TXV_DATA --out runs/nih1000
    daug-jax data prepare nih_cxr14 --manual-dir runs/nih1000 --data-dir runs/tfds --size 64
    daug-jax experiment --config nih_small --data-dir runs/tfds

The films (605 train, 73 validation, 322 test; patients never in two splits) carry no reports:
the experiment runs the classification setting's class-only towers with and without the DAug
channel, and lists what it skipped.  Nine films hold a radiologist box (one of them in the
validation split), too few to choose the translation by pointing game: the classifier's steps
and the encode level are chosen by the classifier's AUROC on the validation films, the DDIM
moves and guidance scale by the DAug towers' AUROC there (README, "The first real films").
"""

import ml_collections

from experiments import demo


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "quick"):
        raise ValueError(f"unknown nih_small config argument {arg!r}; expected 'quick'")
    config = demo.get_config(arg)
    config.out = "runs/nih_small_quick" if arg == "quick" else "runs/nih_small"
    config.data = dict(name="nih_cxr14", data_dir="runs/tfds", image_size=64, seed=0,
                       train_split="train", label_policy="ignore",
                       report_section="findings+impression")
    if arg == "quick":
        return config
    d = config.diffusion
    # A fourth UNet level: 64 px films get the 32 px UNet's receptive field relative to the film.
    for model in (d.unet, d.classifier):
        model.channel_mult = (1, 2, 2, 2)
    d.unet_train.update(steps=1000, save_every=250)
    # Chosen on the validation films (macro AUROC of the clean films' logits): 1000 steps 0.51,
    # 1500 0.59, 2000 0.62, 2500 0.69, 3000 0.66, 4000 0.59, 4500 0.61 (README).
    d.classifier_train.update(steps=2500, save_every=500)
    h = config.heatmaps
    # L = 200: the highest level at which the classifier still scores the validation films as
    # it scores clean ones (macro AUROC 0.69 at t = 0, 0.70 at 200, 0.66 at 300, 0.59 at 500).
    # Scale and moves: the DAug towers' macro AUROC on the validation films (3 seeds; the
    # baseline's 0.471): 5 moves at scale 3 0.513, 10 0.509, 30 0.537; 10 moves at 10 0.518.
    h.update(level=200, num_steps=5, scale=30.0)
    h.localization.update(sweep_levels=(200,), sweep_moves=(5,), sweep_scales=(30.0,),
                          cases_per_class=24, pool_size=1000)
    t = config.towers
    t.train.update(steps=300, warmup=30, checkpoint_every=100)
    return config
