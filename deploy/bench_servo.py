"""Servo-loop timing and bridge latency on this machine; prints a table and writes JSON.

    dpstack bench servo [--seconds 5] [--out out/bench_servo.json]

1. Servo-loop jitter at 125 and 500 Hz: the bridge loop driving the MujocoArm
   (sim/arm_process.py in its own process) with no policy, i.e. read state ->
   safety layer -> servo command every cycle. Period error = each measured cycle
   period minus the nominal one: p50, p99 and max of |error|. A bare sleep loop
   at the same rate is measured too, to separate the machine's scheduling jitter
   from the bridge's own work.
2. Observation-to-command latency: the closed loop against a policy server in its
   own process serving a ZERO-ACTION test policy (so the figure is transport +
   bridge, not model compute). obs_to_chunk = observation timestamp -> chunk
   received; obs_to_command = observation timestamp -> first servo command
   carrying that chunk (includes waiting for its first action's scheduled slot).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

from dpstack.core.stats import Summary, format_ms, summarize_ms


def period_error(ticks, hz: float) -> Summary:
    """|measured period - nominal| of consecutive ticks (s), summarised in ms."""
    return summarize_ms(np.abs(np.diff(np.asarray(ticks, dtype=np.float64)) - 1.0 / hz), scale=1e3)


def bare_loop(hz: float, seconds: float) -> Summary:
    from dpstack.runtime.jitter import wake_loop
    return period_error(wake_loop(hz, seconds).wakeups, hz)


def _config(hz: float):
    from dpstack.deploy.config import load_config, without_cameras

    cfg = without_cameras(load_config("sim"))   # the arm's loop alone: no rendering in it
    cfg.driver.servo_hz = hz
    cfg.safety.estop_endpoint = ""
    return cfg


def bridge_loop(hz: float, seconds: float, endpoint: str | None = None) -> dict:
    from dpstack.deploy.bridge import Bridge, robot_spec
    from dpstack.deploy.drivers.mujoco_arm import MujocoArm

    cfg = _config(hz)
    client = None
    if endpoint:
        from dpstack.runtime.client import PolicyClient
        client = PolicyClient(endpoint, robot_spec(cfg), "bench-arm", timeout_s=1.0)
        client.wait_ready(10.0)
    bridge = Bridge(cfg, MujocoArm(cfg.driver), client, install_handlers=False)
    ticks = []
    bridge.start()
    try:
        summary = bridge.run(duration_s=seconds, on_tick=lambda b, now: ticks.append(now))
        raw = bridge.driver.last_raw or {}
    finally:
        bridge.close()
        if client is not None:
            client.close()
    return {"period_error": period_error(ticks, hz), "loop_work": summary["loop_work"],
            "obs_to_chunk": summary.get("obs_to_chunk"), "obs_to_command": summary["obs_to_command"],
            "chunks": summary.get("chunks", 0), "sim_controller_overruns": raw.get("overruns")}


def _start_zero_server(out: Path):
    from dpstack.deploy.bridge import robot_spec
    from dpstack.runtime import zero_server

    return zero_server.start(robot_spec(_config(125)), out.with_suffix(".spec.json"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpstack bench servo", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement (default %(default)s)")
    p.add_argument("--rates", type=float, nargs="+", default=[125.0, 500.0], metavar="HZ",
                   help="servo rates to measure (default 125 500)")
    p.add_argument("--out", default="out/bench_servo.json", help="JSON file to write (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import os

    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "loadavg_start": list(os.getloadavg())},
                     "seconds": args.seconds, "servo": {}, "latency": {}}
    for hz in args.rates:
        results["servo"][f"{hz:g}"] = {"bare_sleep_loop": bare_loop(hz, args.seconds),
                                       "bridge_mujoco_arm": bridge_loop(hz, args.seconds)}
    server, endpoint = _start_zero_server(Path(args.out))
    try:
        for hz in args.rates:
            results["latency"][f"{hz:g}"] = bridge_loop(hz, args.seconds, endpoint)
    finally:
        server.stop()
    results["machine"]["loadavg_end"] = list(os.getloadavg())

    print(f"servo loop period error |measured period - nominal| (ms), {args.seconds:g} s each:")
    print(f"{'rate':>6} {'loop':<20} {'p50':>8} {'p99':>8} {'max':>8}")
    for hz, r in results["servo"].items():
        for name, st in (("bare sleep", r["bare_sleep_loop"]), ("bridge + MujocoArm", r["bridge_mujoco_arm"]["period_error"])):
            print(f"{hz:>6} {name:<20} " + " ".join(f"{format_ms(st[k], '.3f'):>8}" for k in ("p50_ms", "p99_ms", "max_ms")))
    print("observation -> chunk / -> first command (ms), zero-action policy server in its own process:")
    for hz, r in results["latency"].items():
        a, b = r["obs_to_chunk"], r["obs_to_command"]
        if a["n"] and b["n"]:
            print(f"{hz:>6} chunk p50 {a['p50_ms']:.2f} p99 {a['p99_ms']:.2f} max {a['max_ms']:.2f} | "
                  f"command p50 {b['p50_ms']:.2f} p99 {b['p99_ms']:.2f} max {b['max_ms']:.2f} (n={b['n']})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
