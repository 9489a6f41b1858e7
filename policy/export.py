"""Export a trained DiffusionPolicyModel to a policy package the torch-free runtime loads.

    POLICY_DIR/encoder.onnx    state policy: normalised observation window, one input per key (B, To, *shape) -> cond (B, C);
                               image policy: one step, one input per key (B, *shape) -> features (B, step_dim), camera
                               frames uint8 HWC at the camera's size (scaling to [-1, 1], centre crop and HWC -> CHW
                               inside the graph), low-dim keys normalised (runtime/package.py, "encoder_form")
    POLICY_DIR/denoiser.onnx   (x (B, Tp, A), t (B, Tp) int64, cond (B, C)) -> eps (B, Tp, A); dynamic batch
    POLICY_DIR/manifest.json   spec, normaliser, schedule, horizons, training regimes, provenance, sha256s

The package is built in a temporary directory next to the target and renamed into
place only after onnxruntime reproduces torch on random inputs, and camera-like uint8
frames for the cameras (max abs error below `tolerance`); a failing export leaves nothing behind.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from dpstack.runtime.package import (DENOISER_FILE, DENOISER_INPUTS, ENCODER_FILE, FORMAT, FORMAT_VERSION, MANIFEST, STEP_FORM,
                                     WINDOW_FORM, PackageError, PolicyPackage, SessionOptions, load_package, read_manifest,
                                     sha256_file, verify_files)
from dpstack.runtime.samplers import DEFAULT_RTI, rti_list
from dpstack.runtime.verify import VerifyError, random_denoiser_inputs, random_observations, verify_onnx_only

from .model import DiffusionPolicyModel
from .nets.export_form import export_form
from .quantize import QUANT_TOLERANCE, WEIGHTS, QuantConfig, quantize_matmuls
from .regimes import n_rungs
from .torch_callables import torch_callables

PARITY_TOLERANCE = 1e-4


class ExportError(VerifyError):
    """The export (or a verification) failed; nothing was written or the package is unfit."""


class _EncoderGraph(nn.Module):
    """Positional inputs (one per observation key, fixed order) for a clean ONNX signature."""

    def __init__(self, encoder: nn.Module, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.encoder = encoder
        self.keys = keys

    def forward(self, *obs: torch.Tensor) -> torch.Tensor:
        return self.encoder(dict(zip(self.keys, obs)))


class _StepEncoderGraph(nn.Module):
    """One observation step per row, camera frames as the robot sends them: uint8 (B, H, W, C)
    scaled to [-1, 1] here (the normaliser's image statistics, as constants in the graph);
    the encoder in eval mode centre-crops and goes to CHW itself."""

    def __init__(self, model: DiffusionPolicyModel, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.keys = keys
        self.images = {k: (float(model.normalizer[k].scale.reshape(-1)[0]), float(model.normalizer[k].offset.reshape(-1)[0]))
                       for k in keys if model.spec.obs(k).is_image}

    def forward(self, *obs: torch.Tensor) -> torch.Tensor:
        steps = {}
        for k, x in zip(self.keys, obs):
            if k in self.images:
                scale, offset = self.images[k]
                x = x.to(torch.float32) * scale + offset
            steps[k] = x
        return self.encoder.step_features(steps)


def encoder_form_of(model: DiffusionPolicyModel) -> str:
    """Image policies export a step encoder (uint8 frames in, a runner caches earlier steps);
    state policies the window encoder they always had."""
    return STEP_FORM if any(model.spec.obs(k).is_image for k in model.spec.obs_keys) else WINDOW_FORM


class _DenoiserGraph(nn.Module):
    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, t, cond)


def onnx_input_name(key: str) -> str:
    return "obs_" + "".join(c if c.isalnum() else "_" for c in key)


# -- ONNX --------------------------------------------------------------------------------------------

def export_graphs(model: DiffusionPolicyModel, out_dir: Path, opset: int | None = None) -> dict[str, list[str]]:
    """Write encoder.onnx and denoiser.onnx; returns the encoder's input names in obs-key order."""
    model = model.eval().cpu()
    keys = tuple(model.spec.obs_keys)
    batch = torch.export.Dim("batch", min=1, max=4096)
    rng = np.random.default_rng(0)
    obs = random_observations(model, 2, rng)  # batch 2: a batch of 1 would be specialised away
    if encoder_form_of(model) == STEP_FORM:
        encoder_graph: nn.Module = _StepEncoderGraph(model, keys)
        enc_args = tuple(torch.from_numpy(np.ascontiguousarray(obs[k][:, -1])) for k in keys)
    else:
        encoder_graph = _EncoderGraph(model.encoder, keys)
        enc_args = tuple(torch.from_numpy(obs[k]) for k in keys)
    enc_names = [onnx_input_name(k) for k in keys]
    kwargs: dict[str, Any] = {"dynamo": True, "external_data": False, "verbose": False}
    if opset is not None:
        kwargs["opset_version"] = opset
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" registration chatter
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")  # dynamic-axis renaming notes
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch-internal pytree deprecations
        torch.onnx.export(encoder_graph.eval(), enc_args, str(out_dir / ENCODER_FILE),
                          input_names=enc_names, output_names=["features" if encoder_form_of(model) == STEP_FORM else "cond"],
                          dynamic_shapes=(tuple({0: batch} for _ in keys),), **kwargs)
        x, t, cond = random_denoiser_inputs(model.horizon, model.action_dim, model.cond_dim,
                                            model.schedule.num_train_steps, 2, rng)
        # The same function in ops onnxruntime runs fast at batch 1 (nets/export_form.py).
        torch.onnx.export(_DenoiserGraph(export_form(model.denoiser)).eval(), (torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(cond)),
                          str(out_dir / DENOISER_FILE), input_names=list(DENOISER_INPUTS), output_names=["eps"],
                          dynamic_shapes=({0: batch}, {0: batch}, {0: batch}), **kwargs)
    return {"encoder_inputs": enc_names}


# -- manifest ----------------------------------------------------------------------------------------

def build_manifest(model: DiffusionPolicyModel, info: Mapping[str, Any], out_dir: Path,
                   encoder_inputs: list[str], parity: Mapping[str, float], tolerance: float = PARITY_TOLERANCE,
                   weights: str = "fp32", rti_default: str = DEFAULT_RTI) -> dict[str, Any]:
    cfg = model.config
    spec = model.spec
    dataset = dict(info.get("dataset") or {})
    ckpt = info.get("path")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": spec.task, "robot": spec.robot, "control_hz": spec.control_hz,
        "spec": spec.to_dict(),
        "obs_keys": list(spec.obs_keys),
        "encoder_inputs": encoder_inputs,
        "encoder_form": encoder_form_of(model),
        **({"step_dim": int(model.encoder.step_dim)} if encoder_form_of(model) == STEP_FORM else {}),
        "cond_dim": int(model.cond_dim),
        "normalizer": model.normalizer.to_dict(),
        "normalization": "low-dimensional keys: per-key min/max to [-1, 1] in numpy (dpstack.core.normalizer) before "
                         "the encoder; camera frames: uint8 into the encoder, which scales them to [-1, 1] itself; "
                         "actions unnormalised with the 'action' statistics",
        "schedule": model.schedule.to_dict(),
        "horizon": model.horizon, "n_obs_steps": model.n_obs_steps, "n_action_steps": model.n_action_steps,
        "action_dim": model.action_dim,
        "regimes": {
            "plain": cfg.regime_plain, "ladder": cfg.regime_ladder,
            "ladder_rungs": n_rungs(cfg) if cfg.regime_ladder > 0 else 0,
            "ladder_chunk_len": 0,  # the ladder's default (runtime.ladder.ladder_chunk_len)
            "prefix_prob": cfg.prefix_prob, "prefix_max": cfg.prefix_max,
            "gripper_scale": cfg.gripper_scale,
        },
        # RTI-DP picks the refinement list per task, by evaluation after training.
        "sampler_defaults": {"rti": rti_default},  # checked by export_model
        "model": {"type": cfg.model, "preset": cfg.preset, "parameters": model.num_parameters(),
                  "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()}},
        "dataset": {"fingerprint": dataset.get("fingerprint"), **{k: v for k, v in dataset.items() if k != "fingerprint"}},
        "checkpoint": {"path": str(Path(ckpt).resolve()) if ckpt else None,
                       "sha256": sha256_file(ckpt) if ckpt and Path(ckpt).is_file() else None,
                       "step": info.get("step")},
        "export": {"torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "parity_max_abs_error": dict(parity), "parity_tolerance": tolerance,
                   "weights": weights, **({"quantization": QuantConfig().to_dict()} if weights != "fp32" else {})},
        "files": {name: {"sha256": sha256_file(out_dir / name)} for name in (ENCODER_FILE, DENOISER_FILE)},
    }


# -- parity --------------------------------------------------------------------------------------------

@dataclass
class Parity:
    encoder: float
    denoiser: float

    def as_dict(self) -> dict[str, float]:
        return {"encoder": self.encoder, "denoiser": self.denoiser}


def check_parity(model: DiffusionPolicyModel, package: PolicyPackage, seed: int = 0, batches: tuple[int, ...] = (1, 5)) -> Parity:
    """Max abs difference between torch eager and the package's networks on random inputs
    (camera-like uint8 frames for the cameras, runtime.verify.camera_frames)."""
    ref = torch_callables(model.eval().cpu())
    rng = np.random.default_rng(seed)
    enc_err = den_err = 0.0
    for b in batches:
        obs = random_observations(model, b, rng)
        enc_err = max(enc_err, float(np.max(np.abs(ref.encode(obs) - package.encode(obs)))))
        x, t, cond = random_denoiser_inputs(model.horizon, model.action_dim, model.cond_dim, model.schedule.num_train_steps, b, rng)
        den_err = max(den_err, float(np.max(np.abs(ref.denoise(x, t, cond) - package.denoise(x, t, cond)))))
    return Parity(enc_err, den_err)


# -- the two commands ------------------------------------------------------------------------------

def _replace_dir(tmp: Path, out: Path, force: bool) -> None:
    if out.exists():
        if not force:
            raise ExportError(f"{out} exists; pass --force to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def default_tolerance(weights: str) -> float:
    return PARITY_TOLERANCE if weights == "fp32" else QUANT_TOLERANCE


def export_model(model: DiffusionPolicyModel, out: str | Path, info: Mapping[str, Any] | None = None,
                 tolerance: float | None = None, force: bool = False, opset: int | None = None,
                 weights: str = "fp32", rti_default: str = DEFAULT_RTI) -> Path:
    """Export `model` to the package directory `out` (atomic; parity-checked).

    weights="int8" quantizes the denoiser's MatMul weights (policy/quantize.py) and checks
    parity against QUANT_TOLERANCE unless `tolerance` is given. `rti_default` is the RTI
    refinement list that bare `rti` runs with this package.
    """
    if weights not in WEIGHTS:
        raise ExportError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    tolerance = default_tolerance(weights) if tolerance is None else tolerance
    try:
        rti_default = rti_list(rti_default, model.schedule.num_train_steps)
    except ValueError as e:
        raise ExportError(f"--rti-default: {e}") from None
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        names = export_graphs(model, tmp, opset)
        if weights == "int8" and quantize_matmuls(tmp / DENOISER_FILE) == 0:
            raise ExportError("--weights int8: the denoiser has no MatMul with constant weights to quantize "
                              "(only the dp-size U-Net and the transformer export their layers as MatMul)")
        # A provisional manifest so the package can be loaded through the runtime's own loader for the check.
        (tmp / MANIFEST).write_text(json.dumps(build_manifest(model, info or {}, tmp, names["encoder_inputs"], {}), indent=2))
        package = load_package(tmp, options=SessionOptions(providers=("CPUExecutionProvider",)))
        parity = check_parity(model, package)
        if max(parity.encoder, parity.denoiser) >= tolerance:
            raise ExportError(f"onnxruntime differs from torch: max abs error encoder {parity.encoder:.2e}, "
                              f"denoiser {parity.denoiser:.2e} (tolerance {tolerance:.0e}); package not written")
        manifest = build_manifest(model, info or {}, tmp, names["encoder_inputs"], parity.as_dict(), tolerance, weights,
                                  rti_default)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _replace_dir(tmp, out, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, tolerance: float | None = None,
                      force: bool = False, weights: str = "fp32", rti_default: str = DEFAULT_RTI) -> Path:
    from .checkpoint import load_checkpoint

    model, info = load_checkpoint(checkpoint)
    return export_model(model, out, info, tolerance, force, weights=weights, rti_default=rti_default)


def verify_package(policy_dir: str | Path, checkpoint: str | Path | None = None,
                   tolerance: float | None = None) -> dict[str, Any]:
    """Re-check a package: hashes, then parity against the checkpoint if it can be found
    (given, or the manifest's path with a matching sha256), else onnx-only self-consistency.
    Without `tolerance`, the one the package was exported under (an int8 package's is looser)."""
    manifest = read_manifest(policy_dir)
    verify_files(policy_dir, manifest)
    if tolerance is None:
        tolerance = default_tolerance((manifest.get("export") or {}).get("weights", "fp32"))
    ckpt = Path(checkpoint) if checkpoint else None
    recorded = manifest.get("checkpoint") or {}
    note = ""
    if ckpt is None and recorded.get("path") and Path(recorded["path"]).is_file():
        if sha256_file(recorded["path"]) == recorded.get("sha256"):
            ckpt = Path(recorded["path"])
        else:
            note = f"checkpoint {recorded['path']} changed since export; checked onnx self-consistency only"
    if ckpt is None:
        return verify_onnx_only(policy_dir, tolerance, note or "no checkpoint available; checked onnx self-consistency only")
    from .checkpoint import load_checkpoint

    package = load_package(policy_dir, options=SessionOptions(providers=("CPUExecutionProvider",)))
    model, _ = load_checkpoint(ckpt)
    parity = check_parity(model, package)
    if max(parity.encoder, parity.denoiser) >= tolerance:
        raise ExportError(f"{policy_dir}: onnxruntime differs from {ckpt}: {parity.as_dict()} (tolerance {tolerance:.0e})")
    return {"hashes": "ok", "parity": parity.as_dict(), "checkpoint": str(ckpt)}


__all__ = ["ExportError", "PackageError", "export_model", "export_checkpoint", "verify_package", "check_parity"]
