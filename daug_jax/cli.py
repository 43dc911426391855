"""The ``daug-jax`` command: dispatches ``daug-jax <command> [<sub>] ...`` to a stage's ``main``.

Each stage module owns its argument parsing in ``main(command, argv) -> int`` (``command`` is the
matched name, e.g. ``"data show"``, ``argv`` what follows it); this table only routes.
Modules are imported lazily so that ``daug-jax data show`` does not pay for importing the towers.
"""

from __future__ import annotations

import importlib
import sys

# Longest match wins: "bench heatmaps" before "bench".
COMMANDS: dict[str, tuple[str, str]] = {
    "data show": ("daug_jax.data.show", "Write a PNG grid of synthetic samples with reports and masks."),
    "data bench": ("daug_jax.data.show", "Print synthetic generation speed (images/s)."),
    "data build": ("daug_jax.data.builders", "Build a TFDS dataset (array_record) under --data-dir."),
    "data prepare": ("daug_jax.data.registry", "Build MIMIC-CXR-JPG or CheXpert from a manual download."),
    "train-diffusion": ("daug_jax.diffusion.train", "Train the epsilon-UNet (DDPM) on a dataset's training films."),
    "train-classifier": ("daug_jax.diffusion.train", "Train the noise-aware classifier that guides DDIM decoding."),
    "demo": ("daug_jax.demo", "Run DAug end to end on the synthetic benchmark (the 2x2 ablation)."),
    "heatmaps": ("daug_jax.heatmap_job", "Write the DAug heatmap channels of a dataset (guided DDIM translation)."),
    "bench": ("daug_jax.bench", "Measure achieved FLOP/s of the train steps against a dense matmul, images/s, memory."),
    "bench heatmaps": ("daug_jax.heatmap_job", "Time the compiled heatmap program against a Python-dispatched loop."),
    "train": ("daug_jax.train", "Train the image and text towers with the hybrid contrastive loss."),
    "evaluate": ("daug_jax.evaluate", "Retrieval and classification metrics of trained towers on a dataset split."),
    "localize": ("daug_jax.localization", "Pointing game of the heatmaps on films with lesion masks, with a guidance sweep."),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: daug-jax <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in sorted(COMMANDS.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for n_words in (2, 1):
        name = " ".join(argv[:n_words])
        if len(argv) >= n_words and name in COMMANDS:
            module = importlib.import_module(COMMANDS[name][0])
            return int(module.main(name, argv[n_words:]) or 0)
    print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
    return 0 if argv and argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
