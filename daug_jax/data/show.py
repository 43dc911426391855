"""``daug-jax data show`` (a PNG grid of synthetic samples) and ``daug-jax data bench`` (speed).

    daug-jax data show --out runs/data/samples.png --num 12 --size 64 --seed 0
    daug-jax data bench --size 64 --num 2048
"""

from __future__ import annotations

import argparse
import os
import textwrap
import time

from threadpoolctl import threadpool_limits

from daug_jax.data import synthetic
from daug_jax.files import save_figure

# One colour per localized class, for the mask outlines and the legend.
COLOURS = dict(zip(synthetic.LOCALIZED_CLASSES,
                   ("#d62728", "#1f77b4", "#ffbf00", "#2ca02c", "#e377c2", "#17becf")))


def save_grid(data: dict, path: str, *, cols: int = 4, wrap: int = 44) -> None:
    """Writes a grid of ``data`` (`synthetic.generate` output: image [N, H, W, 1], labels [N, C],
    masks [N, C, H, W], report, id) to ``path``: films, finding outlines, labels, reports."""
    import matplotlib  # here, not at the top: its start-up cost (`data bench` never draws)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"), for the same reason
    from matplotlib.lines import Line2D  # for the same reason

    n = len(data["image"])
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 6.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k in range(n):
        ax = axes.ravel()[k]
        ax.imshow(data["image"][k, ..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        names = []
        for c, name in enumerate(synthetic.CLASS_NAMES):
            label = int(data["labels"][k, c])
            if c == 0 or label == 0:
                continue
            names.append(name + ("?" if label < 0 else ""))
            if data["masks"][k, c].any():  # dashed: a hedged (uncertain) finding
                ax.contour(data["masks"][k, c].astype(float), levels=[0.5],
                           colors=[COLOURS[name]], linewidths=1.2,
                           linestyles="--" if label < 0 else "-")
        title = f"{data['id'][k]}: " + (", ".join(names) or "No Finding")
        ax.set_title("\n".join(textwrap.wrap(title, wrap)), fontsize=7.5, loc="left")
        report = "\n".join(textwrap.fill(part, wrap) for part in str(data["report"][k]).split("\n"))
        ax.text(0, -0.03, report, transform=ax.transAxes, fontsize=6.3, va="top",
                family="monospace")
    handles = [Line2D([], [], color=c, lw=2, label=name) for name, c in COLOURS.items()]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.985), h_pad=0.5)
    save_figure(fig, path)


def bench(num: int, size: int, seed: int = 0) -> dict:
    """Times `synthetic.generate` in this process (numpy ufuncs run on one thread).

    Returns {"seconds" (wall), "cpu_seconds", "images_per_s" (wall), "cpu_images_per_s"}.
    """
    synthetic.generate(8, image_size=size, seed=seed)  # warm-up: imports, first allocations
    with threadpool_limits(limits=1):  # no BLAS/OpenMP threads: a one-core figure
        wall, cpu = time.perf_counter(), time.process_time()
        synthetic.generate(num, image_size=size, seed=seed)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return dict(seconds=wall, cpu_seconds=cpu, images_per_s=num / wall, cpu_images_per_s=num / cpu)


def main(command: str, argv: list[str]) -> int:
    show = command == "data show"  # else "data bench"
    parser = argparse.ArgumentParser(prog=f"daug-jax {command}",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (>= 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=12 if show else 2048)
    if show:
        parser.add_argument("--out", default="runs/data/samples.png")
        parser.add_argument("--start", type=int, default=0, help="index of the first record")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f"--num must be >= 1, got {args.num}")
    try:
        if show:
            data = synthetic.generate(args.num, image_size=args.size, seed=args.seed,
                                      start=args.start)
        else:
            r = bench(args.num, args.size, args.seed)
    except ValueError as err:  # bad size/seed/start: a usage error, not a traceback
        parser.error(str(err))
    if show:
        save_grid(data, args.out)
        print(f"wrote {args.out}: {args.num} records at {args.size} px (seed {args.seed})")
        return 0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"synthetic generate: {args.size} px, {args.num} images in {r['seconds']:.2f} s -> "
          f"{r['images_per_s']:.0f} images/s (1 core, wall clock)")
    print(f"  process CPU time {r['cpu_seconds']:.2f} s -> {r['cpu_images_per_s']:.0f} images/s "
          f"per busy core (1-min load average {load:.1f} on {os.cpu_count()} CPUs)")
    return 0
