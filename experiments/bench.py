"""``daug-jax bench`` profiles: the sizes each part of the benchmark runs at.

    daug-jax bench                      # "cpu": the demo's sizes (experiments/diffusion.py, towers.py)
    daug-jax bench --quick              # "cpu-quick", tiny models: a smoke run of every part
    daug-jax bench --profile gpu        # the paper's sizes, for an accelerator
    daug-jax bench --profile gpu --tiny # "gpu-tiny": the same program shapes, a CPU smoke run

A profile is data (``get_config("<profile>")``): default command-line values (``settings``) and
overrides of the diffusion and towers configs (``diffusion_set``, ``towers_set``, in ``--set
KEY=VALUE`` form).  Flags given on the command line win over the profile's defaults; their
``--*-set`` overrides are applied after the profile's.
"""

from __future__ import annotations

import ml_collections

# Command-line defaults of the "cpu" profile: the demo's sizes.
# unroll: the heatmap program's DDIM loops (0: fully unrolled, the CPU's choice; 1: rolled).
CPU = dict(parts="matmul,unet,classifier,towers,heatmaps,input", batch=32, size=32, repeats=10,
           matmul_n=2048, matmul_dtype="float32", level=500, ddim_steps=10, heatmap_batch=8,
           scale=3.0, unroll=0, input_size=64, input_steps=30)

# Tiny networks for the smoke runs: they check the plumbing, not the speed of the real sizes.
_TINY_UNET = ["unet.ch=8", "unet.channel_mult=(1,)", "unet.norm_groups=4", "classifier.ch=8",
              "classifier.channel_mult=(1,)", "classifier.norm_groups=4"]
_TINY_TOWERS = ["model.vision.resnet={'stage_sizes': (1,), 'widths': (8,), 'stem_width': 8}",
                "model.text.vocab_size=200", "model.text.hidden_size=16",
                "model.text.num_layers=1", "model.text.intermediate_size=32",
                "model.text.max_length=48", "model.embed_dim=16"]


def _paper_net(prefix: str, ch: int, channel_mult: str, res_blocks: int, attention: str,
               heads: int, groups: int = 32) -> list[str]:
    """A UNet-shaped network (epsilon-UNet or classifier) in bfloat16."""
    return [f"{prefix}.ch={ch}", f"{prefix}.channel_mult={channel_mult}",
            f"{prefix}.num_res_blocks={res_blocks}", f"{prefix}.attention_resolutions={attention}",
            f"{prefix}.num_heads={heads}", f"{prefix}.norm_groups={groups}",
            f"{prefix}.dtype=bfloat16"]


# The paper's sizes (guided-diffusion's 256 px models, as the authors use them): 128 base
# channels, multipliers (1, 1, 2, 2, 4, 4), 2 ResBlocks per level, attention at 16 px, 4 heads,
# bfloat16; the heatmap translation encodes to L = 500 with 50 DDIM moves each way, 2 targets.
GPU = dict(CPU, parts="matmul,unet,heatmaps", batch=16, size=256, repeats=5, matmul_n=8192,
           matmul_dtype="bfloat16", level=500, ddim_steps=50, heatmap_batch=16, unroll=1)
_GPU_NETS = (_paper_net("unet", 128, "(1,1,2,2,4,4)", 2, "(16,)", 4)
             + _paper_net("classifier", 128, "(1,1,2,2,4,4)", 2, "(16,)", 4))
# The same kinds of program (bfloat16, attention at 16 px, the translation's loops cut short) at
# a size a CPU compiles in seconds: compilation, not running, is what a smoke run pays for.
GPU_TINY = dict(GPU, batch=2, size=16, repeats=2, matmul_n=256, level=20, ddim_steps=2,
                heatmap_batch=2)
_GPU_TINY_NETS = (_paper_net("unet", 8, "(1,)", 1, "(16,)", 2, groups=4)
                  + _paper_net("classifier", 8, "(1,)", 1, "(16,)", 2, groups=4))


def get_config(profile: str = "cpu") -> ml_collections.ConfigDict:
    """The profile ``cpu``, ``cpu-quick``, ``gpu`` or ``gpu-tiny`` as {"settings": {...},
    "diffusion_set": [...], "towers_set": [...]}."""
    if profile == "cpu":
        out = {"settings": dict(CPU), "diffusion_set": [], "towers_set": []}
    elif profile == "cpu-quick":
        settings = dict(CPU, batch=4, repeats=2, matmul_n=256, level=100, ddim_steps=2,
                        heatmap_batch=2, input_size=32, input_steps=3)
        out = {"settings": settings, "diffusion_set": list(_TINY_UNET),
               "towers_set": list(_TINY_TOWERS)}
    elif profile in ("gpu", "gpu-tiny"):
        tiny = profile == "gpu-tiny"
        out = {"settings": dict(GPU_TINY if tiny else GPU),
               "diffusion_set": list(_GPU_TINY_NETS if tiny else _GPU_NETS), "towers_set": []}
    else:
        raise ValueError(f"unknown bench profile {profile!r}; valid: cpu, cpu-quick, gpu, gpu-tiny")
    return ml_collections.ConfigDict(out)
