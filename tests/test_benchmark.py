"""The overhead benchmark runs (its --quick mode): a smoke test, no timing assertion."""

import json
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_benchmark_quick_mode_produces_every_measurement(capsys):
    module = runpy.run_path(str(ROOT / "benchmarks" / "overhead.py"))
    result = module["main"](["--quick", "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    assert set(result["overhead"]) == {"deep sigmoid MLP", "small CNN", "transformer", "LSTM"}
    for variants in result["overhead"].values():
        assert variants["none"]["median"] == 1.0
        for name in (
            "gradwatch every step",
            "gradwatch every step, background thread",
            "gradwatch default (every 50)",
            "floor",
            "gradwatch's statistics, hand-written",
        ):
            assert any(v.startswith(name) for v in variants), name
        assert all(r["median"] > 0 for r in variants.values())
    big = result["mlp_1000_logging_step"]
    assert big["layers"] == 201
    timed = {k: v for k, v in big.items() if isinstance(v, dict)}
    assert "gradwatch" in timed and any(k.startswith("floor") for k in timed)
    assert "gradwatch's statistics, hand-written" in timed
    assert any(k.startswith("gradwatch, a step that also reads the weights") for k in timed)
    assert sum(k.startswith("gradwatch off-schedule step") for k in timed) == 2
    assert all(r["median"] > 0 and r["mean"] > 0 for r in timed.values())
    assert big["scalar_tags"] < 1500
    host = result["host_time_per_layer"]
    assert host["hooked_modules"] == 41  # 20 x (Linear, ReLU) + the head, in quick mode
    for mode in ("", "background_"):  # the worker's time counts: its blocks end when it is done
        assert host[f"{mode}logging_step_ms"] > 0 and host[f"{mode}boundary_ms"] > 0
    handoff = result["handoff"]
    assert handoff["thread_ms"] > 0 and handoff["process_ms"] > 0 and handoff["finish_ms"] > 0
    assert any("targets" in line for line in module["format_table"](result).splitlines())
    curvature = result["curvature"]
    assert set(curvature) == {"deep sigmoid MLP", "small CNN", "transformer"}
    for r in curvature.values():  # a measurement costs more than a logging step, and is counted
        assert r["with_curvature_steps"] > r["logging_step_steps"] > 0
        assert r["warm_products"] >= 1 and r["cold_products"] >= r["warm_products"]
    compiled = result["compiled"]
    assert set(compiled) == set(result["overhead"]) - {"LSTM"} | {"1,000-layer MLP, logging step"}
    for r in compiled.values():  # compiled whole, with gradwatch too
        assert r["graph_breaks"] == {"plain": 0, "gradwatch": 0} and r["median"] > 0
    assert compiled["1,000-layer MLP, logging step"]["layers"] == 201
    unit = "heap_in_use_kib" if "unavailable" not in result["step_peak_memory"] else "peak_rss_kib"
    assert set(result["memory"]) == {f"{unit}_at_100", f"{unit}_at_120"}
    assert all(v > 0 for v in result["memory"].values())
    peaks = result["step_peak_memory"]
    if "unavailable" not in peaks:  # glibc only
        assert set(peaks) == set(result["overhead"])
        assert all(r["plain_step_kib"] > 0 and r["ratio"] > 0 for r in peaks.values())


def test_hand_written_statistics_reference_measures_what_gradwatch_measures(tmp_path):
    """The benchmark's "statistics" reference is only a fair floor if it computes the same
    numbers: grad norms, per-unit flat counts and backward-signal norms of the deep MLP."""
    import torch

    import gradwatch

    module = runpy.run_path(str(ROOT / "benchmarks" / "overhead.py"))
    model, loss_fn = module["deep_mlp"](True)
    with torch.no_grad():  # large weights: part of every sigmoid saturates
        for layer in model[:-1:2]:
            layer.weight.mul_(12)
    step, teardown = module["v_statistics"](model, str(tmp_path))[:2]
    gw = gradwatch.GradWatch(model, log_dir=str(tmp_path / "gw"), every_n_steps=1, warn=False)
    loss_fn(model).backward()
    values = step(0)
    report = gw.step()
    teardown()
    gw.close()
    params = list(model.parameters())
    sigmoids = [s for s in report.layers.values() if s.activation == "sigmoid"]
    linears = [s for s in report.layers.values() if s.signal_norm is not None]
    grads, rest = values[: len(params)], values[len(params) :]
    width = model[0].out_features
    counts, signals = rest[: len(sigmoids) * width], rest[len(sigmoids) * width :]
    assert grads == pytest.approx([p.grad.norm().item() for p in params], rel=1e-5)
    batch = report.layers[sigmoids[0].name].samples_per_unit
    flat = [
        sum(counts[i * width : (i + 1) * width]) / (batch * width) for i in range(len(sigmoids))
    ]
    assert flat == pytest.approx([s.saturation for s in sigmoids], abs=1e-7)
    assert 0 < min(flat) and max(flat) < 1
    assert sorted(signals) == pytest.approx(sorted(s.signal_norm for s in linears), rel=1e-5)
    assert len(signals) == len(linears) == len([m for m in model if isinstance(m, torch.nn.Linear)])


def test_device_benchmark_runs_on_cpu_with_every_model_and_variant(capsys):
    """Issue 23's accelerator benchmark, its CPU smoke run: every model, every variant, the
    per-module host time on the device; no GPU row comes from here."""
    module = runpy.run_path(str(ROOT / "benchmarks" / "device.py"))
    result = module["main"](["--device", "cpu", "--quick", "--no-compile", "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    assert set(result["cases"]) == {"MLP", "GPT-2 small", "ResNet-50"}
    for case in result["cases"].values():
        assert isinstance(case, dict), case
        assert case["ms_none"] > 0 and case["gradwatch every step"] > 0
        assert case["gradwatch default (every 50)"] > 0
    assert result["device"] == "cpu" and result["syncs_per_step"] is None
    assert result["host_time_per_layer"]["hooked_modules"] == 41
