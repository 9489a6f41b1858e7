"""Experiment tracking (`--track wandb|tensorboard`): the scalars of metrics.jsonl reach the
tracker's own files, and --resume continues the same run (its id lives in the checkpoint).
W&B runs offline here; what it wrote is read back from its run directory. Both packages
come with the dev extra, so `make test` runs these."""
import glob
import os
import json
import struct
import sys
from pathlib import Path

import pytest

from _policy_data import bimodal_dataset, one_thread  # noqa: F401  (fixture)
from dpstack.cli import main
from dpstack.policy.checkpoint import read_checkpoint
from dpstack.policy.config import load_config
from dpstack.policy.train import train
from dpstack.policy.train_outputs import CHECKPOINT_FILE, METRICS_FILE
from test_policy_checkpoint import CLI, FAST

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return bimodal_dataset(tmp_path_factory.mktemp("data") / "toy.zarr", n_episodes=6, length=20)


def _metrics(out: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, (out / METRICS_FILE).read_text().splitlines())}


def _tensorboard_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every event TensorBoard shows for `tag`, repeats included."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_logs_the_metrics_and_resume_continues_its_log_dir(toy, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--dataset", str(toy), "--out", str(out), "--quiet"]
    assert main(args + ["--track", "tensorboard", "--set", *FAST, *CLI, "train.log_every=2", "train.steps=2"]) == 0
    assert read_checkpoint(out / CHECKPOINT_FILE)["tracking"] == {"tracker": "tensorboard", "run_id": "tensorboard"}
    # A run killed after logging step 4 but before saving it left a stale value there.
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(out / "tensorboard")) as stale:
        stale.add_scalar("loss", 999.0, 4)
    # --resume without --config or --track: the checkpoint's config keeps tracking on.
    assert main(args + ["--resume", "--set", "train.steps=4"]) == 0
    metrics = _metrics(out)
    assert sorted(metrics) == [2, 4]
    assert _tensorboard_scalars(out / "tensorboard", "loss") == [(s, pytest.approx(v)) for s, v in metrics.items()]
    assert [s for s, _ in _tensorboard_scalars(out / "tensorboard", "lr")] == [2, 4]
    assert read_checkpoint(out / CHECKPOINT_FILE)["tracking"]["tracker"] == "tensorboard"


def _wandb_records(path: Path):
    """The protobuf records of a .wandb file: a 7-byte ":W&B" header, then leveldb-log
    chunks (7-byte header: crc, length, type) in 32 KiB blocks. wandb has no Python reader."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks = header, []
    while pos + header <= len(data):
        if block - pos % block < header:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0:
            break
        chunks.append(data[pos + header:pos + header + length])
        pos += header + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def _wandb_runs(out: Path) -> tuple[set[str], dict[int, float]]:
    """(run ids, {step: loss}) over every offline run directory under OUT/wandb."""
    ids, losses = set(), {}
    for path in glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb")):
        for record in _wandb_records(Path(path)):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                losses[row["_step"]] = row["loss"]
    return ids, losses


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))


def test_wandb_offline_logs_the_metrics_and_resume_continues_the_same_run(toy, tmp_path, wandb_offline):
    out = tmp_path / "run"
    cfg = load_config(None, FAST + ["train.steps=4", "train.track=wandb", "train.track_project=dpstack-test"])
    train(cfg, toy, out, progress=False, stop_at=2)
    run_id = read_checkpoint(out / CHECKPOINT_FILE)["tracking"]["run_id"]
    assert read_checkpoint(out / CHECKPOINT_FILE)["tracking"]["tracker"] == "wandb" and run_id
    assert train(cfg, toy, out, resume=True, progress=False).step == 4
    assert read_checkpoint(out / CHECKPOINT_FILE)["tracking"]["run_id"] == run_id
    ids, losses = _wandb_runs(out)
    assert ids == {run_id}
    assert losses == pytest.approx(_metrics(out)) and sorted(losses) == [2, 4]
    assert not _wandb_services(), "W&B's service process outlived the training run"


def _wandb_services() -> list[str]:
    """wandb-core processes started for this process (they name its pid)."""
    import time

    time.sleep(0.5)  # teardown waits for the service; give the kernel a moment to reap it
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(c.endswith(b"wandb-core") for c in cmd) and str(os.getpid()).encode() in cmd:
            found.append(proc.name)
    return found


def test_a_leg_without_tracking_keeps_the_saved_run_id(toy, tmp_path, wandb_offline):
    out = tmp_path / "run"
    cfg = load_config(None, FAST + ["train.steps=6", "train.track=wandb"])
    train(cfg, toy, out, progress=False, stop_at=2)
    run_id = read_checkpoint(out / CHECKPOINT_FILE)["tracking"]["run_id"]
    train(load_config(None, FAST + ["train.steps=6"]), toy, out, resume=True, progress=False, stop_at=4)
    train(cfg, toy, out, resume=True, progress=False)
    assert read_checkpoint(out / CHECKPOINT_FILE)["tracking"]["run_id"] == run_id
    assert _wandb_runs(out)[0] == {run_id}


@pytest.mark.parametrize("track", ["wandb", "tensorboard"])
def test_a_missing_tracker_package_is_one_sentence_naming_the_extra(toy, tmp_path, capsys, monkeypatch, track):
    monkeypatch.setitem(sys.modules, track, None)  # as if not installed: import and find_spec fail
    out = tmp_path / "run"
    code = main(["train", "--dataset", str(toy), "--out", str(out), "--track", track, "--set", *FAST, *CLI])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert f"pip install 'dpstack[{track}]'" in err and "Traceback" not in err
    assert not (out / CHECKPOINT_FILE).exists()
