"""``daug-jax bench --quick`` runs end to end and writes a complete JSON report (no speed thresholds)."""

from __future__ import annotations

import json
import math

import _subproc

STEPS = ("unet_train_step", "classifier_train_step", "towers_train_step")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_bench_writes_every_measurement(tmp_path_factory):
    cache = str(tmp_path_factory.getbasetemp() / "jax-cache")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    printed = _subproc.run(_subproc.CLI + ["bench", "--quick", "--out", str(out), "--data-dir",
                                           str(out.parent / "tfds")],
                           _subproc.jax_env(cache), str(out) + ".log", timeout=420)
    result = json.loads(out.read_text())

    device = result["device"]
    assert device["platform"] == "cpu" and device["count"] == 1 and device["jax"]
    m = result["matmul"]
    assert m["n"] == 256 and m["flops"] == 2 * 256 ** 3
    # XLA's cost analysis, the FLOP source of the train steps, agrees with 2 n^3 on a matmul.
    assert abs(m["xla_flops"] - m["flops"]) <= 0.01 * m["flops"]
    assert _positive(m["median_s"]) and _positive(m["flops_per_s"])
    for key in STEPS:
        s = result[key]
        for field in ("flops_per_device", "median_s", "flops_per_s", "flops_per_s_per_device",
                      "images_per_s", "ratio_to_matmul", "compile_s"):
            assert _positive(s[field]), (key, field, s[field])
        assert s["batch"] == 4 and len(s["times_s"]) == 2 and len(s["ratios_to_matmul"]) == 2
        assert math.isfinite(s["loss"])
        # Consistent arithmetic: images/s and FLOP/s both come from the same median time.
        assert math.isclose(s["images_per_s"] * s["median_s"], s["batch"], rel_tol=1e-9)
        assert math.isclose(s["flops_per_s"] * s["median_s"], s["flops_per_device"], rel_tol=1e-9)
    h = result["heatmaps"]
    assert h["targets"] == 2 and h["batch"] == 2
    assert _positive(h["compiled"]["images_classes_per_s"]) and _positive(h["compiled"]["median_s"])
    for key in ("xla_flops", "matmul_flops", "compile_s"):
        assert _positive(h[key]), key
    # Cost analysis counts elementwise work too; both count the same unrolled loops on CPU.
    assert h["matmul_flops"] <= h["xla_flops"]
    assert math.isclose(h["compiled"]["xla_flops_per_s"] * h["compiled"]["median_s"],
                        h["xla_flops"], rel_tol=1e-9)
    assert "peer" not in result and "peer" not in h  # only with --peer
    i = result["input"]
    assert i["dataset"] == "synthetic_cxr" and i["batch"] == 4 and i["steps"] == 3
    assert _positive(i["pipeline_steps_per_s"]) and _positive(i["in_memory_steps_per_s"])
    assert math.isclose(i["ratio"], i["pipeline_steps_per_s"] / i["in_memory_steps_per_s"])
    assert "input pipeline" in printed
    assert result["memory"]["host_peak_rss_bytes"] > 2 ** 20
    # The printed summary carries the same numbers.
    assert "UNet train step" in printed and "two-tower step" in printed
    assert f"{result['unet_train_step']['flops_per_s'] / 1e9:.1f} GFLOP/s" in printed


def test_gpu_profile_tiny_runs_the_paper_program_shapes(tmp_path_factory):
    """``--profile gpu --tiny``: bfloat16 matmul and networks with attention and 2 ResBlocks per
    level, the translation compiled and looped, FLOP rates against the matmul's."""
    cache = str(tmp_path_factory.getbasetemp() / "jax-cache")
    out = tmp_path_factory.mktemp("bench_gpu") / "bench.json"
    printed = _subproc.run(_subproc.CLI + ["bench", "--profile", "gpu", "--tiny", "--out",
                                           str(out)],
                           _subproc.jax_env(cache), str(out) + ".log", timeout=300)
    result = json.loads(out.read_text())
    settings = result["settings"]
    assert settings["profile"] == "gpu" and settings["tiny"] and settings["parts"] == [
        "matmul", "unet", "heatmaps"]
    assert "unet.dtype=bfloat16" in settings["diffusion_set"]
    assert "unet.attention_resolutions=(16,)" in settings["diffusion_set"]
    m = result["matmul"]
    assert m["dtype"] == "bfloat16" and abs(m["xla_flops"] - m["flops"]) <= 0.01 * m["flops"]
    s = result["unet_train_step"]
    assert s["batch"] == 2 and _positive(s["ratio_to_matmul"]) and math.isfinite(s["loss"])
    h = result["heatmaps"]
    assert h["ddim_steps_each_way"] == 2 and h["targets"] == 2 and h["batch"] == 2
    assert _positive(h["compiled"]["ratio_to_matmul"])
    assert "heatmap translation" in printed and "bfloat16" in printed
