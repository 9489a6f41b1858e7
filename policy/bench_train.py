"""Training throughput benchmark: samples/second for the U-Net presets on state observations.

    dpstack bench train [--presets small dp] [--batch 256] [--steps 20] [--warmup 3] [--out out.json]

Runs the real training step (encoder + denoiser forward, masked loss, backward, grad
clipping, AdamW, EMA) on a synthetic Lift-shaped batch (state obs 2 x 19, action 7,
Tp 16), times each step after warm-up, and reports the p50 and p99 step time and
samples/s = batch / p50 step time.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from dpstack.core.stats import summarize_ms


def bench_preset(preset: str, model_kind: str, batch: int, steps: int, warmup: int, device: str) -> dict:
    import numpy as np
    import torch

    from dpstack.core.normalizer import Normalizer
    from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec

    from .config import PolicyConfig
    from .ema import EMA
    from .model import DiffusionPolicyModel
    from .regimes import sample_levels

    spec = RobotSpec("bench", "Panda", 20.0, (ArraySpec("state", (19,)),),
                     ActionSpec(key="action", shape=(7,), gripper_dims=(6,)))
    cfg = PolicyConfig(model=model_kind, preset=preset, regime_plain=0.2, regime_ladder=0.8, ladder_rungs=15)
    rng = np.random.default_rng(0)
    norm = Normalizer.fit({"state": rng.normal(size=(64, 19)), "action": rng.normal(size=(64, 7))})
    torch.manual_seed(0)
    model = DiffusionPolicyModel(cfg, spec, norm).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6)
    ema = EMA(model)
    obs = {"state": torch.randn(batch, cfg.n_obs_steps, 19, device=device)}
    action = torch.rand(batch, cfg.horizon, 7, device=device) * 2 - 1
    times = []
    for i in range(warmup + steps):
        levels, mask = sample_levels(rng, batch, cfg)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        noise = torch.randn_like(action)
        loss = model(obs, action, torch.from_numpy(levels).to(device), noise, torch.from_numpy(mask).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = summarize_ms(times, scale=1e3)
    return {"model": model_kind, "preset": preset, "params": model.num_parameters()["total"], "batch": batch,
            "step": step, "samples_per_s": batch / (step["p50_ms"] / 1e3)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", nargs="+", default=["small", "dp"], help="U-Net presets to measure")
    parser.add_argument("--transformer", action="store_true", help="also measure the transformer (dp preset)")
    parser.add_argument("--batch", type=int, default=256, help="samples per training step (default 256)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per preset (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per preset first (default 3)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--out", type=Path, default=Path("out/bench_train.json"), help="JSON file to write (default %(default)s)")
    parser.add_argument("--json", type=Path, dest="out", help=argparse.SUPPRESS)  # the old spelling


def run(args: argparse.Namespace) -> int:
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    jobs = [("unet", p) for p in args.presets] + ([("transformer", "dp")] if args.transformer else [])
    rows = []
    print(f"training throughput, state obs, batch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"device {device} ({torch.get_num_threads()} threads)")
    print(f"{'model':<12}{'preset':<8}{'params':>10}{'p50 ms/step':>15}{'p99 ms/step':>12}{'samples/s':>12}")
    for kind, preset in jobs:
        r = bench_preset(preset, kind, args.batch, args.steps, args.warmup, device)
        rows.append(r)
        print(f"{kind:<12}{preset:<8}{r['params'] / 1e6:>9.1f}M{r['step']['p50_ms']:>15.1f}{r['step']['p99_ms']:>12.1f}"
              f"{r['samples_per_s']:>12.1f}", flush=True)
    result = {"benchmark": "train_throughput", "device": device, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "cuda": torch.cuda.get_device_name(0) if device.startswith("cuda") else None, "results": rows}
    if rows and len(rows) > 1:
        result["ratio_first_to_last"] = rows[0]["samples_per_s"] / rows[-1]["samples_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpstack bench train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
