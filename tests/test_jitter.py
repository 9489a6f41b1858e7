"""The jitter witness (runtime/jitter.py): wake-up lateness and stall timestamps."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from array import array
from pathlib import Path

import pytest

from dpstack.core.process import parse_ready
from dpstack.runtime.jitter import WakeLog, main, one_cpu_command, stalled_during, summarize, wake_loop


def test_wake_loop_keeps_its_grid_and_reports_lateness():
    log = wake_loop(200.0, 0.3)
    assert 50 <= len(log.wakeups) <= 60  # 60 slots; a late wake-up skips the slots it overslept
    assert all(b > a for a, b in zip(log.wakeups, log.wakeups[1:]))
    assert min(log.late_ms) >= 0.0
    with pytest.raises(ValueError):
        wake_loop(0.0, 1.0)


def test_stalls_are_the_late_wake_ups_with_when_the_core_was_lost():
    log = WakeLog(array("d", [10.001, 10.002, 10.053, 10.054]), array("d", [0.1, 0.2, 50.0, 0.1]))
    r = summarize(log, 1000.0, stall_ms=2.0)
    assert r.wakeups == r.late["n"] == 4 and r.late["max_ms"] == 50.0 and r.late["p50_ms"] == pytest.approx(0.15)
    assert r.stalls == [(pytest.approx(10.003), 50.0)]
    assert stalled_during(r.stalls, 10.02, 10.03) and stalled_during(r.stalls, 9.9, 10.004)
    assert not stalled_during(r.stalls, 10.0535, 10.06) and not stalled_during(r.stalls, 9.0, 10.0)


def test_slowdowns_are_runs_of_wake_ups_whose_fixed_work_took_much_longer():
    t = [100.0 + i / 1000 for i in range(40)]
    work = [2.0] * 10 + [15.0] * 6 + [2.0] * 10 + [15.0] * 4 + [2.0] * 10  # a run of 6, then one of 4
    log = WakeLog(array("d", t), array("d", [0.05] * 40), array("d", work))
    r = summarize(log, 1000.0, stall_ms=2.0)
    assert r.work_p50_us == 2.0 and r.stalls == []
    assert r.slowdowns == [(pytest.approx(100.010), pytest.approx(6.0), 7.5)]  # 4 in a row is not enough
    assert stalled_during(r.slowdowns, 100.013, 100.014) and not stalled_during(r.slowdowns, 100.026, 100.03)


def test_a_witness_stopped_from_outside_records_the_stall_when_it_happened(tmp_path: Path):
    out = tmp_path / "w.json"
    cpu = min(os.sched_getaffinity(0))
    proc = subprocess.Popen(one_cpu_command(cpu, hz=500.0, stall_ms=2.0, out=out), stdout=subprocess.PIPE, text=True)
    try:
        assert parse_ready(proc.stdout.readline()) == {"ready": True}
        time.sleep(0.2)
        # What a hypervisor does to a VM: the process loses its core for 150 ms.
        stopped = time.monotonic()
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.15)
        proc.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert proc.returncode == 0
    r = json.loads(out.read_text())
    assert r["cpu"] == str(cpu) and r["wakeups"] > 100
    big = [(s, ms) for s, ms in r["stalls"] if ms >= 100.0]
    assert len(big) == 1, r["stalls"]
    start, ms = big[0]
    assert stopped - 0.01 <= start <= stopped + 0.01 and start + ms / 1e3 >= resumed - 0.01
    assert r["late"]["max_ms"] == pytest.approx(ms, abs=1e-3)
    assert r["work_p50_us"] > 0 and r["slowdowns"] == []  # stopped is not slow


def test_bench_jitter_measures_each_core_and_writes_json(tmp_path: Path, capsys):
    cpus = sorted(os.sched_getaffinity(0))[:2]
    out = tmp_path / "jitter.json"
    assert main(["--cpus", ",".join(map(str, cpus)), "--hz", "200", "--seconds", "0.3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["cpu"] for r in result["cpus"]] == [str(c) for c in cpus]
    assert all(50 <= r["wakeups"] <= 60 and r["late"]["p50_ms"] <= r["late"]["p99_ms"] <= r["late"]["max_ms"]
               for r in result["cpus"])
    assert "late p50" in capsys.readouterr().out
    assert main(["--cpus", "4095", "--seconds", "0.1"]) == 1  # a core it may not use: that core's error, exit 1


def test_eval_witness_is_refused_in_lockstep(tmp_path: Path):
    from dpstack.sim.evaluate import EvalConfig

    with pytest.raises(ValueError, match="witness"):
        EvalConfig(policy_dir=tmp_path, out=tmp_path, mode="lockstep", witness=True)
    assert EvalConfig(policy_dir=tmp_path, out=tmp_path, mode="realtime", witness=True).witness


@pytest.mark.skipif(sys.platform != "linux", reason="Linux scheduling")
def test_one_cpu_command_asks_for_the_core_and_priority():
    argv = one_cpu_command(1, hz=1000.0, stall_ms=2.0, priority=51, lock_memory=True)
    assert argv[argv.index("--cpus") + 1] == "1" and argv[argv.index("--rt-priority") + 1] == "51"
    assert "--lock-memory" in argv and "--out" not in argv


def test_an_unreadable_witness_file_is_named_and_left_out(tmp_path: Path):
    from dpstack.sim.evaluate import read_witness, witness_stalls

    (tmp_path / "run_cpu0.json").write_text(json.dumps({"cpu": "0", "stalls": [[5.0, 30.0]], "slowdowns": [[9.0, 6.0, 7.0]]}))
    (tmp_path / "run_cpu1.json").write_text('{"cpu": "1", "stal')  # cut off mid-write
    said = []
    witness = read_witness(tmp_path, said.append)
    assert [w["cpu"] for w in witness] == ["0"] and "run_cpu1.json" in said[0]
    assert witness_stalls(witness) == [(5.0, 30.0), (9.0, 6.0)]
    assert read_witness(tmp_path / "missing", said.append) == []
