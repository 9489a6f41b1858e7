"""Real-time scheduling knobs (runtime/realtime.py): pinning, SCHED_FIFO, stall accounting.

Each setting is applied in a child process, so the test process keeps its own scheduling."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from dpstack.runtime.realtime import RealtimeConfig, parse_cpus

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux scheduling interfaces")


def _child(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _has_cap_sys_nice() -> bool:
    for line in open("/proc/self/status"):
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 23 & 1)
    return False


def test_cpu_lists_parse_and_bad_ones_are_refused():
    assert parse_cpus("0-3,6") == (0, 1, 2, 3, 6)
    assert parse_cpus(" 2 , 1,2") == (1, 2)
    for bad in ("", "a", "3-1", "-1", "1-x"):
        with pytest.raises(ValueError):
            parse_cpus(bad)
    with pytest.raises(ValueError, match="1..99"):
        RealtimeConfig(priority=100)
    assert RealtimeConfig().argv() == [] and not RealtimeConfig().active


def test_pinning_applies_to_the_process_and_the_threads_it_starts_later():
    cpu = max(os.sched_getaffinity(0))
    got = _child(f"""
        import json, os, threading
        from dpstack.runtime.realtime import RealtimeConfig, apply_realtime, current_scheduling
        apply_realtime(RealtimeConfig(cpus=({cpu},)))
        seen = {{}}
        t = threading.Thread(target=lambda: seen.update(cpus=sorted(os.sched_getaffinity(0))))
        t.start(); t.join()
        print(json.dumps({{"main": current_scheduling(), "thread": seen["cpus"]}}))
    """)
    assert got["main"]["cpus"] == str(cpu) and got["thread"] == [cpu]


def test_a_cpu_the_process_may_not_use_is_a_clear_error():
    got = _child("""
        import json
        from dpstack.runtime.realtime import RealtimeConfig, RealtimeError, apply_realtime
        try:
            apply_realtime(RealtimeConfig(cpus=(4095,)))
            print(json.dumps({"error": None}))
        except RealtimeError as e:
            print(json.dumps({"error": str(e)}))
    """)
    assert got["error"] is not None and "4095" in got["error"] and "allowed" in got["error"]


def test_fifo_priority_is_applied_or_refused_with_what_to_change():
    got = _child("""
        import json
        from dpstack.runtime.realtime import RealtimeConfig, RealtimeError, apply_realtime, current_scheduling
        try:
            apply_realtime(RealtimeConfig(priority=10))
            print(json.dumps({"error": None, **current_scheduling()}))
        except RealtimeError as e:
            print(json.dumps({"error": str(e)}))
    """)
    if _has_cap_sys_nice():
        assert got["error"] is None and got["policy"] == "fifo" and got["priority"] == 10
    else:
        assert "CAP_SYS_NICE" in got["error"]


def test_cli_refuses_bad_scheduling_options_before_doing_anything(capsys):
    from dpstack.cli import main

    assert main(["sim", "--cpus", "4095", "--connect", "tcp://127.0.0.1:1"]) == 2
    assert "4095" in capsys.readouterr().err
    assert main(["serve", "no-such-package", "--rt-priority", "100"]) == 2
    assert "1..99" in capsys.readouterr().err


def test_stall_probe_sees_the_loop_wait_behind_a_busy_process_on_its_core():
    cpu = max(os.sched_getaffinity(0))
    got = _child(f"""
        import json, os, subprocess, sys, time
        from dpstack.runtime.realtime import RealtimeConfig, StallProbe, apply_realtime
        # Ordinary time-sharing for this loop and its hog, whatever the parent runs at: a hog
        # inheriting SCHED_FIFO would never let the loop run again on the shared core.
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        apply_realtime(RealtimeConfig(cpus=({cpu},)))
        probe = StallProbe()
        def spin(s):
            end = time.perf_counter() + s
            while time.perf_counter() < end:
                pass
        spin(0.2)
        _, alone = probe.read()
        hog = subprocess.Popen([sys.executable, "-c", "import os; os.sched_setaffinity(0, {{{cpu}}})\\nwhile True: pass"])
        time.sleep(0.3)
        probe.read()
        spin(0.4)
        _, shared = probe.read()
        hog.kill()
        print(json.dumps({{"alone": alone, "shared": shared}}))
    """)
    # Sharing one core with a spinning process, the loop waits for a good part of the 0.4 s.
    assert got["shared"] > 50.0 and got["shared"] > 3 * got["alone"]
