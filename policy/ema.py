"""Exponential moving average of the weights (Diffusion Policy's EMAModel schedule):
decay(step) = clamp(1 - (1 + step)^-power, 0, max_decay), so early steps track the
weights closely and late steps average over ~1/(1-max_decay) updates."""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, power: float = 0.75, max_decay: float = 0.9999) -> None:
        self.power, self.max_decay = power, max_decay
        self.step = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def decay(self) -> float:
        step = max(0, self.step - 1)
        if step == 0:
            return 0.0
        return min(1.0 - (1.0 + step) ** -self.power, self.max_decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.step += 1
        d = self.decay()
        floats_ema, floats_new = [], []
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                floats_ema.append(self.state[k])
                floats_new.append(v.detach())
            else:
                self.state[k].copy_(v)
        torch._foreach_lerp_(floats_ema, floats_new, 1.0 - d)

    def state_dict(self) -> dict:
        return {"step": self.step, "power": self.power, "max_decay": self.max_decay}

    def load_state_dict(self, meta: dict, weights: dict[str, torch.Tensor]) -> None:
        self.step, self.power, self.max_decay = int(meta["step"]), float(meta["power"]), float(meta["max_decay"])
        for k, v in weights.items():
            self.state[k].copy_(v)
