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
    "demo": ("daug_jax.demo", "Run DAug end to end on the synthetic benchmark (both ablation settings, 3 seeds)."),
    "heatmaps": ("daug_jax.heatmap_job", "Write the DAug heatmap channels of a dataset (guided DDIM translation)."),
    "bench": ("daug_jax.bench", "Measure achieved FLOP/s of the train steps against a dense matmul, images/s, memory."),
    "bench heatmaps": ("daug_jax.heatmap_job", "Time the compiled heatmap program against a Python-dispatched loop."),
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


def _use_compilation_cache(module, argv: list[str]) -> None:
    """Turns on JAX's persistent compilation cache where the command keeps it (a stage module's
    ``compilation_cache_dir(argv)``), unless JAX_COMPILATION_CACHE_DIR already chose one.
    Process-wide settings belong here, at the entry point, never in library functions."""
    where = getattr(module, "compilation_cache_dir", None)
    if where is None:
        return
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(where(argv)))


def _use_cpu_devices(module, argv: list[str]) -> None:
    """Splits the CPU into the number of devices the command asks for (a stage module's
    ``cpu_devices(argv)``), unless XLA_FLAGS already forces a count.  XLA:CPU runs one program's
    small convolutions on fewer threads than there are cores; the data-parallel steps then run
    one batch shard per device, side by side (`daug_jax.parallel`).  Only CPU devices are
    affected: on an accelerator the setting is inert."""
    where = getattr(module, "cpu_devices", None)
    if where is None or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    count = where(argv)
    if count and count > 1:
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", int(count))
        except RuntimeError:  # JAX already started in this process (called as a library)
            pass


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
            _use_compilation_cache(module, argv[n_words:])
            _use_cpu_devices(module, argv[n_words:])
            try:
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
