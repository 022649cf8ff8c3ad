"""The overhead benchmark runs (its --quick mode): a smoke test, no timing assertion."""

import json
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_benchmark_quick_mode_produces_every_measurement(capsys):
    module = runpy.run_path(str(ROOT / "benchmarks" / "overhead.py"))
    result = module["main"](["--quick", "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    assert set(result["overhead"]) == {"deep sigmoid MLP", "small CNN", "transformer", "LSTM"}
    for variants in result["overhead"].values():
        assert variants["none"]["median"] == 1.0
        for name in ("gradwatch every step", "gradwatch default (every 50)", "floor"):
            assert any(v.startswith(name) for v in variants), name
        assert all(r["median"] > 0 for r in variants.values())
    big = result["mlp_1000_logging_step"]
    assert big["layers"] == 201
    timed = {k: v for k, v in big.items() if isinstance(v, dict)}
    assert "gradwatch" in timed and any(k.startswith("floor") for k in timed)
    assert any(k.startswith("gradwatch, a step that also reads the weights") for k in timed)
    assert sum(k.startswith("gradwatch off-schedule step") for k in timed) == 2
    assert all(r["median"] > 0 and r["mean"] > 0 for r in timed.values())
    assert big["scalar_tags"] < 1500
    assert set(result["memory"]) == {"peak_rss_kib_at_100", "peak_rss_kib_at_120"}
    peaks = result["step_peak_memory"]
    if "unavailable" not in peaks:  # glibc only
        assert set(peaks) == set(result["overhead"])
        assert all(r["plain_step_kib"] > 0 and r["ratio"] > 0 for r in peaks.values())
