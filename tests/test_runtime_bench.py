"""The latency benchmark runs end to end on a tiny model and writes what it promises."""
import json
import sys
import types

from dpstack.cli import main as dpstack


def test_bench_latency_writes_records_and_targets(tmp_path, capsys):
    out = tmp_path / "lat.json"
    rc = dpstack(["bench", "latency", "--out", str(out), "--models", "test", "--samplers", "ddim-2;rti-3,1,0;streaming-1",
                  "--steps", "12", "--forward-reps", "10", "--threads", "1"])
    assert rc == 0
    data = json.loads(out.read_text())
    recs = {(r["sampler"], r["backend"]): r for r in data["records"]}
    assert set(recs) == {(s, b) for s in ("ddim-2", "rti-3,1,0", "streaming-15r-1e") for b in ("onnx", "torch")}
    for r in recs.values():
        assert r["step"]["n"] == 12 and 0 < r["step"]["p50_ms"] <= r["step"]["p99_ms"] <= r["step"]["max_ms"]
        assert r["ratio_p99_to_forward_p99"] > 0
    assert recs[("streaming-15r-1e", "onnx")]["nfe_per_step"] == 1.0
    assert recs[("rti-3,1,0", "onnx")]["nfe_per_step"] == 3.0
    assert recs[("rti-3,1,0", "onnx")]["extra"]["episode_start_nfe"] == 100
    assert recs[("ddim-2", "onnx")]["nfe_per_step"] == 2 / 12  # the start call covers steps 0-7; one more 2-step denoise at step 8
    names = {t["target"].split(":")[0] for t in data["targets"]}
    assert {"streaming 1 nfe/step", "RTI 3 refinements", "onnxruntime speed-up over torch eager (forward p50)"} <= names
    table = out.with_suffix(".md").read_text()
    assert "| test | streaming-15r-1e | onnx | 1.00 |" in table and table in capsys.readouterr().out


def test_bench_train_hands_over_to_the_policy_benchmark(monkeypatch):
    seen = []
    fake = types.ModuleType("dpstack.policy.bench_train")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "dpstack.policy.bench_train", fake)
    assert dpstack(["bench", "train", "--quick", "--out", "x.json"]) == 0
    assert seen == [["--quick", "--out", "x.json"]]
