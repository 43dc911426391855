"""Config overrides of the tiny models the CLI tests train (compile fast on 2 cores)."""


def diffusion(steps: int, save_every: int) -> list[str]:
    """``--set`` items: a one-level 8-channel UNet and classifier, ``steps`` of batch 8 each."""
    items = ["unet.ch=8", "unet.channel_mult=(1,)", "unet.norm_groups=4",
             "classifier.ch=8", "classifier.channel_mult=(1,)", "classifier.norm_groups=4"]
    for section in ("unet_train", "classifier_train"):
        items += [f"{section}.steps={steps}", f"{section}.batch_size=8",
                  f"{section}.save_every={save_every}", f"{section}.warmup_steps=1",
                  f"{section}.log_every=2"]
    return items


def sets(items: list[str]) -> list[str]:
    """``["--set", item, ...]`` for the command line."""
    return [a for item in items for a in ("--set", item)]
