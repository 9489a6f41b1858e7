"""`dpstack bench latency`: sampler speed figures as JSON + a markdown table.

latency: per-control-step compute latency of every sampler (PolicyRunner.control_step:
normalisation + encoder + sampler + unnormalisation), onnxruntime CPU vs the same
sampler driving the torch model eagerly, plus a single denoiser forward per
model/backend as the reference for the ratio targets. Models are built with random
weights from the policy code and exported to a temporary directory (or pass
--package DIR to time an existing package with onnxruntime only, no torch).

Image models (`*-image`: two 84x84 cameras + proprioception) are timed with the runner's
feature cache on (a step encodes only the newest frame per camera) and off (the whole
To-step window every inference); their reference is one encoder forward (one frame per
camera) plus one denoiser forward, both timed after every control step.

It lives in policy/ because it builds and drives torch models; the runtime
itself never imports torch.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dpstack.core.stats import Summary, summarize_ms

DEFAULT_MODELS = "small,dp,dp-int8,transformer"
DEFAULT_SAMPLERS = "ddpm-100,ddim-10,rti-3,1,0,streaming-1,streaming-3"
# model name -> (PolicyConfig.model, preset)
MODELS = {"test": ("unet", "test"), "small": ("unet", "small"), "dp": ("unet", "dp"),
          "transformer": ("transformer", "dp"), "transformer-small": ("transformer", "small")}
INT8 = "-int8"  # a model name with this suffix: the same model exported with int8 MatMul weights (policy/quantize.py)
MODELS.update({name + INT8: MODELS[name] for name in ("dp", "transformer")})
# image model name -> (model, preset, image fields of PolicyConfig)
IMAGE_MODELS = {
    "small-image": ("unet", "small", {"image_encoder": "small", "image_width": 32}),
    "resnet-image": ("unet", "small", {"image_encoder": "resnet18", "image_width": 64}),
    "test-image": ("unet", "test", {"image_encoder": "small", "image_width": 8, "image_keypoints": 4, "image_feature_dim": 8}),
}
MODELS.update({name: (kind, preset) for name, (kind, preset, _) in IMAGE_MODELS.items()})
# backend name -> the onnxruntime execution provider it times
GPU_BACKENDS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
# Targets from the issue, checked on the ratios measured within one run.
STREAM_TARGET, RTI_TARGET, ORT_SPEEDUP_TARGET, DP_STREAM_P99_MS = 1.3, 3.5, 2.5, 15.0


def build_parser() -> argparse.ArgumentParser:
    lat = argparse.ArgumentParser(prog="dpstack bench latency",
                                  description="per-control-step latency of every sampler, onnxruntime vs torch eager")
    lat.add_argument("--out", required=True, help="JSON file to write (a .md table is written next to it)")
    lat.add_argument("--models", default=DEFAULT_MODELS, help=f"comma list of {sorted(MODELS)} (default {DEFAULT_MODELS})")
    lat.add_argument("--package", action="append", default=[], help="time an exported package dir instead (onnx only); repeatable")
    lat.add_argument("--samplers", default=DEFAULT_SAMPLERS,
                     help="comma-separated samplers as `dpstack serve --sampler` takes them: ddpm-N, ddim-N, "
                          "rti (the package's list, else rti-renoise-40,15,0), rti[-renoise]-K1,K2,.., streaming-E; a bare number continues "
                          "the rti list before it (default %(default)s)")
    lat.add_argument("--backends", default="onnx,torch",
                     help="onnx (onnxruntime CPU), torch (eager), cuda, tensorrt (onnxruntime's GPU providers, where "
                          "they exist; fp16 and an engine cache for TensorRT) (default %(default)s)")
    lat.add_argument("--steps", type=int, default=500, help="control steps timed per (model, sampler, backend)")
    lat.add_argument("--max-seconds", type=float, default=60.0,
                     help="stop a record early after this long (noted in the JSON; default %(default)s)")
    lat.add_argument("--forward-reps", type=int, default=50, help="warm-up forwards per model/backend before timing")
    lat.add_argument("--threads", type=int, default=2, help="intra-op threads for onnxruntime and torch (default 2)")
    lat.add_argument("--no-spin", action="store_true",
                     help="onnxruntime threads do not spin-wait (better on an oversubscribed machine)")
    lat.add_argument("--seed", type=int, default=0, help="seed of the random weights, observations and samplers (default 0)")
    return lat


def main(argv: list[str] | None = None) -> int:
    return run_latency(build_parser().parse_args(argv))


@dataclass
class Record:
    model: str
    sampler: str
    backend: str
    nfe_per_step: float           # mean denoiser evaluations per control step (steady state)
    step: Summary                 # the control steps timed (after the episode-start call)
    episode_start_ms: float       # first call of the episode (full denoise for rti/streaming), not in the stats
    forward: Summary              # one denoiser forward, batch 1, same model and backend, timed after each step
    ratio_p99_to_forward_p99: float
    ratio_p50_to_forward_p50: float
    threads: int
    truncated: bool = False
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def forward_timer(denoise: Callable, horizon: int, action_dim: int, cond_dim: int, rng: np.random.Generator) -> Callable[[], float]:
    """A function timing one batch-1 denoiser forward (ms) on fixed random inputs."""
    x = rng.standard_normal((1, horizon, action_dim)).astype(np.float32)
    t = rng.integers(0, 100, (1, horizon)).astype(np.int64)
    c = rng.standard_normal((1, cond_dim)).astype(np.float32)

    def once() -> float:
        s = time.perf_counter()
        denoise(x, t, c)
        return (time.perf_counter() - s) * 1e3
    return once


class ImageForward:
    """Times one encoder forward on one observation (one frame per camera) and then one denoiser
    forward; calling it returns their sum (ms) and keeps each part."""

    def __init__(self, package, denoise_once: Callable[[], float], rng: np.random.Generator) -> None:
        obs = observation_pool(package.spec, package.normalizer, package.obs_keys, rng, n=1)[0]
        self.step = {k: (v if package.spec.obs(k).is_image else package.normalizer.normalize(k, v))[None]
                     for k, v in obs.items()}
        self.encode_step, self.denoise_once = package.encode_step, denoise_once
        self.encoder_ms: list[float] = []
        self.denoiser_ms: list[float] = []

    def __call__(self) -> float:
        s = time.perf_counter()
        self.encode_step(self.step)
        self.encoder_ms.append((time.perf_counter() - s) * 1e3)
        self.denoiser_ms.append(self.denoise_once())
        return self.encoder_ms[-1] + self.denoiser_ms[-1]


def observation_pool(spec, normalizer, obs_keys, rng: np.random.Generator, n: int = 16) -> list[dict[str, np.ndarray]]:
    """`n` plausible observations in robot units, to cycle through: states uniform inside the
    normaliser's range, images random uint8."""
    pool = []
    for _ in range(n):
        o = {}
        for k in obs_keys:
            s = spec.obs(k)
            if s.is_image:
                o[k] = rng.integers(0, 256, s.shape).astype(np.uint8)
            else:
                st = normalizer[k]
                o[k] = rng.uniform(st.min, st.max).astype(np.float32)
        pool.append(o)
    return pool


def gpu_backend_missing(backend: str) -> str | None:
    """One sentence when onnxruntime here lacks the provider of a GPU backend, else None."""
    import onnxruntime as ort

    from dpstack.runtime.package import missing_providers

    return missing_providers([GPU_BACKENDS[backend]], ort.get_available_providers())


def time_sampler(package, sampler: str, steps: int, max_seconds: float, seed: int, forward: Callable[[], float],
                 feature_cache: bool = True) -> dict[str, Any]:
    """Time `steps` control steps; after each, one bare denoiser forward, so the reference
    forward is measured in the same time window as the steps (fair ratios on a busy machine)."""
    from dpstack.runtime.policy import PolicyRunner

    runner = PolicyRunner(package, sampler, feature_cache=feature_cache)
    runner.reset(seed)
    pool = observation_pool(package.spec, package.normalizer, package.obs_keys, np.random.default_rng(seed))
    s = time.perf_counter()
    runner.control_step(pool[0])
    first_ms = (time.perf_counter() - s) * 1e3
    # As `dpstack serve` does before serving: what is loaded (torch included, in this
    # process) is frozen, so a full collection does not scan it on a timed step.
    gc.collect()
    gc.freeze()
    start = time.perf_counter()  # the cap counts the timed steps only, not the episode start
    nfe0 = runner.last_chunk.nfe
    ms, fwd, nfe = [], [], 0
    truncated = False
    for i in range(steps):
        before = runner.last_chunk
        s = time.perf_counter()
        runner.control_step(pool[(i + 1) % len(pool)])
        ms.append((time.perf_counter() - s) * 1e3)
        fwd.append(forward())
        if runner.last_chunk is not before:
            nfe += runner.last_chunk.nfe
        if time.perf_counter() - start > max_seconds and i + 1 < steps:
            truncated = True
            break
    return {"ms": ms, "fwd": fwd, "nfe": nfe, "first_ms": first_ms, "first_nfe": nfe0, "truncated": truncated,
            "name": runner.sampler.name, "actions_per_call": runner.sampler.actions_per_call}


# -- models -------------------------------------------------------------------------------------------

def bench_spec():
    """A Lift-like state spec (robosuite Panda proprio + object state); only shapes matter here."""
    from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec

    return RobotSpec("lift", "Panda", 20.0,
                     (ArraySpec("robot0_eef_pos", (3,)), ArraySpec("robot0_eef_quat", (4,)),
                      ArraySpec("robot0_gripper_qpos", (2,)), ArraySpec("object-state", (10,))),
                     ActionSpec(shape=(7,), gripper_dims=(6,), low=(-1,) * 7, high=(1,) * 7))


def bench_image_spec():
    """Lift from two 84x84 cameras + robosuite Panda proprioception (the lift_image_small keys)."""
    from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec

    return RobotSpec("lift", "Panda", 20.0,
                     (ArraySpec("agentview_image", (84, 84, 3), "uint8"), ArraySpec("robot0_eye_in_hand_image", (84, 84, 3), "uint8"),
                      ArraySpec("robot0_eef_pos", (3,)), ArraySpec("robot0_eef_quat", (4,)), ArraySpec("robot0_gripper_qpos", (2,))),
                     ActionSpec(shape=(7,), gripper_dims=(6,), low=(-1,) * 7, high=(1,) * 7))


def build_and_export(name: str, out: Path, seed: int):
    """A model with random weights, exported to `out`; returns the torch model (None for an
    int8 export, which has no torch twin to compare with)."""
    import torch

    from dpstack.policy.config import PolicyConfig
    from dpstack.policy.export import export_model
    from dpstack.policy.model import DiffusionPolicyModel
    from dpstack.core.normalizer import Normalizer

    kind, preset = MODELS[name]
    torch.manual_seed(seed)
    spec = bench_image_spec() if name in IMAGE_MODELS else bench_spec()
    cameras = tuple(o.key for o in spec.observations if o.is_image)
    rng = np.random.default_rng(seed)
    data = {o.key: rng.uniform(-1, 1, (256, *o.shape)) for o in spec.observations if not o.is_image}
    data.update({k: np.zeros((1, 1, 1, 3), np.uint8) for k in cameras})
    data["action"] = np.concatenate([rng.uniform(-1, 1, (256, 6)), rng.choice([-1.0, 1.0], (256, 1))], axis=1)
    images = dict(obs_keys=spec.obs_keys, image_keys=cameras, image_crop=0.905, **IMAGE_MODELS[name][2]) if cameras else {}
    config = PolicyConfig(model=kind, preset=preset, **images)  # DP's horizons: Tp 16, To 2, Ta 8
    model = DiffusionPolicyModel(config, spec, Normalizer.fit(data, image_keys=cameras)).eval()
    weights = "int8" if name.endswith(INT8) else "fp32"
    export_model(model, out, {"dataset": {"fingerprint": "random-weights"}}, force=True, weights=weights)
    return model if weights == "fp32" else None


def markdown_table(records: list[Record], targets: list[dict[str, Any]], context: str) -> str:
    lines = [f"# dpstack bench latency\n\n{context}\n",
             "| model | sampler | backend | nfe/step | p50 ms | p99 ms | max ms | fwd p50 ms | fwd p99 ms | p99 / fwd p99 | steps "
             "| feature cache |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        steps = f"{r.step['n']}{' (capped)' if r.truncated else ''}"
        cache = {True: "on", False: "off"}.get(r.extra.get("feature_cache"), "")
        lines.append(f"| {r.model} | {r.sampler} | {r.backend} | {r.nfe_per_step:.2f} | {r.step['p50_ms']:.2f} | "
                     f"{r.step['p99_ms']:.2f} | {r.step['max_ms']:.2f} | {r.forward['p50_ms']:.2f} | {r.forward['p99_ms']:.2f} | "
                     f"{r.ratio_p99_to_forward_p99:.2f} | {steps} | {cache} |")
    image = [r for r in records if "encoder_forward" in r.extra]
    if image:
        lines += ["", "Image models: fwd = one encoder forward (one frame per camera) + one denoiser forward.", "",
                  "| model | sampler | backend | feature cache | encoder fwd p50 / p99 ms | denoiser fwd p50 / p99 ms |",
                  "|---|---|---|---|---|---|"]
        for r in image:
            e, d = r.extra["encoder_forward"], r.extra["denoiser_forward"]
            lines.append(f"| {r.model} | {r.sampler} | {r.backend} | {'on' if r.extra['feature_cache'] else 'off'} | "
                         f"{e['p50_ms']:.2f} / {e['p99_ms']:.2f} | {d['p50_ms']:.2f} / {d['p99_ms']:.2f} |")
    if targets:
        lines += ["", "| target | model | measured | limit | met |", "|---|---|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['target']} | {t['model']} | {t['value']:.2f} | {t['limit']} | {'yes' if t['met'] else 'NO'} |")
    notes = sorted({r.note for r in records if r.note})
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def check_targets(records: list[Record]) -> list[dict[str, Any]]:
    out = []
    by = {(r.model, r.sampler, r.backend): r for r in records}
    for r in records:
        if r.backend != "onnx" or r.extra.get("feature_cache") is False:  # uncached: the comparison, not the product
            continue
        if r.sampler.startswith("streaming") and r.nfe_per_step == 1:
            out.append({"target": "streaming 1 nfe/step: step p99 / forward p99", "model": r.model,
                        "value": r.ratio_p99_to_forward_p99, "limit": f"<= {STREAM_TARGET}", "met": r.ratio_p99_to_forward_p99 <= STREAM_TARGET})
            if r.model in ("dp", "dp" + INT8):
                out.append({"target": f"dp U-Net streaming p99 ms ({r.threads} threads)", "model": r.model,
                            "value": r.step["p99_ms"], "limit": f"< {DP_STREAM_P99_MS}", "met": r.step["p99_ms"] < DP_STREAM_P99_MS})
        if r.sampler.startswith("rti") and round(r.nfe_per_step) == 3:
            out.append({"target": "RTI 3 refinements: step p99 / forward p99", "model": r.model,
                        "value": r.ratio_p99_to_forward_p99, "limit": f"<= {RTI_TARGET}", "met": r.ratio_p99_to_forward_p99 <= RTI_TARGET})
    seen = set()
    for r in records:
        t = by.get((r.model, r.sampler, "torch"))
        if r.backend == "onnx" and t is not None and MODELS.get(r.model, ("",))[0] == "unet" and r.model not in seen:
            seen.add(r.model)
            speedup = t.forward["p50_ms"] / r.forward["p50_ms"]
            out.append({"target": "onnxruntime speed-up over torch eager (forward p50)", "model": r.model,
                        "value": speedup, "limit": f">= {ORT_SPEEDUP_TARGET}", "met": speedup >= ORT_SPEEDUP_TARGET})
    return out


def run_latency(args: argparse.Namespace) -> int:
    import os
    import tempfile

    from dpstack.runtime.package import SessionOptions, load_package
    from dpstack.runtime.samplers import split_sampler_names

    samplers = split_sampler_names(args.samplers)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ("onnx", "torch", *GPU_BACKENDS):
            print(f"dpstack bench: unknown backend {b!r}; use onnx, torch, {', '.join(GPU_BACKENDS)}", file=sys.stderr)
            return 2
    for b in [b for b in backends if b in GPU_BACKENDS]:
        why = gpu_backend_missing(b)
        if why:
            print(f"dpstack bench: backend {b} skipped: {why}", file=sys.stderr)
            backends.remove(b)
    if not backends:
        print("dpstack bench: no backend left to time", file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",") if m.strip()] if not args.package else []
    for m in models:
        if m not in MODELS:
            print(f"dpstack bench: unknown model {m!r}; have {sorted(MODELS)}", file=sys.stderr)
            return 2
    from tqdm import tqdm

    records: list[Record] = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    options = SessionOptions(intra_op_threads=args.threads, providers=("CPUExecutionProvider",), spin=not args.no_spin)
    with tempfile.TemporaryDirectory(prefix="dpstack-bench-") as tmp:
        jobs: list[tuple[str, Any, Any]] = []  # (name, package dir, torch model or None)
        for m in models:
            print(f"building and exporting {m} (random weights) ...", file=sys.stderr, flush=True)
            model = build_and_export(m, Path(tmp) / m, args.seed)
            jobs.append((m, Path(tmp) / m, model))
        jobs += [(Path(p).name, Path(p), None) for p in args.package]
        total = sum(len(samplers) * len([b for b in backends if b != "torch" or model is not None]) for _, _, model in jobs)
        total += sum(len(samplers) * len(backends) for m in models if m in IMAGE_MODELS)  # timed without the cache too
        bar = tqdm(total=total, desc="bench latency", unit="record")
        for name, pdir, model in jobs:
            package = load_package(pdir, options=options)
            cond_dim = int(package.manifest["cond_dim"])
            for backend in backends:
                if backend == "torch":
                    if model is None:
                        continue
                    import torch

                    from dpstack.policy.torch_callables import torch_callables

                    torch.set_num_threads(args.threads)
                    ref = torch_callables(model)
                    pkg = package.with_backend(ref.encode, ref.denoise,
                                               encode_step=ref.encode_step if package.encode_step else None)
                elif backend in GPU_BACKENDS:
                    gpu = SessionOptions(intra_op_threads=args.threads, providers=(GPU_BACKENDS[backend],),
                                         spin=not args.no_spin)
                    pkg = load_package(pdir, options=gpu)
                    if pkg.providers[:1] != (GPU_BACKENDS[backend],):  # offered, but did not start
                        print(f"dpstack bench: backend {backend} skipped for {name}: it runs on "
                              f"{', '.join(pkg.providers)} here", file=sys.stderr)
                        bar.update(len(samplers))
                        continue
                else:
                    pkg = package
                rng = np.random.default_rng(args.seed)
                denoise_once = forward_timer(pkg.denoise, pkg.horizon, pkg.action_dim, cond_dim, rng)
                images = pkg.encode_step is not None
                forward = ImageForward(pkg, denoise_once, rng) if images else denoise_once
                for _ in range(args.forward_reps):  # warm-up (allocations, thread pools)
                    forward()
                for sampler, cache in [(s, c) for s in samplers for c in ((True, False) if images else (None,))]:
                    if images:
                        forward.encoder_ms.clear()
                        forward.denoiser_ms.clear()
                    res = time_sampler(pkg, sampler, args.steps, args.max_seconds, args.seed, forward, cache is not False)
                    step, fwd = summarize_ms(res["ms"]), summarize_ms(res["fwd"])
                    parts = {"feature_cache": cache}
                    if images:
                        parts.update(encoder_forward=summarize_ms(forward.encoder_ms),
                                     denoiser_forward=summarize_ms(forward.denoiser_ms))
                    note = ""
                    if res["truncated"]:
                        note = f"records marked (capped) stopped at --max-seconds {args.max_seconds:g} before {args.steps} steps"
                    if res["actions_per_call"] > 1:
                        note = note or f"chunked samplers run the full denoise once every Ta={res['actions_per_call']} steps; p99/max are that call"
                    records.append(Record(
                        model=name, sampler=res["name"], backend=backend, nfe_per_step=res["nfe"] / len(res["ms"]),
                        step=step, episode_start_ms=res["first_ms"], forward=fwd,
                        ratio_p99_to_forward_p99=step["p99_ms"] / fwd["p99_ms"],
                        ratio_p50_to_forward_p50=step["p50_ms"] / fwd["p50_ms"], threads=args.threads,
                        truncated=res["truncated"], note=note,
                        extra={"episode_start_nfe": res["first_nfe"], "actions_per_call": res["actions_per_call"],
                               "cond_dim": cond_dim, "horizon": pkg.horizon, **parts}))
                    bar.update(1)
                    # keep what is measured so far if the run is interrupted
                    partial = {"context": "partial run", "records": [asdict(r) for r in records]}
                    Path(args.out).with_suffix(".partial.json").write_text(json.dumps(partial, indent=2))
        bar.close()
    targets = check_targets(records)
    context = (f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load average "
               f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end, {args.threads} threads"
               f"{' (onnxruntime spinning off)' if args.no_spin else ''}, batch 1; "
               f"latency = PolicyRunner.control_step (normalise + encoder + sampler + unnormalise); the reference forward "
               f"(batch 1) is timed right after every control step, in the same time window; "
               f"the episode-start call (full denoise for rti/streaming) is excluded and recorded as episode_start_ms.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"context": context, "records": [asdict(r) for r in records], "targets": targets}, indent=2))
    table = markdown_table(records, targets, context)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0
