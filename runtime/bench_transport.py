"""Benchmark: robot-side round trip over the real protocol (observation sent ->
chunk received), against a zero-action policy server in a separate process
(runtime/zero_server.py), so it measures transport + encode/decode + server
overhead, not a policy.

    dpstack bench transport [--steps 2000] [--out out/bench_transport.json]

Prints p50 / p99 / max per payload and writes JSON. Timings depend on the
machine's load; say so when quoting them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec
from dpstack.core.stats import format_ms, summarize_ms

PAYLOADS = {  # name -> (image side, cameras)
    "lowdim+8x8": (8, 1),
    "two 84x84 cameras": (84, 2),
    "two 224x224 cameras": (224, 2),
}


def transport_spec(image_hw: int, cameras: int) -> RobotSpec:
    """A 4-vector of state plus `cameras` uint8 images of image_hw x image_hw."""
    images = tuple(ArraySpec(f"image{i}", (image_hw, image_hw, 3), "uint8") for i in range(cameras))
    return RobotSpec(task="transport", robot="bench", control_hz=20.0, observations=(ArraySpec("state", (4,)), *images),
                     action=ActionSpec(shape=(3,), gripper_dims=(2,)))


def random_observation(rng: np.random.Generator, spec: RobotSpec) -> dict[str, np.ndarray]:
    return {o.key: (rng.integers(0, 256, size=o.shape, dtype=np.uint8) if o.is_image
                    else rng.uniform(-1, 1, size=o.shape).astype(np.float32)) for o in spec.observations}


def measure(image_hw: int, cameras: int, steps: int, warmup: int = 50) -> dict:
    from dpstack.runtime.client import PolicyClient
    from dpstack.runtime import zero_server

    spec = transport_spec(image_hw, cameras)
    with tempfile.TemporaryDirectory() as tmp:
        proc, endpoint = zero_server.start(spec, Path(tmp) / "spec.json")
    try:
        client = PolicyClient(endpoint, spec, "bench", timeout_s=5.0, heartbeat_s=60.0)
        if not client.wait_ready(10.0):
            raise RuntimeError(f"no handshake: {list(client.errors)}")
        rng = np.random.default_rng(0)
        observations = [random_observation(rng, spec) for _ in range(16)]
        for k in range(warmup + steps):
            if client.request(observations[k % 16], float(k), timeout_s=5.0) is None:
                raise RuntimeError(f"request {k} failed: {list(client.errors)[-1:]}")
        round_trip = summarize_ms(list(client.latencies_s)[warmup:], scale=1e3)
        stats = client.request_stats(2.0) or {}
        client.close()
    finally:
        proc.stop()
    payload = 16 + cameras * image_hw * image_hw * 3
    # the server's summaries cover every request it answered, warm-up included
    return {"payload_bytes": payload, "round_trip": round_trip,
            "server_queue": stats.get("queue"), "server_compute": stats.get("compute")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpstack bench transport", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="round trips timed per payload (default %(default)s)")
    p.add_argument("--out", default="out/bench_transport.json", help="JSON file to write (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = {}
    for name, (hw, cams) in PAYLOADS.items():
        r = measure(hw, cams, args.steps)
        results[name] = r
        rt = r["round_trip"]
        print(f"{name:36s} {r['payload_bytes']:>8d} B  round trip p50 {format_ms(rt['p50_ms'], '.3f')} ms  "
              f"p99 {format_ms(rt['p99_ms'], '.3f')} ms  max {format_ms(rt['max_ms'])} ms  (n={rt['n']})", flush=True)
    report = {"benchmark": "transport round trip (observation -> chunk), zero-action policy, tcp loopback",
              "host": platform.node(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
