"""Benchmark: robot-side round trip over the real protocol (observation sent ->
chunk received), against the TEST EchoPolicy server in a separate process, so it
measures transport + encode/decode + server overhead, not a policy.

    python -m runtime.bench_transport [--steps 2000] [--out out/bench_transport.json]

Prints median / p99 / max per payload and writes JSON. Timings depend on the
machine's load; say so when quoting them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PAYLOADS = {  # name -> (image side, cameras)
    "lowdim+8x8": (8, 1),
    "two 84x84 cameras": (84, 2),
    "two 224x224 cameras": (224, 2),
}


def _start_server(image_hw: int, cameras: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "runtime.testing", "--bind", "tcp://127.0.0.1:*",
                             "--image-hw", str(image_hw), "--cameras", str(cameras)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("serving "):
        proc.kill()
        raise RuntimeError(f"echo server did not start: {line!r}")
    return proc, line.rsplit(" on ", 1)[1].strip()


def measure(image_hw: int, cameras: int, steps: int, warmup: int = 50) -> dict:
    from runtime.client import PolicyClient
    from runtime.testing import echo_observation, echo_spec

    spec = echo_spec(image_hw, cameras)
    proc, endpoint = _start_server(image_hw, cameras)
    try:
        client = PolicyClient(endpoint, spec, "bench", timeout_s=5.0, heartbeat_s=60.0)
        if not client.wait_ready(10.0):
            raise RuntimeError(f"no handshake: {list(client.errors)}")
        rng = np.random.default_rng(0)
        observations = [echo_observation(rng, spec) for _ in range(16)]
        for k in range(warmup + steps):
            if client.request(observations[k % 16], float(k), timeout_s=5.0) is None:
                raise RuntimeError(f"request {k} failed: {list(client.errors)[-1:]}")
        lat = np.array(list(client.latencies_s)[warmup:]) * 1e3
        stats = client.request_stats(2.0) or {}
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
    payload = 16 + cameras * image_hw * image_hw * 3
    return {"payload_bytes": payload, "steps": int(lat.size), "median_ms": float(np.median(lat)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
            "server_queue_ms_median": stats.get("queue_ms", {}).get("median"),
            "server_compute_ms_median": stats.get("compute_ms", {}).get("median")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--out", default="out/bench_transport.json")
    args = p.parse_args(argv)
    results = {}
    for name, (hw, cams) in PAYLOADS.items():
        r = measure(hw, cams, args.steps)
        results[name] = r
        print(f"{name:36s} {r['payload_bytes']:>8d} B  round trip median {r['median_ms']:.3f} ms  "
              f"p99 {r['p99_ms']:.3f} ms  max {r['max_ms']:.2f} ms  (n={r['steps']})", flush=True)
    report = {"benchmark": "transport round trip (observation -> chunk), echo test policy, tcp loopback",
              "host": platform.node(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
