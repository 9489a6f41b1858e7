"""The torch model as the numpy callables the runtime samplers take.

    denoise(x (B, Tp, A) float32, t (B, Tp) int64, cond (B, C) float32) -> eps (B, Tp, A) float32
    encode({key: (B, To, *shape)}) -> cond (B, C) float32: low-dim keys normalised; camera frames
        either uint8 as the robot sends them (as a package's encoder takes them) or already
        normalised floats in [-1, 1] (as the training set holds them)
    encode_step({key: (N, *shape)}) -> (N, step_dim): one step per row, the same inputs

Training-time evaluation samples through runtime/samplers.py with these, so there is
exactly one sampler implementation (numpy), shared with the ONNX runtime.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from .model import DiffusionPolicyModel


class TorchCallables:
    def __init__(self, model: DiffusionPolicyModel, device: str | torch.device | None = None) -> None:
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device

    @torch.no_grad()
    def denoise(self, x: np.ndarray, t: np.ndarray, cond: np.ndarray) -> np.ndarray:
        eps = self.model.denoiser(torch.as_tensor(np.asarray(x, np.float32), device=self.device),
                                  torch.as_tensor(np.asarray(t, np.int64), device=self.device),
                                  torch.as_tensor(np.asarray(cond, np.float32), device=self.device))
        return eps.float().cpu().numpy()

    def _tensors(self, obs: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {}
        for k in self.model.spec.obs_keys:
            x = np.asarray(obs[k])
            if x.dtype == np.uint8:  # camera frames as sent: the exported graph scales them the same way
                x = self.model.normalizer.normalize(k, x)
            out[k] = torch.as_tensor(np.asarray(x, np.float32), device=self.device)
        return out

    @torch.no_grad()
    def encode(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.model.encoder(self._tensors(obs)).float().cpu().numpy()

    @torch.no_grad()
    def encode_step(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.model.encoder.step_features(self._tensors(obs)).float().cpu().numpy()

    def encode_raw(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Raw (unnormalised) observations (B, To, *shape) -> cond, using the model's normaliser."""
        return self.encode({k: self.model.normalizer.normalize(k, obs[k]) for k in self.model.spec.obs_keys})


def torch_callables(model: DiffusionPolicyModel, device: str | torch.device | None = None) -> TorchCallables:
    """Wrap `model` (put it in eval mode first) for the runtime samplers."""
    return TorchCallables(model, device)
