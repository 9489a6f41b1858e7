"""Optional experiment tracking: Weights & Biases or TensorBoard, next to the local
metrics.jsonl and loss.png (which stay, and need no account).

A tracker receives the same rows as metrics.jsonl. Its run id is saved in the
checkpoint (`tracking: {"tracker", "run_id"}`) so that `--resume` continues the
same run: W&B with `id=run_id, resume="allow"`; TensorBoard in the same log
directory (OUT/tensorboard), with the events after the resumed step hidden.
Only rank 0 of a torchrun job opens a tracker.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Mapping, Protocol

from .config import Config, ConfigError

TENSORBOARD_DIR = "tensorboard"   # under --out; the TensorBoard "run id" is this folder


class Tracker(Protocol):
    name: str
    run_id: str

    def log(self, row: Mapping[str, Any], step: int) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def require(track: str) -> None:
    """ConfigError naming the extra when the tracker's package is not installed."""
    if track != "none" and importlib.util.find_spec(track) is None:
        raise ConfigError(f"train.track={track} needs the {track} package: pip install 'dpstack[{track}]' "
                          "(or train without it: --set train.track=none)")


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


class WandbTracker:
    name = "wandb"

    def __init__(self, out: Path, config: Config, run_id: str | None) -> None:
        import wandb

        try:
            # console="off": the terminal stays ours; the metrics are what log() sends.
            self._run = wandb.init(project=config.train.track_project, id=run_id, resume="allow", dir=str(out),
                                   name=out.resolve().name, config=config.to_dict(),
                                   settings=wandb.Settings(console="off"))
        except wandb.Error as e:
            raise ConfigError(f"W&B could not start a run ({e}); log in with `wandb login`, or set "
                              "WANDB_MODE=offline and upload later with `wandb sync`") from None
        self.run_id = self._run.id

    def log(self, row: Mapping[str, Any], step: int) -> None:
        self._run.log(_scalars(row), step=step)

    def close(self, failed: bool = False) -> None:
        import wandb

        self._run.finish(exit_code=1 if failed else 0)
        # W&B's service process otherwise outlives the run until this process exits, spinning
        # a core: training is over, so nothing else here needs it.
        wandb.teardown()


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, out: Path, config: Config, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_id = TENSORBOARD_DIR
        # purge_step: TensorBoard hides the events after `step` left by a run killed after
        # its last checkpoint (or by an earlier fresh run), as metrics.jsonl drops those lines.
        self._writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=step + 1)
        if step == 0:
            self._writer.add_text("config", f"```\n{json.dumps(config.to_dict(), indent=2)}\n```", 0)

    def log(self, row: Mapping[str, Any], step: int) -> None:
        for key, value in _scalars(row).items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self, failed: bool = False) -> None:
        self._writer.close()


def open_tracker(config: Config, out: Path, step: int, saved: Mapping[str, Any] | None) -> Tracker | None:
    """The tracker train.track names (None for "none"); `saved` is the checkpoint's `tracking`
    record, whose run it continues when it was written by the same tracker."""
    track = config.train.track
    if track == "none":
        return None
    require(track)
    run_id = saved.get("run_id") if saved and saved.get("tracker") == track else None
    if track == "wandb":
        return WandbTracker(out, config, run_id)
    return TensorBoardTracker(out, config, step)


def tracking_record(tracker: Tracker | None, saved: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the checkpoint keeps so that --resume finds the run again; a leg trained
    without a tracker keeps the saved run, for a later leg to continue."""
    return {"tracker": tracker.name, "run_id": tracker.run_id} if tracker else dict(saved or {})
