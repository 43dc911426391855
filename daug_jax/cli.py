"""The ``daug-jax`` command: dispatches ``daug-jax <command> [<sub>] ...`` to a stage's ``main``.

Each stage module owns its argument parsing in ``main(command, argv) -> int`` (``command`` is the
matched name, e.g. ``"data show"``, ``argv`` what follows it); this table only routes.
Modules are imported lazily so that ``daug-jax data show`` does not pay for importing the towers.
"""

from __future__ import annotations

import importlib
import os
import sys

# Longest match wins: "bench heatmaps" before "bench".
COMMANDS: dict[str, tuple[str, str]] = {
    "data show": ("daug_jax.data.show", "Write a PNG grid of synthetic samples with reports and masks."),
    "data bench": ("daug_jax.data.show", "Print synthetic generation speed (images/s)."),
    "data build": ("daug_jax.data.builders", "Build a TFDS dataset (array_record) under --data-dir."),
    "data prepare": ("daug_jax.data.registry", "Build MIMIC-CXR-JPG, CheXpert or NIH ChestX-ray14 from a manual download."),
    "train-diffusion": ("daug_jax.diffusion.train", "Train the epsilon-UNet (DDPM) on a dataset's training films."),
    "train-classifier": ("daug_jax.diffusion.train", "Train the noise-aware classifier that guides DDIM decoding."),
    "demo": ("daug_jax.experiment", "The experiment on the synthetic benchmark (experiments/demo.py: both ablation settings, 3 seeds)."),
    "experiment": ("daug_jax.experiment", "DAug end to end on a registered dataset: models, selection on validation, heatmaps, localization, ablation, report."),
    "heatmaps": ("daug_jax.heatmap_job", "Write the DAug heatmap channels of a dataset (guided DDIM translation)."),
    "bench": ("daug_jax.bench", "Measure achieved FLOP/s of the train steps against a dense matmul, images/s, memory."),
    "bench heatmaps": ("daug_jax.bench", "Time the compiled heatmap program (images x targets per second, FLOP/s)."),
    "train": ("daug_jax.train", "Train the image and text towers with the hybrid contrastive loss."),
    "evaluate": ("daug_jax.evaluate", "Retrieval and classification metrics of trained towers on a dataset split."),
    "localize": ("daug_jax.localization", "Pointing game of the heatmaps on films with lesion masks, with a guidance sweep."),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: daug-jax [--debug] <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in sorted(COMMANDS.items())]
    return "\n".join(lines)


# What a user's mistake raises (bad arguments, unknown names, missing or mismatched inputs,
# invalid config values): reported as one line.  Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, NotADirectoryError, PermissionError)


def _message(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split()) or type(err).__name__


def _set_up_process(module, argv: list[str]) -> None:
    """The process-wide settings a command asks for, made here and never in library functions,
    before JAX starts its backends:

    * the persistent compilation cache where the command keeps one (a stage module's
      ``compilation_cache_dir(argv)``), unless JAX_COMPILATION_CACHE_DIR already chose one;
    * the CPU split into the devices the command asks for (``cpu_devices(argv)``), unless
      XLA_FLAGS already forces a count: XLA:CPU runs one program's small convolutions on fewer
      threads than there are cores, and the data-parallel steps then run one batch shard per
      device side by side (inert on an accelerator);
    * JAX's multi-process runtime when the environment launches this process as one of several
      (`parallel.maybe_initialize_distributed`); a command whose processes share no computation
      (``SHARES_COMPUTATION = False``: the heatmap job) joins it only when told to discover its
      cluster (``DAUG_DISTRIBUTED=auto``).
    """
    import jax  # here, not at the top: `daug-jax --help` does not pay for importing JAX

    from daug_jax import parallel  # imports JAX too

    cache = getattr(module, "compilation_cache_dir", None)
    if cache is not None and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(cache(argv)))
    devices = getattr(module, "cpu_devices", None)
    if devices and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        count = devices(argv)
        if count and count > 1:
            try:
                jax.config.update("jax_num_cpu_devices", int(count))
            except RuntimeError:  # JAX already started in this process (called as a library)
                pass
    if getattr(module, "SHARES_COMPUTATION", True) or os.environ.get("DAUG_DISTRIBUTED") == "auto":
        parallel.maybe_initialize_distributed()


def main(argv: list[str] | None = None) -> int:
    """Runs a command; user errors end as ``daug-jax <command>: error: ...`` and exit status 2
    (``--debug`` anywhere on the line shows their traceback instead)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    for n_words in (2, 1):
        name = " ".join(argv[:n_words])
        if len(argv) >= n_words and name in COMMANDS:
            module = importlib.import_module(COMMANDS[name][0])
            try:
                _set_up_process(module, argv[n_words:])
                return int(module.main(name, argv[n_words:]) or 0)
            except USER_ERRORS as err:
                if debug:
                    raise
                print(f"daug-jax {name}: error: {_message(err)}", file=sys.stderr)
                return 2
    print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
    return 0 if argv and argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
