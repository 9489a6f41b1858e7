"""`dpstack bench fleet`: robots against one real `dpstack serve` subprocess, a tiny package."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpstack.policy import bench_fleet
from runtime_tiny_package import write_tiny_package


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_package(tmp_path_factory.mktemp("fleet") / "tiny")


def test_two_robots_write_per_robot_figures_and_soak_intervals(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    rc = bench_fleet.main(["--package", str(tiny), "--samplers", "ddim-2", "--robots", "2", "--hz", "20",
                           "--seconds", "3", "--soak", "--sample-s", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert (run["model"], run["sampler"], run["robots"], run["scheduling"]) == ("tiny", "ddim-2", 2, "default")
    assert [r["robot"] for r in run["robot_results"]] == ["robot-0", "robot-1"]
    for r in run["robot_results"]:
        assert 0 < r["ticks"] <= 3 * 20 * 1.1   # never faster than the control rate (the stop may land a tick late)
        assert 0 <= r["held_steps"] <= r["ticks"]
        assert r["chunks"] > 0 and r["chunk_latency"]["n"] == r["chunks"]
        assert r["chunk_latency"]["p50_ms"] <= r["chunk_latency"]["p99_ms"]
    assert run["batch"]["n"] > 0 and run["batch"]["max"] <= 2 and run["server_restarts"] == 0
    assert run["rss_mb"] and all(mb > 10 for _, mb in run["rss_mb"])  # the server's memory, sampled
    assert [row["from_s"] for row in run["intervals"]] == [0, 1, 2]
    assert sum(row["held_steps"] for row in run["intervals"]) == sum(r["held_steps"] for r in run["robot_results"])
    table = out.with_suffix(".md").read_text()
    assert "| tiny | ddim-2 | 2 | default | robot-1 |" in table
    assert not out.with_suffix(".partial.json").exists()


def test_a_server_option_it_does_not_know_is_one_sentence(tiny: Path, tmp_path: Path, capsys) -> None:
    rc = bench_fleet.main(["--package", str(tiny), "--samplers", "ddim-2", "--robots", "1", "--seconds", "1",
                           "--serve-args", "--no-such-option 3", "--out", str(tmp_path / "f.json")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dpstack bench fleet: this dpstack serve does not accept") and "--no-such-option" in last


def test_serve_command_line_passes_scheduling_and_extra_options(tiny: Path) -> None:
    argv = bench_fleet.serve_argv(tiny, "streaming", 2, "tcp://127.0.0.1:*", "batched", ["--batch-window-ms", "2"])
    assert argv[argv.index("--scheduling") + 1] == "batched" and argv[-2:] == ["--batch-window-ms", "2"]
    assert "--scheduling" not in bench_fleet.serve_argv(tiny, "streaming", 2, "tcp://127.0.0.1:*", "default", [])


def test_batch_summary_read_from_the_server_stats() -> None:
    assert bench_fleet.batch_summary({"chunks": 3}) is None    # a serial server: the table prints '-'
    batch = {"n": 12, "mean": 3.5, "p50": 4.0, "p99": 4.0, "max": 4.0}
    assert bench_fleet.batch_summary({"batch": batch}) == batch
    assert bench_fleet.format_batches(batch) == "mean 3.50, p50 4, max 4 (12 calls)"
    assert bench_fleet.format_batches(None) == "-"
