"""The authors' translation recipe at the demo's sizes, to set beside experiments/demo.py.

Their heatmap generator (github.com/drjinying/DAug, ``diffusion_anomaly/scripts/generate.py``):
a class-conditional epsilon-UNet trained on the "No Finding" column, DDIM over every level from
L = 500, guidance by the log-softmax over all the classifier's logits at scale 100, the decode
conditioned on "No Finding" (healthy).  Everything else is the demo's.

    daug-jax demo --config authors_translation:compare   # beside daug-jax demo --config demo:compare

README ("Heatmap channels") compares the two on the validation films (``compare``).
"""

import ml_collections

from experiments import demo


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = demo.get_config(arg)
    config.out = {"quick": "runs/authors_translation_quick",
                  "compare": "runs/compare/authors_translation"}.get(arg, "runs/authors_translation")
    config.diffusion.unet.class_cond = True
    h = config.heatmaps
    h.guidance = "softmax"
    level = 100 if arg == "quick" else 500
    # Every level from L, one DDIM move per level; loops rolled (compile time flat in the steps;
    # 500 unrolled steps would not compile in reasonable time).
    h.update(level=level, num_steps=level, unroll=False)
    h.localization.update(sweep_levels=(level,), sweep_moves=(level,), sweep_scales=(100.0,))
    return config
