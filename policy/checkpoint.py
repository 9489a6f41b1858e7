"""Checkpoints: plain data + tensors in one torch.save file, read with weights_only=True.

Format (a dict; FORMAT/VERSION identify it):
    format, version          "dpstack-policy", 1
    config                   {"policy": {...}, "train": {...}}  (Config.to_dict())
    spec                     RobotSpec.to_dict() (only the observations the policy uses)
    normalizer               Normalizer.to_dict() (gripper scale folded into the action stats)
    schedule                 NoiseSchedule.to_dict()
    gripper_scale            float (1.0 = off); informational, already in the normaliser
    dataset                  {"fingerprint": sha256 hex, "source": path, "n_episodes", "n_steps"}
    step                     optimiser steps taken
    model, ema               state_dicts (ema: the weights to deploy)
    integrity                sha256 over config/spec/normaliser JSON and every model/ema tensor
    train_state              {"optimizer", "scheduler", "ema": {"step"}, "rng": {...}} for --resume
    metrics                  {"loss": last logged loss, ...}
    tracking                 {"tracker": "wandb" | "tensorboard", "run_id"} when a tracker ran (else {}),
                             so --resume continues the same run (policy/tracking.py)

Written to a temporary file in the same directory, fsynced, then os.replace'd, so a
crash mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from dpstack.core.files import write_atomic
from dpstack.core.normalizer import Normalizer
from dpstack.core.schedule import NoiseSchedule
from dpstack.core.spec import RobotSpec

from .config import Config
from .model import DiffusionPolicyModel

FORMAT = "dpstack-policy"
VERSION = 1
WRITTEN_BY = "use a checkpoint written by `dpstack train`"
REQUIRED = ("format", "version", "config", "spec", "normalizer", "schedule", "model", "ema", "step", "integrity")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or not ours; the message says which."""


def _integrity(payload: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([payload["config"], payload["spec"], payload["normalizer"], payload["schedule"]],
                        sort_keys=True).encode())
    for part in ("model", "ema"):
        for name, tensor in sorted(payload[part].items()):
            h.update(f"{part}.{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                     if tensor.numel() else b"")
    return h.hexdigest()


def build_payload(model: DiffusionPolicyModel, ema_state: Mapping[str, torch.Tensor], config: Config, step: int,
                  dataset: Mapping[str, Any], train_state: Mapping[str, Any] | None = None,
                  metrics: Mapping[str, Any] | None = None,
                  tracking: Mapping[str, Any] | None = None) -> dict[str, Any]:
    cpu = lambda sd: {k: v.detach().cpu().clone() for k, v in sd.items()}  # noqa: E731
    payload = {
        "format": FORMAT, "version": VERSION,
        "config": config.to_dict(), "spec": model.spec.to_dict(), "normalizer": model.normalizer.to_dict(),
        "schedule": model.schedule.to_dict(), "gripper_scale": float(model.config.gripper_scale),
        "dataset": dict(dataset), "step": int(step),
        "model": cpu(model.state_dict()), "ema": cpu(ema_state),
        "train_state": dict(train_state or {}), "metrics": dict(metrics or {}),
        "tracking": dict(tracking or {}),
    }
    payload["integrity"] = _integrity(payload)
    return payload


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Atomic write: tmp file in the same directory, fsync, os.replace."""
    return write_atomic(path, lambda f: torch.save(dict(payload), f))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw payload, verified; CheckpointError with the reason otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint file")
    try:
        with warnings.catch_warnings():  # torch's notes on foreign pickles; the error below says what matters
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # torch raises many types for a foreign or damaged file, some with advice to load it
        # with weights_only=False (running its code): never the fix here.
        raise CheckpointError(f"{path}: not a dpstack checkpoint, or a damaged one (torch cannot read it); "
                              f"{WRITTEN_BY}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a dpstack checkpoint (it has no format {FORMAT!r}); {WRITTEN_BY}")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} unsupported (this is {VERSION})")
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    if _integrity(payload) != payload["integrity"]:
        raise CheckpointError(f"{path}: integrity check failed (weights or metadata corrupted)")
    return payload


def model_from_payload(payload: Mapping[str, Any], use_ema: bool = True) -> DiffusionPolicyModel:
    config = Config.from_dict(payload["config"])
    model = DiffusionPolicyModel(config.policy, RobotSpec.from_dict(payload["spec"]),
                                 Normalizer.from_dict(payload["normalizer"]), NoiseSchedule.from_dict(payload["schedule"]))
    model.load_state_dict(payload["ema" if use_ema else "model"])
    return model.eval()


def load_checkpoint(path: str | os.PathLike, use_ema: bool = True,
                    device: str | torch.device = "cpu") -> tuple[DiffusionPolicyModel, dict[str, Any]]:
    """-> (model in eval mode with EMA weights by default, info).

    info: config (Config), step, dataset, metrics, gripper_scale, path.
    """
    payload = read_checkpoint(path)
    model = model_from_payload(payload, use_ema).to(device)
    info = {"config": Config.from_dict(payload["config"]), "step": payload["step"], "dataset": payload.get("dataset", {}),
            "metrics": payload.get("metrics", {}), "gripper_scale": payload.get("gripper_scale", 1.0), "path": str(path)}
    return model, info
