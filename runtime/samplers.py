"""Diffusion samplers in numpy: full DDPM/DDIM, RTI warm start, streaming ladder.

All samplers work in NORMALISED action space against a denoiser callable

    denoise(x (B, Tp, A) float32, t (B, Tp) int64, cond (B, C) float32) -> eps (B, Tp, A)

(an onnxruntime session or the torch model wrapped by policy/torch_callables.py)
and the shared `NoiseSchedule`. Levels may differ per horizon position, so one
step function serves full denoising (one level for the whole chunk) and the
streaming ladder (a level per position). Randomness comes only from the
`np.random.Generator` a sampler is given: same seed, same actions.
"""
from __future__ import annotations

import re

from dataclasses import dataclass, field
from typing import Callable, Generator, Sequence, TypeVar

import numpy as np

from dpstack.core.schedule import NoiseSchedule

Denoise = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

CLEAN = -1  # the schedule's level for a clean sample
T = TypeVar("T")


def _as_levels(t: int | np.ndarray, batch: int, horizon: int) -> np.ndarray:
    """A level given as a scalar, (Tp,) or (B, Tp) -> (B, Tp) int64."""
    return np.broadcast_to(np.asarray(t, dtype=np.int64), (batch, horizon)).copy()


def _as_cond(cond: np.ndarray) -> np.ndarray:
    cond = np.asarray(cond, dtype=np.float32)
    return cond[None] if cond.ndim == 1 else cond


@dataclass
class DenoiseRequest:
    """One denoiser evaluation a sampler is waiting for (batch first, as `Denoise` takes them)."""

    x: np.ndarray      # (B, Tp, A) float32
    t: np.ndarray      # (B, Tp) int64
    cond: np.ndarray   # (B, C) float32


# A resumable sampler computation: it yields each DenoiseRequest, takes the eps back
# through send() and returns its result. Functions ending in `_gen` are such steps.
DenoiseSteps = Generator[DenoiseRequest, np.ndarray, T]


def drive(steps: DenoiseSteps[T], denoise: Denoise) -> T:
    """Run a resumable computation to its end, answering each request with one denoiser call
    (the batch-of-one path; the server answers many computations' requests in one call)."""
    try:
        request = next(steps)
        while True:
            request = steps.send(denoise(request.x, request.t, request.cond))
    except StopIteration as done:
        return done.value


def predict_noise_gen(x: np.ndarray, cond: np.ndarray, t: np.ndarray) -> DenoiseSteps[np.ndarray]:
    """One denoiser evaluation: the noise it sees in x at levels t (B, Tp)."""
    eps = np.asarray((yield DenoiseRequest(x.astype(np.float32), t, cond)), dtype=np.float32)
    if eps.shape != x.shape:
        raise ValueError(f"denoiser returned shape {eps.shape}, expected {x.shape}")
    return eps


def step_from_noise(schedule: NoiseSchedule, x: np.ndarray, eps: np.ndarray, t: np.ndarray, t_next: np.ndarray,
                    rng: np.random.Generator | None, method: str = "ddpm") -> np.ndarray:
    """Take x from level t to t_next given the predicted noise. DDPM draws its noise from
    `rng` on every call (also for the last step, where it is unused) so the random
    stream does not depend on which positions finish."""
    if method == "ddpm":
        noise = rng.standard_normal(x.shape).astype(np.float32)
        return schedule.ddpm_step(x, eps, t, t_next, noise)
    return schedule.ddim_step(x, eps, t, t_next)


def denoise_step_gen(x: np.ndarray, cond: np.ndarray, schedule: NoiseSchedule, t: int | np.ndarray,
                     t_next: int | np.ndarray, rng: np.random.Generator | None,
                     method: str = "ddpm") -> DenoiseSteps[np.ndarray]:
    """One denoiser evaluation taking x from level t to the lower level t_next (per position).

    Positions with t == t_next are left untouched (their eps is ignored).
    """
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"unknown method {method!r}; use 'ddpm' or 'ddim'")
    b, tp = x.shape[:2]
    t = _as_levels(t, b, tp)
    t_next = _as_levels(t_next, b, tp)
    schedule.check_descent(t, t_next)
    eps = yield from predict_noise_gen(x, cond, t)
    return step_from_noise(schedule, x, eps, t, t_next, rng, method)


def denoise_along_gen(x: np.ndarray, cond: np.ndarray, schedule: NoiseSchedule, levels: Sequence[int | np.ndarray],
                      rng: np.random.Generator | None, method: str = "ddpm") -> DenoiseSteps[np.ndarray]:
    """Take x, currently at levels[0], down through levels[1:] and then to clean.

    One denoiser evaluation per entry of `levels`; each entry is a scalar or a
    per-position level array.
    """
    cond = _as_cond(cond)
    for i, t in enumerate(levels):
        t_next = levels[i + 1] if i + 1 < len(levels) else CLEAN
        x = yield from denoise_step_gen(x, cond, schedule, t, t_next, rng, method)
    return x


def sample_full_gen(cond: np.ndarray, schedule: NoiseSchedule, levels: Sequence[int], shape: tuple[int, int, int],
                    rng: np.random.Generator, method: str = "ddpm") -> DenoiseSteps[np.ndarray]:
    """Full denoise of a chunk from Gaussian noise: (B, Tp, A) clean normalised actions.

    `levels` is the descending list of levels visited (schedule.inference_levels(k));
    the number of denoiser evaluations is len(levels).
    """
    levels = [int(t) for t in levels]
    if any(a <= b for a, b in zip(levels, levels[1:])) or not levels or levels[-1] < 0:
        raise ValueError(f"levels must be a non-empty strictly descending list of levels >= 0, got {levels}")
    x = rng.standard_normal(shape).astype(np.float32)
    return (yield from denoise_along_gen(x, cond, schedule, levels, rng, method))


def sample_full(denoise: Denoise, cond: np.ndarray, schedule: NoiseSchedule, levels: Sequence[int],
                shape: tuple[int, int, int], rng: np.random.Generator, method: str = "ddpm") -> np.ndarray:
    """sample_full_gen driven by `denoise`, one call per level."""
    return drive(sample_full_gen(cond, schedule, levels, shape, rng, method), denoise)


def denoise_requests(denoise: Denoise, requests: Sequence[DenoiseRequest], max_batch: int = 0) -> list[np.ndarray]:
    """Answer several requests with as few denoiser calls as the network takes (max_batch
    rows per call; 0: any), concatenated along the batch; the eps of each request, in order."""
    out: list[np.ndarray] = []
    per_call = max_batch or len(requests)
    for i in range(0, len(requests), per_call):
        part = requests[i:i + per_call]
        if len(part) == 1:
            out.append(denoise(part[0].x, part[0].t, part[0].cond))
            continue
        eps = denoise(np.concatenate([r.x for r in part]), np.concatenate([r.t for r in part]),
                      np.concatenate([r.cond for r in part]))
        out.extend(np.split(np.asarray(eps), np.cumsum([len(r.x) for r in part])[:-1]))
    return out


# -- per-control-step samplers ---------------------------------------------------------

@dataclass
class SamplerStep:
    """What one sampler call produced (normalised action space, batch of one)."""

    trajectory: np.ndarray   # (Tp, A): the whole buffer after the call (streaming: later positions still noisy)
    indices: np.ndarray      # (n,) horizon positions executed from this call, in order
    actions: np.ndarray      # (n, A): the actions to execute (trajectory[indices], gripper post-processed)
    nfe: int                 # denoiser evaluations spent in this call
    replan_after: int | None = None  # call again after this many actions; the rest is look-ahead (None: all n)


@dataclass
class ChunkGeometry:
    """Horizon Tp, observation steps To, action dim A; position To-1 is 'now'."""

    horizon: int
    n_obs_steps: int
    action_dim: int

    @property
    def now(self) -> int:
        return self.n_obs_steps - 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1, self.horizon, self.action_dim)


class Sampler:
    """Base: a seeded sampler over one robot's action chunk.

    `actions_per_call` is how many control steps one call covers; the caller
    executes them all before calling again (PolicyRunner queues them, so there
    are no network calls between calls).
    """

    name = "sampler"

    def __init__(self, denoise: Denoise, schedule: NoiseSchedule, geometry: ChunkGeometry, seed: int = 0) -> None:
        self.denoise = denoise
        self.schedule = schedule
        self.geometry = geometry
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.actions_per_call = 1

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode: forget warm starts/buffers; optionally re-seed."""
        if seed is not None:
            self.seed = seed
        self.rng = np.random.default_rng(self.seed)

    def step(self, cond: np.ndarray, elapsed: int | None = None) -> SamplerStep:
        """One call. `elapsed`: control steps since the previous call (None: actions_per_call)."""
        return drive(self.step_gen(cond, elapsed), self.denoise)

    def step_gen(self, cond: np.ndarray, elapsed: int | None = None) -> DenoiseSteps[SamplerStep]:
        """`step` as a resumable computation: yields its denoiser requests (a server batches
        them with other robots'), updates the sampler's state as it goes."""
        raise NotImplementedError

    def _executed(self, traj: np.ndarray, n: int, nfe: int) -> SamplerStep:
        idx = np.arange(self.geometry.now, self.geometry.now + n)
        return SamplerStep(trajectory=traj.copy(), indices=idx, actions=traj[idx].copy(), nfe=nfe)


class FullSampler(Sampler):
    """Diffusion Policy's scheme: full denoise of a Tp chunk, execute Ta actions from To-1, replan."""

    def __init__(self, denoise: Denoise, schedule: NoiseSchedule, geometry: ChunkGeometry, n_action_steps: int,
                 num_steps: int, method: str = "ddpm", seed: int = 0) -> None:
        super().__init__(denoise, schedule, geometry, seed)
        if not 1 <= n_action_steps <= geometry.horizon - geometry.now:
            raise ValueError(f"n_action_steps {n_action_steps} does not fit horizon {geometry.horizon} after To-1={geometry.now}")
        self.levels = schedule.inference_levels(num_steps)
        self.method = method
        self.name = f"{method}-{num_steps}"
        self.actions_per_call = n_action_steps

    def step_gen(self, cond: np.ndarray, elapsed: int | None = None) -> DenoiseSteps[SamplerStep]:
        traj = (yield from sample_full_gen(cond, self.schedule, self.levels, self.geometry.shape, self.rng, self.method))[0]
        return self._executed(traj, self.actions_per_call, len(self.levels))


def DDPMSampler(denoise: Denoise, schedule: NoiseSchedule, geometry: ChunkGeometry, n_action_steps: int,
                num_steps: int = 100, seed: int = 0) -> FullSampler:
    return FullSampler(denoise, schedule, geometry, n_action_steps, num_steps, "ddpm", seed)


def DDIMSampler(denoise: Denoise, schedule: NoiseSchedule, geometry: ChunkGeometry, n_action_steps: int,
                num_steps: int = 10, seed: int = 0) -> FullSampler:
    return FullSampler(denoise, schedule, geometry, n_action_steps, num_steps, "ddim", seed)


def shift_chunk(chunk: np.ndarray, n: int) -> np.ndarray:
    """Drop the first n positions of a (Tp, A) chunk and repeat its last action n times."""
    if n <= 0:
        return chunk.copy()
    n = min(n, chunk.shape[0])
    return np.concatenate([chunk[n:], np.repeat(chunk[-1:], n, axis=0)], axis=0)


def binarize_grippers(actions: np.ndarray, gripper_dims: Sequence[int], level: float = 1.0) -> np.ndarray:
    """Executed gripper command = the sign, as +-level in normalised space.

    level is where the recorded open/close extremes sit: 1 normally, 1/scale for a
    model trained with the gripper divided by `scale` (folded into its normaliser).
    """
    out = actions.copy()
    if len(gripper_dims):
        g = list(gripper_dims)
        out[..., g] = np.where(out[..., g] >= 0, level, -level)
    return out


def check_refine_levels(levels: Sequence[int], num_train_steps: int) -> list[int]:
    """RTI refinement levels as ints; ValueError unless they fall strictly within [0, num_train_steps)."""
    k = [int(x) for x in levels]
    if not k or any(a <= b for a, b in zip(k, k[1:])) or k[-1] < 0 or k[0] >= num_train_steps:
        raise ValueError(f"refine levels must fall strictly within [0, {num_train_steps}), descending; got {k}")
    return k


def rti_name(levels: Sequence[int], renoise: bool) -> str:
    return ("rti-renoise-" if renoise else "rti-") + ",".join(map(str, levels))


class RTISampler(Sampler):
    """RTI-DP warm start: full DDPM once, then shift the last clean chunk and refine it with a few DDPM steps.

    The shifted guess is taken down through refine_levels to clean, one evaluation
    per entry. With renoise=False (RTI-DP as published) the clean guess is treated
    as a sample at refine_levels[0]. That only matches what the network was trained
    on at low levels, and a low level moves the guess by about its noise scale per
    call (0.06 in normalised units at level 3): too little to stop an approach the
    guess carries past the object (Can). With renoise=True the guess is first taken
    to refine_levels[0] by the forward process, q(x_k | guess), so the network sees
    a genuine level-k sample and a start level of 20 (noise scale 0.3) or more lets the
    observation overrule the guess where they disagree (the default, 40, also lets it
    close or open the gripper at a new task phase). Gripper treatment:
      "clip":  clip the kept chunk's gripper entries to +-1/factor (any checkpoint),
      "scale": the model was trained with gripper/factor; nothing is clipped.
    In both, the executed gripper command is the sign: +-1 in normalised space for
    "clip", +-1/factor for "scale" (where that model's normaliser puts the recorded
    open/close values).
    """

    def __init__(self, denoise: Denoise, schedule: NoiseSchedule, geometry: ChunkGeometry, refine_levels: Sequence[int] = (3, 1, 0),
                 full_steps: int = 100, n_action_steps: int = 1, gripper_dims: Sequence[int] = (),
                 gripper_mode: str = "clip", gripper_factor: float = 1.0, renoise: bool = False,
                 seed: int = 0) -> None:
        super().__init__(denoise, schedule, geometry, seed)
        refine = check_refine_levels(refine_levels, schedule.num_train_steps)
        if gripper_mode not in ("clip", "scale"):
            raise ValueError(f"gripper_mode must be 'clip' or 'scale', got {gripper_mode!r}")
        if gripper_factor < 1:
            raise ValueError(f"gripper_factor must be >= 1, got {gripper_factor}")
        if not 1 <= n_action_steps <= geometry.horizon - geometry.now:
            raise ValueError(f"RTI's Ta={n_action_steps} does not fit a horizon of {geometry.horizon} with "
                             f"{geometry.n_obs_steps} observation steps")
        self.refine_levels = refine
        self.full_levels = schedule.inference_levels(full_steps)
        self.gripper_dims = tuple(gripper_dims)
        self.gripper_mode = gripper_mode
        self.gripper_factor = float(gripper_factor)
        self.actions_per_call = n_action_steps
        self.renoise = renoise
        self.name = rti_name(refine, renoise)
        if n_action_steps != 1:
            self.name += f"-ta{n_action_steps}"
        self.guess: np.ndarray | None = None

    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        self.guess = None

    def step_gen(self, cond: np.ndarray, elapsed: int | None = None) -> DenoiseSteps[SamplerStep]:
        if self.guess is None:
            traj = (yield from sample_full_gen(cond, self.schedule, self.full_levels, self.geometry.shape, self.rng, "ddpm"))[0]
            nfe = len(self.full_levels)
        else:
            x = shift_chunk(self.guess, self.actions_per_call if elapsed is None else elapsed)[None]
            if self.renoise:
                clean, start = _as_levels(CLEAN, 1, x.shape[1]), _as_levels(self.refine_levels[0], 1, x.shape[1])
                x = self.schedule.renoise(x, self.rng.standard_normal(x.shape).astype(np.float32), clean, start)
            traj = (yield from denoise_along_gen(x, cond, self.schedule, self.refine_levels, self.rng, "ddpm"))[0]
            nfe = len(self.refine_levels)
        if self.gripper_mode == "clip" and self.gripper_dims:
            g = list(self.gripper_dims)
            traj[:, g] = np.clip(traj[:, g], -1.0 / self.gripper_factor, 1.0 / self.gripper_factor)
        self.guess = traj
        # The whole refined rest of the chunk goes out, so a robot whose next chunk is
        # late continues this plan instead of holding; it still replans after Ta actions.
        out = self._executed(traj, self.geometry.horizon - self.geometry.now, nfe)
        out.replan_after = self.actions_per_call
        level = 1.0 / self.gripper_factor if self.gripper_mode == "scale" else 1.0
        out.actions = binarize_grippers(out.actions, self.gripper_dims, level)
        return out


class StreamingSampler(Sampler):
    """Streaming Diffusion Policy: a buffer whose noise level rises along the horizon (runtime/ladder.py).

    Buffer invariant between calls: position i is at level ladder[i] (ladder_levels
    with shift 0). A call runs `evals_per_step` denoiser evaluations; evaluation e
    takes every position from the ladder shifted by j_e = e * gap // m to the next
    shift, and the last one to the rung below (the bottom rung and the history to
    clean). The first `chunk_len` positions after the history are then clean and
    executed. Shift by chunk_len, append fresh noise at the top level, and bring
    every position whose level is now below its ladder level back up with
    q(x_to | x_from): the executed history (clean) is re-noised to the bottom rung.
    Start-up (first call of an episode): a full denoise, then add_noise from that
    clean chunk to the ladder levels. After the executed chunk, a call returns the
    last evaluation's clean estimate of the rest of the horizon as look-ahead
    (replan_after = chunk_len): free, and far better than holding when the next
    answer is late.
    """

    def __init__(self, denoise: Denoise, schedule: NoiseSchedule, geometry: ChunkGeometry, n_rungs: int,
                 evals_per_step: int = 1, chunk_len: int | None = None, startup_steps: int = 100,
                 startup_method: str = "ddpm", seed: int = 0) -> None:
        from dpstack.core.ladder import ladder_chunk_len, ladder_chunks, ladder_levels, rung_gap

        super().__init__(denoise, schedule, geometry, seed)
        n_levels = schedule.num_train_steps
        tp, to = geometry.horizon, geometry.n_obs_steps
        self.n_rungs = int(n_rungs)
        self.chunk_len = ladder_chunk_len(tp, to, self.n_rungs, chunk_len)
        gap = rung_gap(n_levels, self.n_rungs)
        if not 1 <= evals_per_step <= gap:
            raise ValueError(f"evals_per_step must be in [1, {gap}] for {self.n_rungs} rungs over {n_levels} levels, got {evals_per_step}")
        self.evals_per_step = int(evals_per_step)
        self.ladder = ladder_levels(tp, to, self.n_rungs, n_levels, 0, self.chunk_len)
        chunks = ladder_chunks(tp, to, self.n_rungs, self.chunk_len)
        rung_level = np.array([self.ladder[chunks == c][0] for c in range(self.n_rungs)], dtype=np.int64)
        below = np.where(chunks == 0, CLEAN, rung_level[np.maximum(chunks - 1, 0)])
        shifts = [e * gap // self.evals_per_step for e in range(self.evals_per_step)]
        # eval e goes from eval_levels[e] to eval_levels[e + 1]
        self.eval_levels = [ladder_levels(tp, to, self.n_rungs, n_levels, j, self.chunk_len) for j in shifts] + [below]
        for a, b in zip(self.eval_levels, self.eval_levels[1:]):  # checked once: every call takes these steps
            schedule.check_descent(a[None], b[None])
        self.startup_levels = schedule.inference_levels(startup_steps)
        self.startup_method = startup_method
        self.actions_per_call = self.chunk_len
        self.name = f"streaming-{self.n_rungs}r-{self.evals_per_step}e"
        self.buffer: np.ndarray | None = None          # (Tp, A), at self.ladder levels
        self.buffer_levels: np.ndarray | None = None   # the level each position is at now (for checks)

    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        self.buffer = None
        self.buffer_levels = None

    def start_gen(self, cond: np.ndarray) -> DenoiseSteps[int]:
        """Fill the buffer for a new episode; returns the evaluations spent."""
        clean = (yield from sample_full_gen(cond, self.schedule, self.startup_levels, self.geometry.shape, self.rng,
                                            self.startup_method))[0]
        noise = self.rng.standard_normal(clean.shape).astype(np.float32)
        self.buffer = self.schedule.add_noise(clean, noise, self.ladder)
        self.buffer_levels = self.ladder.copy()
        return len(self.startup_levels)

    def step_gen(self, cond: np.ndarray, elapsed: int | None = None) -> DenoiseSteps[SamplerStep]:
        # The ladder moves one chunk per call (`elapsed` is not used): a late call's
        # buffer is a step behind, which the next observation corrects.
        nfe = (yield from self.start_gen(cond)) if self.buffer is None else 0
        x = self.buffer[None]
        cond = _as_cond(cond)
        for e in range(self.evals_per_step - 1):
            x = yield from denoise_step_gen(x, cond, self.schedule, self.eval_levels[e], self.eval_levels[e + 1], self.rng, "ddpm")
        # The last evaluation also yields the clean sample its noise prediction implies
        # for every still-noisy position: that estimate is the look-ahead.
        t, t_next = self.eval_levels[-2][None], self.eval_levels[-1][None]
        eps = yield from predict_noise_gen(x, cond, t)
        estimate = self.schedule.ddim_step(x, eps, t, np.full_like(t, CLEAN))[0]
        x = step_from_noise(self.schedule, x, eps, t, t_next, self.rng, "ddpm")
        nfe += self.evals_per_step
        traj = x[0]
        out = self._with_lookahead(traj, estimate, nfe)
        fresh = self.rng.standard_normal((self.chunk_len, traj.shape[1])).astype(np.float32)
        renoise = self.rng.standard_normal(traj.shape).astype(np.float32)
        self.buffer, self.buffer_levels = advance_ladder(self.schedule, traj, self.eval_levels[-1], self.ladder,
                                                         self.chunk_len, fresh, renoise)
        return out

    def _with_lookahead(self, traj: np.ndarray, estimate: np.ndarray, nfe: int) -> SamplerStep:
        """The clean chunk to execute, then the estimate for the rest of the horizon as
        look-ahead: a robot whose next chunk is late runs that instead of holding."""
        now, end = self.geometry.now, self.geometry.horizon
        out = self._executed(traj, self.chunk_len, nfe)
        rest = np.arange(now + self.chunk_len, end)
        out.indices = np.concatenate([out.indices, rest])
        out.actions = np.concatenate([out.actions, estimate[rest]], axis=0)
        out.replan_after = self.chunk_len
        return out


def advance_ladder(schedule: NoiseSchedule, x: np.ndarray, levels: np.ndarray, ladder: np.ndarray, n: int,
                   fresh: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shift a (Tp, A) buffer whose positions are at `levels` by n, append `fresh` noise at the top
    level, and re-noise every position below its `ladder` level up to it (using `noise`).

    Returns the new buffer and its levels (== ladder).
    """
    top = schedule.num_train_steps - 1
    shifted = np.concatenate([x[n:], fresh], axis=0)
    cur = np.concatenate([levels[n:], np.full(n, top, dtype=np.int64)])
    if np.any(cur > ladder):
        raise ValueError(f"buffer levels {cur.tolist()} above the ladder {ladder.tolist()} after the shift")
    return schedule.renoise(shifted, noise, cur, ladder), ladder.copy()


# -- configuration ----------------------------------------------------------------

@dataclass
class SamplerConfig:
    """Which sampler and its knobs; `parse` reads the short names used on command lines.

    ddpm-100, ddim-10           full denoise with that many steps, Ta actions per chunk
    ddim-10-ta2                 the same, executing 2 actions per chunk instead of the model's Ta
    rti-3,1,0                   RTI-DP warm start with that refinement list (the clean guess enters at 3)
    rti-renoise-40,15,0         the same, with the guess first re-noised to the list's first level
    rti                         the package's own list (`dpstack export --rti-default`), else
                                rti-renoise-40,15,0, the form that also solves multi-phase tasks (Can)
    rti-ta4, rti-3,1,0-ta4      RTI executing 4 actions of each refined chunk before the next call
    streaming-1 / streaming-2   streaming ladder with that many evaluations per control step
    """

    kind: str = "ddim"
    steps: int = 10                   # ddpm/ddim steps; full steps of RTI's and streaming's start-up
    refine: tuple[int, ...] = ()      # rti: () = the package's default list, else DEFAULT_RTI
    renoise: bool = True              # rti: re-noise the warm start to refine[0] first
    evals_per_step: int = 1
    n_rungs: int = 0                  # streaming: 0 = what the model was trained with (else one per position)
    chunk_len: int = 0                # streaming: 0 = the ladder's default
    n_action_steps: int = 0           # ddpm/ddim: 0 = the model's Ta; rti: 0 = 1
    gripper_mode: str = "auto"        # rti: auto = "scale" if trained with a gripper scale, else "clip"
    gripper_factor: float = 0.0       # rti clip factor; 0 = the trained gripper scale (or 1)
    seed: int = 0

    @classmethod
    def parse(cls, text: str, **over) -> "SamplerConfig":
        kind, _, arg = text.strip().partition("-")
        try:
            if kind in ("ddpm", "ddim"):
                steps, ta = _split_ta(arg)
                cfg = cls(kind=kind, steps=int(steps) if steps else (100 if kind == "ddpm" else 10), n_action_steps=ta)
            elif kind == "rti":
                arg, ta = _split_ta(arg)
                renoise = arg.startswith("renoise") or not arg
                arg = arg.removeprefix("renoise").removeprefix("-")
                cfg = cls(kind=kind, steps=100, renoise=renoise, n_action_steps=ta)
                if arg:
                    cfg.refine = tuple(int(k) for k in arg.split(","))
            elif kind == "streaming":
                cfg = cls(kind=kind, steps=100, evals_per_step=int(arg) if arg else 1)
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"cannot parse sampler {text!r}; use ddpm-N[-taA], ddim-N[-taA], rti[-renoise]-K1,K2,.. "
                             "or streaming-E") from None
        for k, v in over.items():
            setattr(cfg, k, v)
        return cfg


# Level 20 kept an open gripper open at the can on 7-9 of 50 Can episodes; 40 lets the observation flip it.
DEFAULT_RTI = "rti-renoise-40,15,0"


def rti_list(text: str, num_train_steps: int) -> str:
    """Check an RTI refinement list for a package's default: 'renoise-20,10,0' or 'rti-3,1,0' ->
    its canonical sampler name. ValueError when it is not an RTI list, carries -taN, or its
    levels do not fall strictly inside [0, num_train_steps)."""
    name = text.strip() if text.strip().startswith("rti") else f"rti-{text.strip()}"
    try:
        cfg = SamplerConfig.parse(name)
    except ValueError:
        cfg = None
    if cfg is None or not cfg.refine or cfg.n_action_steps:
        raise ValueError(f"{text!r} is not an RTI refinement list such as renoise-20,10,0 or 3,1,0 "
                         "(actions per call are the caller's choice: rti-ta4)")
    try:
        levels = check_refine_levels(cfg.refine, num_train_steps)
    except ValueError as e:
        raise ValueError(f"{text!r}: {e}") from None
    return rti_name(levels, cfg.renoise)


def _split_ta(arg: str) -> tuple[str, int]:
    """'10-ta2' -> ('10', 2); '3,1,0' -> ('3,1,0', 0): 0 = the sampler's own Ta. ValueError on a bad Ta."""
    rest, ta_given, ta = arg.partition("ta")
    if ta_given and int(ta) < 1:
        raise ValueError
    return rest.removesuffix("-"), int(ta) if ta_given else 0


def split_sampler_names(text: str) -> tuple[str, ...]:
    """A --samplers list: 'ddim-10,rti-3,1,0,streaming-1' -> ('ddim-10', 'rti-3,1,0', 'streaming-1').

    Commas separate names and a bare number continues the rti refinement list before
    it; semicolons separate names too ('ddim-10;rti-3,1,0')."""
    out: list[str] = []
    for part in (p.strip() for p in text.replace(";", ",").split(",")):
        if not part:
            continue
        if re.fullmatch(r"\d+(-ta\d+)?", part) and out and out[-1].startswith("rti"):
            out[-1] += "," + part
        else:
            out.append(part)
    return tuple(out)


@dataclass
class TrainedRegimes:
    """What the model saw in training (from the manifest), which some samplers need."""

    horizon: int
    n_obs_steps: int
    n_action_steps: int
    ladder_rungs: int = 0        # rungs of the training ladder; 0 = not trained with a ladder
    ladder_chunk_len: int = 0    # 0 = ladder default
    gripper_scale: float = 1.0
    gripper_dims: tuple[int, ...] = field(default_factory=tuple)
    rti_default: str = DEFAULT_RTI  # what bare `rti` means for this package (manifest "sampler_defaults")


def build_sampler(cfg: SamplerConfig, denoise: Denoise, schedule: NoiseSchedule, action_dim: int,
                  trained: TrainedRegimes) -> Sampler:
    geometry = ChunkGeometry(trained.horizon, trained.n_obs_steps, action_dim)
    if cfg.kind in ("ddpm", "ddim"):
        sampler = FullSampler(denoise, schedule, geometry, cfg.n_action_steps or trained.n_action_steps, cfg.steps,
                              cfg.kind, cfg.seed)
        if cfg.n_action_steps and cfg.n_action_steps != trained.n_action_steps:
            sampler.name += f"-ta{cfg.n_action_steps}"
        return sampler
    if cfg.kind == "rti":
        mode = cfg.gripper_mode if cfg.gripper_mode != "auto" else ("scale" if trained.gripper_scale != 1 else "clip")
        factor = cfg.gripper_factor or trained.gripper_scale or 1.0
        refine, renoise = cfg.refine, cfg.renoise
        if not refine:
            default = SamplerConfig.parse(trained.rti_default or DEFAULT_RTI)
            refine, renoise = default.refine, default.renoise
        return RTISampler(denoise, schedule, geometry, refine, cfg.steps, cfg.n_action_steps or 1,
                          trained.gripper_dims, mode, max(factor, 1.0), renoise, cfg.seed)
    if cfg.kind == "streaming":
        from dpstack.core.ladder import ladder_span

        rungs = cfg.n_rungs or trained.ladder_rungs or ladder_span(trained.horizon, trained.n_obs_steps)
        chunk = cfg.chunk_len or (trained.ladder_chunk_len if rungs == trained.ladder_rungs else 0) or None
        return StreamingSampler(denoise, schedule, geometry, rungs, cfg.evals_per_step, chunk, cfg.steps, "ddpm", cfg.seed)
    raise ValueError(f"unknown sampler kind {cfg.kind!r}; use ddpm, ddim, rti or streaming")
