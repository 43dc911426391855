"""The summary ``daug-jax bench`` prints: one line per measured part, from its result dict."""

from __future__ import annotations

STEP_NAMES = {"unet_train_step": "UNet train step", "classifier_train_step": "classifier step",
              "towers_train_step": "two-tower step"}
# The parts measured beside a peer framework (``--peer``).
PEER_KEYS = (*STEP_NAMES, "heatmaps")


def _rate(flops_per_s: float) -> str:
    return (f"{flops_per_s / 1e12:9.2f} TFLOP/s" if flops_per_s >= 1e12
            else f"{flops_per_s / 1e9:9.1f} GFLOP/s")


def report(result: dict) -> str:
    """The human-readable summary printed after a run."""
    from daug_jax import bench_peer

    d = result["device"]
    lines = [f"bench: {d['count']} x {d['kind']} ({d['platform']}), jax {d['jax']}"]
    if "matmul" in result:
        m = result["matmul"]
        lines.append(f"  matmul {m['n']}^2 {m['dtype']:<10} {_rate(m['flops_per_s'])} "
                     f"({m['median_s'] * 1e3:.1f} ms)")
    for key, name in STEP_NAMES.items():
        if key in result:
            s = result[key]
            ratio = f", {s['ratio_to_matmul']:.2f} x matmul" if "ratio_to_matmul" in s else ""
            lines.append(f"  {name:<24} {_rate(s['flops_per_s'])}{ratio}; "
                         f"{s['images_per_s']:.1f} images/s (batch {s['batch']}, "
                         f"{s['median_s'] * 1e3:.1f} ms/step, {s['flops_per_device'] / 1e9:.2f} "
                         f"GFLOP/step/device)")
    if "heatmaps" in result:
        h = result["heatmaps"]
        for name in ("compiled", "python_loop"):
            lines.append(f"  heatmaps {name:<15} {h[name]['images_classes_per_s']:9.2f} "
                         f"images*classes/s")
        c = h["compiled"]
        ratio = f", {c['ratio_to_matmul']:.2f} x matmul" if "ratio_to_matmul" in c else ""
        lines.append(f"  heatmaps compiled / python loop: {h['speedup']:.2f}x; compiled "
                     f"{_rate(c['xla_flops_per_s']).strip()}{ratio}")
    if "input" in result:
        i = result["input"]
        lines.append(f"  input pipeline            {i['pipeline_steps_per_s']:9.2f} steps/s vs "
                     f"{i['in_memory_steps_per_s']:.2f} from arrays in memory = "
                     f"{i['ratio']:.2f}x (two-tower step, batch {i['batch']}, "
                     f"{i['image_size']} px, {i['dataset']})")
    if "peer" in result:
        p = result["peer"]
        lines.append(f"  peer: {p['framework']} {p['version']} on {p['device']}, "
                     f"{p['threads']} threads (median of back-to-back pairs)")
        names = {**STEP_NAMES, "heatmaps": "heatmap translation"}
        lines += [bench_peer.summary_line(names[k], result[k]["peer"]) for k in PEER_KEYS
                  if "peer" in result.get(k, {})]
    mem = result["memory"]
    lines.append(f"  peak host RSS {mem['host_peak_rss_bytes'] / 2 ** 20:.0f} MiB"
                 + ("" if not mem["device"] else "; device peak " + ", ".join(
                     f"{m.get('peak_bytes_in_use', 0) / 2 ** 20:.0f} MiB" for m in mem["device"])))
    return "\n".join(lines)
