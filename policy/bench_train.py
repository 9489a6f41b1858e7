"""Training throughput benchmark: samples/second for the U-Net presets on state observations,
or, with --image, the image loader next to the image trainer.

    dpstack bench train [--presets small dp] [--batch 256] [--steps 20] [--warmup 3] [--out out.json]
    dpstack bench train --image [--config lift_image_small] [--cameras agentview,robot0_eye_in_hand]
                        [--dataset lift_image.zarr] [--batch 64] [--steps 5] [--set K=V ...] [--out out.json]

Runs the real training step (encoder + denoiser forward, masked loss, backward, grad
clipping, AdamW, EMA) on a synthetic Lift-shaped batch (state obs 2 x 19, action 7,
Tp 16), times each step after warm-up, and reports the p50 and p99 step time and
samples/s = batch / p50 step time.

Image mode measures what training does per step: the loader (the next batch's indices,
the windows cut from the decoded in-memory cache, the conversion to float32 tensors) and
the trainer (the training step of the config's image policy on those batches). Without
--dataset the cache holds random frames of Lift's shapes (the loader's work does not
depend on what the pixels show); with it, the store is loaded as `dpstack train` loads
it, and the load time is reported too. The loader must outpace the trainer by >= 2x.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from dpstack.core.stats import summarize_ms


def _time_training_steps(model, cfg, batches, steps: int, warmup: int, device: str) -> list[float]:
    """Seconds per training step (after `warmup` untimed ones); batches() yields (obs, action) tensors."""
    import numpy as np
    import torch

    from .ema import EMA
    from .regimes import sample_levels

    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6)
    ema = EMA(model)
    times = []
    for i, (obs, action) in zip(range(warmup + steps), batches):
        levels, mask = sample_levels(rng, action.shape[0], cfg)
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
    return times


def bench_preset(preset: str, model_kind: str, batch: int, steps: int, warmup: int, device: str) -> dict:
    import itertools

    import numpy as np
    import torch

    from dpstack.core.normalizer import Normalizer
    from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec

    from .config import PolicyConfig
    from .model import DiffusionPolicyModel

    spec = RobotSpec("bench", "Panda", 20.0, (ArraySpec("state", (19,)),),
                     ActionSpec(key="action", shape=(7,), gripper_dims=(6,)))
    cfg = PolicyConfig(model=model_kind, preset=preset, regime_plain=0.2, regime_ladder=0.8, ladder_rungs=15)
    rng = np.random.default_rng(0)
    norm = Normalizer.fit({"state": rng.normal(size=(64, 19)), "action": rng.normal(size=(64, 7))})
    torch.manual_seed(0)
    model = DiffusionPolicyModel(cfg, spec, norm).to(device).train()
    obs = {"state": torch.randn(batch, cfg.n_obs_steps, 19, device=device)}
    action = torch.rand(batch, cfg.horizon, 7, device=device) * 2 - 1
    times = _time_training_steps(model, cfg, itertools.repeat((obs, action)), steps, warmup, device)
    step = summarize_ms(times, scale=1e3)
    return {"model": model_kind, "preset": preset, "params": model.num_parameters()["total"], "batch": batch,
            "step": step, "samples_per_s": batch / (step["p50_ms"] / 1e3)}


# Per-step sizes of Lift's low-dimensional observations, for the synthetic image dataset.
LIFT_LOW_DIM = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2, "object-state": 10}


def synthetic_image_data(pcfg, image_size: int, episodes: int, episode_steps: int, seed: int = 0):
    """TrainingData of Lift's shapes with random frames: what `dpstack train` holds in memory."""
    import numpy as np

    from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec

    from .config import ConfigError
    from .dataset import ACTION, prepare

    rng = np.random.default_rng(seed)
    n = episodes * episode_steps
    specs, arrays = [], {}
    for k in pcfg.obs_keys:
        if k in pcfg.image_keys:
            specs.append(ArraySpec(k, (image_size, image_size, 3), "uint8"))
            arrays[k] = rng.integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)
        elif k in LIFT_LOW_DIM:
            specs.append(ArraySpec(k, (LIFT_LOW_DIM[k],)))
            arrays[k] = rng.normal(size=(n, LIFT_LOW_DIM[k])).astype(np.float32)
        else:
            raise ConfigError(f"observation {k!r} is not one of Lift's {sorted(LIFT_LOW_DIM)}; measure on a real "
                              "store with --dataset")
    arrays[ACTION] = rng.uniform(-1, 1, size=(n, 7)).astype(np.float32)
    spec = RobotSpec("lift", "Panda", 20.0, tuple(specs), ActionSpec(key=ACTION, shape=(7,), gripper_dims=(6,)))
    ends = np.arange(1, episodes + 1, dtype=np.int64) * episode_steps
    return prepare(arrays, ends, spec, pcfg, source=f"synthetic: {episodes} x {episode_steps} steps")


def _with_cameras(config, cameras: tuple[str, ...]):
    """The config with its image keys replaced by these cameras' (low-dimensional keys kept)."""
    from dataclasses import replace

    images = tuple(f"{c}_image" for c in cameras)
    low = tuple(k for k in config.policy.obs_keys if k not in config.policy.image_keys)
    return replace(config, policy=replace(config.policy, obs_keys=images + low, image_keys=images))


def bench_image(config, dataset: Path | None, image_size: int, episodes: int, batch: int, steps: int,
                warmup: int, loader_batches: int, device: str) -> dict:
    """Loader samples/s (decoded in-memory cache -> float32 tensors) and trainer samples/s."""
    import numpy as np
    import torch

    from .dataset import ACTION, load_dataset
    from .model import DiffusionPolicyModel
    from .train import IndexStream, _to_device

    pcfg = config.policy
    t0 = time.perf_counter()
    data = (load_dataset(dataset, pcfg, data=config.data) if dataset is not None
            else synthetic_image_data(pcfg, image_size, episodes, 50))
    load_s = time.perf_counter() - t0
    windows = data.windows(pcfg)
    stream = IndexStream(len(windows), 0)
    dev = torch.device(device)

    def load(step: int) -> dict:
        return _to_device(windows.batch(stream.batch(step, batch)), dev)

    times = []
    for i in range(loader_batches + 1):
        t = time.perf_counter()
        load(i)
        if i:  # the first pays for page faults
            times.append(time.perf_counter() - t)
    loader = summarize_ms(times, scale=1e3)

    torch.manual_seed(0)
    model = DiffusionPolicyModel(pcfg, data.spec, data.normalizer).to(dev).train()
    batches = ((lambda b: ({k: b[k] for k in data.spec.obs_keys}, b[ACTION]))(load(i)) for i in range(10 ** 9))
    step = summarize_ms(_time_training_steps(model, pcfg, batches, steps, warmup, device), scale=1e3)
    loader_sps = batch / (loader["p50_ms"] / 1e3)
    trainer_sps = batch / (step["p50_ms"] / 1e3)
    images = {k: list(data.spec.obs(k).shape) for k in pcfg.image_keys}
    return {"mode": "image", "source": data.source, "n_steps": int(data.episode_ends[-1]), "windows": len(windows),
            "load_s": load_s, "images": images, "n_obs_steps": pcfg.n_obs_steps, "batch": batch,
            "params": model.num_parameters()["total"], "loader": {"what": "decoded in-memory cache", **loader},
            "loader_samples_per_s": loader_sps, "step": step, "trainer_samples_per_s": trainer_sps,
            "loader_over_trainer": loader_sps / trainer_sps, "cache_bytes": int(sum(a.nbytes for a in data.arrays.values()))}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", action="store_true",
                        help="image mode: loader samples/s next to trainer samples/s for an image config")
    parser.add_argument("--config", default="lift_image_small", help="image mode: training config (default %(default)s)")
    parser.add_argument("--cameras", default="agentview,robot0_eye_in_hand",
                        help="image mode: comma-separated cameras, replacing the config's (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=84, help="image mode: synthetic frame size (default 84)")
    parser.add_argument("--episodes", type=int, default=200, help="image mode: synthetic episodes of 50 steps (default 200)")
    parser.add_argument("--dataset", type=Path, help="image mode: measure on this store instead of synthetic frames")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="image mode: config overrides, as for dpstack train (e.g. policy.image_width=32)")
    parser.add_argument("--loader-batches", type=int, default=50, help="image mode: timed loader batches (default 50)")
    parser.add_argument("--presets", nargs="+", default=["small", "dp"], help="U-Net presets to measure")
    parser.add_argument("--transformer", action="store_true", help="also measure the transformer (dp preset)")
    parser.add_argument("--batch", type=int, help="samples per training step (default 256; image mode: the config's)")
    parser.add_argument("--steps", type=int, help="timed steps per preset, after warm-up (default 20; image mode: 5)")
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
    if args.image:
        return run_image(args, device)
    args.batch, args.steps = args.batch or 256, args.steps or 20
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


def run_image(args: argparse.Namespace, device: str) -> int:
    import torch

    from dpstack.core.spec import parse_cameras

    from .config import ConfigError, load_config

    try:
        config = load_config(args.config, args.set)
        batch = args.batch or config.train.batch_size
        cameras = parse_cameras(args.cameras)
        if cameras:
            config = _with_cameras(config, cameras)
        r = bench_image(config, args.dataset, args.image_size, args.episodes, batch, args.steps or 5, args.warmup,
                        args.loader_batches, device)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"dpstack bench train: {e}", file=sys.stderr)
        return 2
    imgs = ", ".join(f"{k} {'x'.join(map(str, s[:2]))}" for k, s in r["images"].items())
    print(f"training throughput, image obs ({imgs}, To {r['n_obs_steps']}), config {args.config}, batch {r['batch']}, "
          f"device {device} ({torch.get_num_threads()} threads)")
    print(f"data: {r['source']}, {r['n_steps']} steps, {r['windows']} windows, cache {r['cache_bytes'] / 2**20:.0f} MiB, "
          f"loaded in {r['load_s']:.1f} s")
    print(f"{'':<9}{'p50 ms/batch':>14}{'p99 ms/batch':>14}{'samples/s':>12}")
    print(f"{'loader':<9}{r['loader']['p50_ms']:>14.1f}{r['loader']['p99_ms']:>14.1f}{r['loader_samples_per_s']:>12.1f}")
    print(f"{'trainer':<9}{r['step']['p50_ms']:>14.1f}{r['step']['p99_ms']:>14.1f}{r['trainer_samples_per_s']:>12.1f}"
          f"   ({r['params'] / 1e6:.1f}M params)")
    ok = r["loader_over_trainer"] >= 2.0
    print(f"loader / trainer = {r['loader_over_trainer']:.1f}x ({'meets' if ok else 'MISSES'} the 2x target)")
    result = {"benchmark": "train_throughput", "device": device, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "config": args.config, "results": [r]}
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
