"""PolicyRunner: observations in robot units -> action chunks in robot units, torch-free.

It keeps the last To observations (the first one repeated at episode start, as
Diffusion Policy's padding), normalises the low-dimensional keys in numpy (camera
frames go to the encoder as uint8; the exported graph scales and crops them), runs
the encoder for the condition vector, asks the sampler for actions and unnormalises
them. With a step encoder (image packages) the features of each observation are kept
with it, so an inference encodes only the observations not yet encoded: the newest
frame per camera when it infers every control step.

Two ways to drive it:
- act(obs) -> ActionChunk: infer now; the caller executes the chunk's actions
  at their offsets. Call observe(obs) for control steps in between so the history
  stays at control rate.
- control_step(obs) -> action: one call per control step; the runner infers
  only when the previous chunk is used up, or its replan_after actions are
  (no network calls in between).
- act_gen(obs): act as a resumable computation that yields each denoiser request
  (samplers.DenoiseRequest); a server answers many robots' requests in one batched
  call of `denoise` (at most `max_batch` rows; 0: any). act() drives it alone.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from dpstack.runtime.package import PolicyPackage
from dpstack.runtime.samplers import DenoiseSteps, Sampler, SamplerConfig, build_sampler, drive


class _Step:
    """One control step's observation (low-dim normalised, frames raw) and, once encoded, its features."""

    __slots__ = ("obs", "features")

    def __init__(self, obs: dict[str, np.ndarray]) -> None:
        self.obs = obs
        self.features: np.ndarray | None = None


@dataclass
class ActionChunk:
    actions: np.ndarray      # (n, A) in robot units, to execute in order
    offsets: np.ndarray      # (n,) control steps after the observation (0 = the observation's step)
    dt: float                # seconds per control step
    sampler: str
    nfe: int                 # denoiser evaluations spent
    compute_ms: float        # encoder + sampler + (un)normalisation
    step: int                # control step of the observation within the episode
    replan_after: int | None = None  # infer again after this many actions; the rest is look-ahead (None: all)

    @property
    def times(self) -> np.ndarray:
        """Offsets in seconds."""
        return self.offsets * self.dt


class PolicyRunner:
    def __init__(self, package: PolicyPackage, sampler: SamplerConfig | str = "ddim-10",
                 feature_cache: bool = True) -> None:
        """`feature_cache=False` encodes the whole window at every inference (for comparisons)."""
        self.package = package
        self.feature_cache = feature_cache and package.encode_step is not None
        self.config = SamplerConfig.parse(sampler) if isinstance(sampler, str) else sampler
        self.sampler: Sampler = build_sampler(self.config, package.denoise, package.schedule, package.action_dim, package.trained)
        self.denoise = package.denoise     # what answers act_gen's requests; shared by every runner of the package
        self.max_batch = package.max_batch
        self.history: deque[_Step] = deque(maxlen=package.n_obs_steps)
        self._images = frozenset(k for k in package.obs_keys if package.spec.obs(k).is_image)
        self.t = 0                       # control steps seen this episode
        self._t_inferred: int | None = None  # self.t at the last inference
        self.pending: deque[np.ndarray] = deque()
        self.last_chunk: ActionChunk | None = None
        a = package.spec.action
        self._low = np.asarray(a.low, np.float32) if a.low else None
        self._high = np.asarray(a.high, np.float32) if a.high else None

    def reset(self, seed: int | None = None) -> None:
        """Start an episode: clear history, queued actions and the sampler's warm start/buffer."""
        self.history.clear()
        self.pending.clear()
        self.t = 0
        self._t_inferred = None
        self.last_chunk = None
        self.sampler.reset(seed)

    # -- observations -------------------------------------------------------------------
    def check_observation(self, obs: Mapping[str, np.ndarray]) -> None:
        for key in self.package.obs_keys:
            if key not in obs:
                raise ValueError(f"observation is missing {key!r}; the policy needs {list(self.package.obs_keys)}")
            spec = self.package.spec.obs(key)
            value = np.asarray(obs[key])
            want = np.dtype(spec.dtype)
            if want.kind == "u" and value.dtype != want:
                raise ValueError(f"{key}: expected dtype {want}, got {value.dtype}")
            if want.kind == "f" and value.dtype.kind not in "fiu":
                raise ValueError(f"{key}: expected a numeric array ({want}), got dtype {value.dtype}")
            spec.check(value)  # shape, NaN/Inf

    def observe(self, obs: Mapping[str, np.ndarray]) -> None:
        """Add one control step's observation to the history (checked, low-dim keys normalised)."""
        self.check_observation(obs)
        step = _Step({k: np.array(obs[k]) if k in self._images else self.package.normalizer.normalize(k, np.asarray(obs[k]))
                      for k in self.package.obs_keys})
        if not self.history:
            for _ in range(self.package.n_obs_steps - 1):
                self.history.append(step)  # episode start: repeat the first observation (and share its features)
        self.history.append(step)
        self.t += 1

    # -- inference ---------------------------------------------------------------------
    def infer(self) -> ActionChunk:
        """Actions from the current history (the latest observation is step t-1)."""
        return drive(self.infer_gen(), self.denoise)

    def infer_gen(self) -> DenoiseSteps[ActionChunk]:
        if not self.history:
            raise RuntimeError("no observation yet: call act(obs) or observe(obs) first")
        start = time.perf_counter()
        cond = self.condition()
        # A robot that was late to ask has executed more than one action since: RTI shifts by that.
        elapsed = None if self._t_inferred is None else self.t - self._t_inferred
        self._t_inferred = self.t
        out = yield from self.sampler.step_gen(cond, elapsed)
        actions = self.to_robot_units(out.actions)
        offsets = out.indices - (self.package.n_obs_steps - 1)
        chunk = ActionChunk(actions=actions, offsets=offsets, dt=1.0 / self.package.spec.control_hz,
                            sampler=self.sampler.name, nfe=out.nfe,
                            compute_ms=(time.perf_counter() - start) * 1e3, step=self.t - 1,
                            replan_after=out.replan_after)
        self.last_chunk = chunk
        return chunk

    def condition(self) -> np.ndarray:
        """cond (1, C) of the current history. With the feature cache, only steps not yet
        encoded go through the encoder (one call), and cond is their time-major concatenation."""
        keys = self.package.obs_keys
        if not self.feature_cache:
            window = {k: np.stack([h.obs[k] for h in self.history])[None] for k in keys}
            return np.asarray(self.package.encode(window), dtype=np.float32)
        new = list({id(h): h for h in self.history if h.features is None}.values())  # padding repeats one step
        if new:
            feats = np.asarray(self.package.encode_step({k: np.stack([h.obs[k] for h in new]) for k in keys}), np.float32)
            for h, f in zip(new, feats):
                h.features = f
        return np.concatenate([h.features for h in self.history])[None]

    def act(self, obs: Mapping[str, np.ndarray]) -> ActionChunk:
        self.observe(obs)
        return self.infer()

    def act_gen(self, obs: Mapping[str, np.ndarray]) -> DenoiseSteps[ActionChunk]:
        self.observe(obs)
        return (yield from self.infer_gen())

    def control_step(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        """One control step: record obs, infer only if no action is queued, return this step's action."""
        self.observe(obs)
        if not self.pending:
            chunk = self.infer()
            self.pending.extend(chunk.actions[:chunk.replan_after])
        return self.pending.popleft()

    def to_robot_units(self, normalised: np.ndarray) -> np.ndarray:
        # a gripper scale used in training is folded into the action statistics, so no special case here
        a = np.clip(np.asarray(normalised, dtype=np.float32), -1.0, 1.0)
        a = self.package.normalizer.unnormalize(self.package.spec.action.key, a)
        if self._low is not None:
            a = np.clip(a, self._low, self._high)
        return a


def measure_startup_s(runner: PolicyRunner) -> float:
    """Seconds a new episode's first chunk takes with this runner's sampler (streaming and
    RTI: their full start-up denoise), on blank observations after one warm-up run (the
    first onnxruntime runs allocate). Leaves the runner reset."""
    spec = runner.package.spec
    blank = {k: np.zeros(spec.obs(k).shape, np.dtype(spec.obs(k).dtype)) for k in runner.package.obs_keys}
    runner.reset()
    runner.act(blank)
    runner.reset()
    start = time.perf_counter()
    runner.act(blank)
    elapsed = time.perf_counter() - start
    runner.reset()
    return elapsed
