"""Training loop: AdamW + warm-up/cosine LR, EMA, gradient clipping, atomic
checkpoints with exact resume, SIGINT/SIGTERM save, DDP through torchrun.

Determinism. Every random draw of step s on rank r comes from generators seeded
with (seed, s, r): the batch order is a fixed stream of per-epoch permutations
(each global batch is cut from it and sharded rank::world), and the noise levels,
noise and dropout are drawn fresh per step. So resuming needs only the model,
optimiser, scheduler and EMA state, and N steps + resume N steps equals 2N steps.

Multi-GPU / multi-node: launch with torchrun; `train.batch_size` is the GLOBAL
batch, split evenly over ranks; only rank 0 writes files.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from dpstack.core.files import write_atomic

from .checkpoint import CheckpointError, build_payload, read_checkpoint, save_checkpoint
from .config import Config, ConfigError
from .dataset import ACTION, TrainingData, load_dataset
from .ema import EMA
from .model import DiffusionPolicyModel
from .regimes import sample_levels
from .tracking import open_tracker, require, tracking_record
from .train_outputs import CHECKPOINT_FILE, CONFIG_FILE, LOSS_PLOT_FILE, METRICS_FILE


# -- distributed --------------------------------------------------------------------

@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    if world == 1:
        return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank, device)


def _barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


# -- schedule, batches, randomness ---------------------------------------------------

def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 0 at `total` (diffusers' "cosine")."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class IndexStream:
    """Global batch b = items [b*B, (b+1)*B) of the concatenated per-epoch permutations."""

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ConfigError("the dataset yields no training windows (episodes shorter than the horizon?)")
        self.n, self.seed = n, seed
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[epoch] = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(self.n)
        return self._cache[epoch]

    def batch(self, step: int, batch_size: int) -> np.ndarray:
        start, end = step * batch_size, (step + 1) * batch_size
        parts, pos = [], start
        while pos < end:
            epoch, off = divmod(pos, self.n)
            take = min(end - pos, self.n - off)
            parts.append(self._perm(epoch)[off: off + take])
            pos += take
        return np.concatenate(parts)

    def epoch(self, step: int, batch_size: int) -> float:
        return step * batch_size / self.n


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0]) >> 1


# -- stop on SIGINT / SIGTERM ---------------------------------------------------------

class StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (then it saves)."""
    flag = StopFlag()
    installed = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                installed[sig] = signal.signal(sig, flag)
            except ValueError:  # not the main thread: leave signals alone
                pass
        yield flag
    finally:
        for sig, old in installed.items():
            signal.signal(sig, old)


# -- metrics ---------------------------------------------------------------------------

def _truncate_metrics(path: Path, after_step: int) -> None:
    """On resume drop lines beyond the checkpoint's step (they were not saved in it), and a
    torn last line left by a process killed mid-write."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= after_step:
            keep.append(line)
    write_atomic(path, "".join(line + "\n" for line in keep))


def log_line(row: dict[str, Any], total_steps: int) -> str:
    """One metrics row for a terminal or a log file."""
    line = (f"step {row['step']}/{total_steps}  loss {row['loss']:.4g}  lr {row['lr']:.2e}  "
            f"{row['samples_per_s']:.0f} samples/s  epoch {row['epoch']:g}")
    if "eval_action_mse" in row:
        line += f"  eval_action_mse {row['eval_action_mse']:.4g}"
    return line


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE")
    evals = [r for r in rows if "eval_action_mse" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_action_mse"] for r in evals], "o-", label="eval action MSE")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="gray", alpha=0.4, label="lr")
    ax2.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


# -- evaluation through the runtime sampler -------------------------------------------

@torch.no_grad()
def evaluate_actions(model: DiffusionPolicyModel, data: TrainingData, windows, n: int, ddim_steps: int,
                     seed: int) -> float:
    """Mean squared error (normalised space) between sampled chunks and dataset chunks,
    sampled with runtime.samplers.sample_full through the torch callables."""
    from dpstack.runtime.samplers import sample_full

    from .torch_callables import torch_callables

    rng = np.random.default_rng([seed, 0xE7A1])
    idx = rng.choice(len(windows), size=min(n, len(windows)), replace=False)
    batch = windows.batch(idx)
    was_training = model.training
    model.eval()
    fns = torch_callables(model)
    cond = fns.encode({k: batch[k].astype(np.float32) for k in data.spec.obs_keys})
    levels = model.schedule.inference_levels(ddim_steps)
    x = sample_full(fns.denoise, cond, model.schedule, levels, (len(idx), model.horizon, model.action_dim), rng, "ddim")
    model.train(was_training)
    return float(np.mean((x - batch[ACTION]) ** 2))


# -- the loop -------------------------------------------------------------------------

@dataclass
class TrainResult:
    step: int
    interrupted: bool
    checkpoint: Path | None
    last_loss: float | None
    model: DiffusionPolicyModel | None = None   # the trained (non-EMA) model, unwrapped from DDP
    already_complete: bool = False              # resumed at or past its last step: nothing was done


def _to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device, torch.float32, non_blocking=True)
            for k, v in batch.items()}


def policy_changes(saved: Config, now: Config) -> list[str]:
    """The policy fields that differ, as 'policy.KEY (SAVED in the checkpoint, NOW now)'."""
    a, b = saved.to_dict()["policy"], now.to_dict()["policy"]
    return [f"policy.{k} ({a.get(k)!r} in the checkpoint, {b[k]!r} now)" for k in b if a.get(k) != b[k]]


def _refuse_to_replace(ckpt_path: Path) -> None:
    """A fresh run must not overwrite a saved one (its checkpoint and its metrics)."""
    if not ckpt_path.exists():
        return
    try:
        step = read_checkpoint(ckpt_path)["step"]
    except CheckpointError as e:
        raise ConfigError(f"{e}; nothing was changed: move it away, or give another --out to start afresh") from None
    raise ConfigError(f"{ckpt_path.parent} already holds a training run ({CHECKPOINT_FILE} at step {step}); nothing was "
                      "changed: continue it with --resume, or give another --out to start afresh")


def train(config: Config, dataset: str | os.PathLike | TrainingData, out_dir: str | os.PathLike,
          resume: bool = False, progress: bool = True, stop_at: int | None = None,
          log_lines: bool = False) -> TrainResult:
    """Train (or resume) into out_dir. `stop_at` ends early at that step as an interruption
    would (saving a resumable checkpoint); used by tests and for time-boxed runs.
    `progress` shows a progress bar; `log_lines` prints each metrics row to stdout."""
    out = Path(out_dir)
    info = init_distributed(config.train.device)
    ckpt_path = out / CHECKPOINT_FILE
    tc, pc = config.train, config.policy
    end_step = tc.steps if stop_at is None else min(tc.steps, stop_at)
    payload = None
    require(tc.track)
    if not resume:
        _refuse_to_replace(ckpt_path)
    else:
        payload = read_checkpoint(ckpt_path)
        changes = policy_changes(Config.from_dict(payload["config"]), config)
        if changes:
            raise ConfigError(f"--resume: {ckpt_path} was trained with another policy config: {'; '.join(changes)}. "
                              "Only train.* may change when resuming: drop --config to resume with the checkpoint's own, "
                              "or start a new run in another --out")
        if int(payload["step"]) >= end_step:
            return TrainResult(step=int(payload["step"]), interrupted=int(payload["step"]) < tc.steps,
                               checkpoint=ckpt_path, last_loss=payload.get("metrics", {}).get("loss"),
                               already_complete=True)
    if tc.batch_size % info.world:
        raise ConfigError(f"train.batch_size {tc.batch_size} is not divisible by the {info.world} ranks")
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed % 2**32)
    if info.device.type == "cpu" and tc.cpu_threads > 0:
        torch.set_num_threads(tc.cpu_threads)

    if isinstance(dataset, TrainingData):
        data = dataset
    else:
        from dpstack.core.normalizer import Normalizer
        data = load_dataset(dataset, pc, Normalizer.from_dict(payload["normalizer"]) if payload else None, config.data)
    if payload and payload["dataset"].get("fingerprint") != data.fingerprint:
        raise ConfigError(f"--resume: dataset {data.source} (fingerprint {data.fingerprint[:12]}) is not the one the "
                          f"checkpoint was trained on ({payload['dataset'].get('source')}, "
                          f"{str(payload['dataset'].get('fingerprint'))[:12]})")
    windows = data.windows(pc)
    stream = IndexStream(len(windows), tc.seed)
    dataset_info = {"fingerprint": data.fingerprint, "source": data.source,
                    "n_episodes": int(len(data.episode_ends)), "n_steps": int(data.episode_ends[-1])}

    model = DiffusionPolicyModel(pc, data.spec, data.normalizer).to(info.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.steps))
    ema = EMA(model, tc.ema_power, tc.ema_max_decay)
    step, last_loss = 0, None
    saved_tracking = payload.get("tracking") if payload else None
    if payload:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["train_state"]["optimizer"])
        scheduler.load_state_dict(payload["train_state"]["scheduler"])
        ema.load_state_dict(payload["train_state"]["ema"], payload["ema"])
        step = int(payload["step"])
        last_loss = payload.get("metrics", {}).get("loss")
        del payload
    ddp_model = model
    if info.world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)

    metrics_path = out / METRICS_FILE
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            _truncate_metrics(metrics_path, step)
        elif metrics_path.exists():
            metrics_path.unlink()
        write_atomic(out / CONFIG_FILE, json.dumps(config.to_dict(), indent=2))
    tracker = open_tracker(config, out, step, saved_tracking) if info.is_main else None

    def save(at_step: int, last_loss: float | None) -> Path | None:
        if info.is_main:
            train_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                           "ema": ema.state_dict(),
                           "rng": {"scheme": "per-step (seed, step, rank)", "seed": tc.seed,
                                   "torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist()}}
            save_checkpoint(ckpt_path, build_payload(model, ema.state, config, at_step, dataset_info, train_state,
                                                     {"loss": last_loss}, tracking_record(tracker, saved_tracking)))
            plot_metrics(metrics_path, out / LOSS_PLOT_FILE) if metrics_path.exists() else None
        _barrier(info)
        return ckpt_path

    per_rank = tc.batch_size // info.world
    bar = None
    if info.is_main and progress:
        from tqdm import tqdm
        bar = tqdm(total=tc.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    loss_sum, loss_n, t_window = 0.0, 0, time.perf_counter()
    stopped = failed = False
    model.train()
    with stop_on_signals() as flag:
        try:
            while step < end_step:
                idx = stream.batch(step, tc.batch_size)[info.rank:: info.world]
                batch = _to_device(windows.batch(idx), info.device)
                rng = np.random.default_rng([tc.seed, step, info.rank])
                levels, mask = sample_levels(rng, per_rank, pc)
                seed = step_seed(tc.seed, step, info.rank)
                torch.manual_seed(seed)  # dropout
                gen = torch.Generator(info.device).manual_seed(seed)
                noise = torch.randn(batch[ACTION].shape, generator=gen, device=info.device)
                obs = {k: batch[k] for k in data.spec.obs_keys}
                loss = ddp_model(obs, batch[ACTION], torch.from_numpy(levels).to(info.device), noise,
                                 torch.from_numpy(mask).to(info.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                scheduler.step()
                ema.update(model)
                step += 1
                loss_sum += float(loss.detach())
                loss_n += 1
                if bar is not None:
                    bar.update(1)
                if step % tc.log_every == 0 or step == end_step:
                    mean = torch.tensor([loss_sum / loss_n], device=info.device)
                    if info.world > 1:
                        dist.all_reduce(mean)
                        mean /= info.world
                    last_loss = float(mean)
                    dt = time.perf_counter() - t_window
                    row = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                           "samples_per_s": loss_n * tc.batch_size / dt,
                           "epoch": round(stream.epoch(step, tc.batch_size), 3)}
                    if info.is_main and tc.eval_every and step % tc.eval_every == 0:
                        ema_model = _ema_copy(model, ema)
                        row["eval_action_mse"] = evaluate_actions(ema_model, data, windows, tc.eval_samples,
                                                                  tc.eval_ddim_steps, tc.seed)
                    if info.is_main:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(row) + "\n")
                        if tracker is not None:
                            tracker.log(row, step)
                        if bar is not None:
                            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{row['lr']:.2e}")
                        if log_lines:
                            print(log_line(row, tc.steps), flush=True)
                    loss_sum, loss_n, t_window = 0.0, 0, time.perf_counter()
                if _should_stop(flag, info):
                    stopped = True
                    break
                if step % tc.ckpt_every == 0 and step < end_step:
                    save(step, last_loss)
        except KeyboardInterrupt:  # SIGINT arriving before the handler was installed, or re-raised by a library
            stopped = True
        except BaseException:
            failed = True
            raise
        finally:
            if bar is not None:
                bar.close()
            if tracker is not None:
                tracker.close(failed)
        ckpt = save(step, last_loss)
    interrupted = stopped or step < tc.steps
    return TrainResult(step=step, interrupted=interrupted, checkpoint=ckpt, last_loss=last_loss, model=model)


def _should_stop(flag: StopFlag, info: DistInfo) -> bool:
    """All ranks must stop at the same step, so the local flags are OR-ed across ranks."""
    stop = flag.signal is not None
    if info.world == 1:
        return stop
    t = torch.tensor([1.0 if stop else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _ema_copy(model: DiffusionPolicyModel, ema: EMA) -> DiffusionPolicyModel:
    import copy
    m = copy.deepcopy(model)
    m.load_state_dict(ema.state)
    return m.eval()
