"""Checkpoints: round trip, exact resume, refusal of damaged files, Ctrl-C saves; what
`dpstack train` refuses so that no saved run is lost or mislabelled, and what it says."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _policy_data import bimodal_dataset, one_thread  # noqa: F401  (fixture)
from dpstack.cli import main
from dpstack.data.replay_buffer import ReplayBuffer
from dpstack.policy.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from dpstack.policy.config import ConfigError, load_config
from dpstack.policy.torch_callables import torch_callables
from dpstack.policy.train import train
from dpstack.policy.train_outputs import CHECKPOINT_FILE, LOSS_PLOT_FILE, METRICS_FILE

ROOT = Path(__file__).resolve().parents[1]
FAST = ["policy.preset=test", "policy.regime_plain=0.5", "policy.regime_ladder=0.5", "policy.ladder_rungs=15",
        "policy.prefix_prob=0.3", "policy.prefix_max=3", "train.batch_size=16", "train.warmup_steps=2",
        "train.log_every=2", "train.lr=1e-3"]
CLI = ["policy.obs_keys=[pos]", "train.log_every=1", "train.ckpt_every=100", "train.eval_every=0"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return bimodal_dataset(tmp_path_factory.mktemp("data") / "toy.zarr", n_episodes=6, length=20)


def test_round_trip_same_outputs(toy, tmp_path):
    cfg = load_config(None, FAST + ["train.steps=4"])
    result = train(cfg, toy, tmp_path, progress=False)
    assert result.step == 4 and not result.interrupted and (tmp_path / LOSS_PLOT_FILE).stat().st_size > 0
    model, info = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert info["step"] == 4 and len(info["dataset"]["fingerprint"]) == 64
    assert info["config"].policy.preset == "test"
    again, _ = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    fns_a, fns_b = torch_callables(model), torch_callables(again)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16, 3)).astype(np.float32)
    t = rng.integers(-1, 100, (3, 16))
    obs = {"pos": rng.standard_normal((3, 2, 2)).astype(np.float32)}
    assert np.array_equal(fns_a.encode(obs), fns_b.encode(obs))
    cond = fns_a.encode(obs)
    assert np.array_equal(fns_a.denoise(x, t, cond), fns_b.denoise(x, t, cond))
    # The EMA weights (deployed) and the raw weights are both there and differ after training.
    raw, _ = load_checkpoint(tmp_path / CHECKPOINT_FILE, use_ema=False)
    assert not np.array_equal(torch_callables(raw).denoise(x, t, cond), fns_a.denoise(x, t, cond))


def test_resume_equals_straight_run(toy, tmp_path):
    cfg = load_config(None, FAST + ["train.steps=8", "train.ckpt_every=100"])
    train(cfg, toy, tmp_path / "straight", progress=False)
    first = train(cfg, toy, tmp_path / "split", progress=False, stop_at=4)
    assert first.step == 4 and first.interrupted
    assert read_checkpoint(tmp_path / "split" / CHECKPOINT_FILE)["step"] == 4
    second = train(cfg, toy, tmp_path / "split", resume=True, progress=False)
    assert second.step == 8 and not second.interrupted
    a = read_checkpoint(tmp_path / "straight" / CHECKPOINT_FILE)
    b = read_checkpoint(tmp_path / "split" / CHECKPOINT_FILE)
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    oa, ob = a["train_state"]["optimizer"], b["train_state"]["optimizer"]
    for pid, state in oa["state"].items():
        assert torch.equal(state["exp_avg_sq"], ob["state"][pid]["exp_avg_sq"])
        assert torch.equal(state["step"], ob["state"][pid]["step"])
    assert a["train_state"]["scheduler"] == b["train_state"]["scheduler"]
    assert a["train_state"]["ema"] == b["train_state"]["ema"]
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (tmp_path / "split" / METRICS_FILE).read_text().splitlines()]
    assert steps == [2, 4, 6, 8]                                                     # metrics continue, no duplicates


def test_resume_refuses_another_dataset(toy, tmp_path):
    cfg = load_config(None, FAST + ["train.steps=4"])
    train(cfg, toy, tmp_path, progress=False, stop_at=2)
    other = bimodal_dataset(tmp_path / "other.zarr", n_episodes=4, length=20, seed=1)
    with pytest.raises(ValueError, match="not the one the checkpoint was trained on"):
        train(cfg, other, tmp_path, resume=True, progress=False)


def test_resume_refuses_another_policy_and_names_the_fields(toy, tmp_path):
    cfg = load_config(None, FAST + ["train.steps=4"])
    train(cfg, toy, tmp_path, progress=False, stop_at=2)
    other = load_config(None, FAST + ["train.steps=4", "policy.horizon=8", "policy.prefix_max=2"])
    with pytest.raises(ConfigError, match=r"policy.horizon \(16 in the checkpoint, 8 now\); "
                                          r"policy.prefix_max \(3 in the checkpoint, 2 now\)"):
        train(other, toy, tmp_path, resume=True, progress=False)


def test_a_fresh_run_never_replaces_a_saved_one(toy, tmp_path):
    cfg = load_config(None, FAST + ["train.steps=2"])
    train(cfg, toy, tmp_path, progress=False)
    before = (tmp_path / CHECKPOINT_FILE).read_bytes(), (tmp_path / METRICS_FILE).read_text()
    with pytest.raises(ConfigError, match="already holds a training run"):
        train(cfg, toy, tmp_path, progress=False)
    assert ((tmp_path / CHECKPOINT_FILE).read_bytes(), (tmp_path / METRICS_FILE).read_text()) == before


def test_resume_after_a_crash_mid_log_line(toy, tmp_path):
    """A process killed while appending to metrics.jsonl leaves a torn last line; resume drops it."""
    cfg = load_config(None, FAST + ["train.steps=6", "train.ckpt_every=2"])
    train(cfg, toy, tmp_path, progress=False, stop_at=4)
    metrics = tmp_path / METRICS_FILE
    metrics.write_text(metrics.read_text() + '{"step": 6, "loss": 0.')
    assert train(cfg, toy, tmp_path, resume=True, progress=False).step == 6
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [2, 4, 6]


def test_a_save_that_fails_midway_leaves_the_saved_checkpoint(toy, tmp_path):
    cfg = load_config(None, FAST + ["train.steps=2"])
    train(cfg, toy, tmp_path, progress=False)
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()
    payload = read_checkpoint(tmp_path / CHECKPOINT_FILE)
    with pytest.raises(Exception):
        save_checkpoint(tmp_path / CHECKPOINT_FILE, {**payload, "metrics": {"loss": lambda: 0}})  # unpicklable, late
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []   # no temporary left


def test_damaged_checkpoints_are_refused(toy, tmp_path):
    cfg = load_config(None, FAST + ["train.steps=2"])
    train(cfg, toy, tmp_path, progress=False)
    good = (tmp_path / CHECKPOINT_FILE).read_bytes()
    cases = {
        "truncated.pt": good[: len(good) // 2],
        "garbage.pt": os.urandom(4096),
        "empty.pt": b"",
        "tensor.pt": None,
    }
    flipped = bytearray(good)
    # Flip bytes inside the largest stored tensor (the zip keeps data uncompressed).
    payload = read_checkpoint(tmp_path / CHECKPOINT_FILE)
    biggest = max(payload["model"].values(), key=lambda v: v.numel())
    needle = biggest.contiguous().view(torch.uint8).numpy().tobytes()[:64]
    at = good.find(needle)
    assert at > 0
    flipped[at + 10] ^= 0xFF
    cases["bitflip.pt"] = bytes(flipped)
    for name, data in cases.items():
        path = tmp_path / name
        if data is None:
            torch.save({"format": "something else", "weights": torch.zeros(3)}, path)
        else:
            path.write_bytes(data)
        with pytest.raises(CheckpointError, match=str(path.name)):
            load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def train_cli(toy: Path, out: Path, *extra: str, config: str | None = "lift_state_small", steps: int = 2) -> int:
    argv = ["train", "--dataset", str(toy), "--out", str(out), "--quiet"]
    if config:
        argv += ["--config", config]
    return main(argv + [*extra, "--set", *FAST, *CLI, f"train.steps={steps}"])


def saved(out: Path) -> tuple[bytes, str]:
    return (out / CHECKPOINT_FILE).read_bytes(), (out / METRICS_FILE).read_text()


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(toy, out, steps=3) == 0
    before = saved(out)
    capsys.readouterr()
    assert train_cli(toy, out, steps=2) == 2
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "step 3" in err and "--resume" in err
    assert "Traceback" not in err
    assert saved(out) == before                                 # nothing the user made is lost


def test_resume_with_another_config_names_the_fields_that_differ(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(toy, out, steps=2) == 0
    before = saved(out)
    capsys.readouterr()
    # lift_state_transformer differs from lift_state_small in policy.model (FAST sets the rest alike).
    assert train_cli(toy, out, "--resume", config="lift_state_transformer", steps=4) == 2
    err = capsys.readouterr().err
    assert "policy.model" in err and "'unet'" in err and "'transformer'" in err
    assert "policy.preset" not in err                           # only the fields that differ
    assert saved(out) == before
    # Without --config the checkpoint's own config is resumed (--set may add steps).
    assert train_cli(toy, out, "--resume", config=None, steps=4) == 0
    assert read_checkpoint(out / CHECKPOINT_FILE)["step"] == 4


def test_resume_of_a_finished_run_says_so_and_changes_nothing(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(toy, out, steps=2) == 0
    before = saved(out)
    capsys.readouterr()
    assert train_cli(toy, out, "--resume", steps=2) == 0
    captured = capsys.readouterr()
    assert "already complete at step 2" in captured.out and "nothing was done" in captured.out
    assert "train.steps" in captured.out                        # how to train further
    assert "Traceback" not in captured.err
    assert saved(out) == before


def test_no_progress_prints_the_log_lines(toy, tmp_path, capsys):
    assert train_cli(toy, tmp_path / "run", steps=3) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("loss" in line and "lr" in line for line in lines)


def test_a_dataset_without_attrs_points_at_describe_and_the_config(toy, tmp_path, capsys):
    import shutil
    foreign = tmp_path / "foreign.zarr"
    shutil.copytree(toy, foreign)
    (foreign / ".zattrs").write_text(json.dumps({}))            # as Diffusion Policy's own stores are
    assert ReplayBuffer.open(foreign).attrs is None
    assert train_cli(foreign, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "dpstack data describe" in err and "data.control_hz" in err and "docs/datasets.md" in err
    assert "set_attrs" not in err and "Traceback" not in err


@pytest.mark.slow
def test_sigint_saves_a_resumable_checkpoint(toy, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dpstack.policy.train_cli", "--config", "lift_state_small", "--dataset", str(toy),
           "--out", str(out), "--no-progress", "--set", *FAST, "policy.obs_keys=[pos]", "train.steps=100000",
           "train.log_every=1", "train.ckpt_every=100000"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / METRICS_FILE
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    saved = read_checkpoint(out / CHECKPOINT_FILE)
    assert saved["step"] >= 2 and "--resume" in err
    # And it continues from there.
    rc = subprocess.run(cmd[:-3] + [f"train.steps={saved['step'] + 2}", "train.log_every=1"] + ["--resume"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr
    assert read_checkpoint(out / CHECKPOINT_FILE)["step"] == saved["step"] + 2
