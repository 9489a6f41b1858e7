"""`dpstack train` through the real dispatcher: what it refuses, and what it says."""
import json
from pathlib import Path

import pytest

from _policy_data import bimodal_dataset, one_thread  # noqa: F401  (fixture)
from dpstack.cli import main
from dpstack.data.replay_buffer import ReplayBuffer
from dpstack.policy.checkpoint import read_checkpoint
from dpstack.policy.train_outputs import CHECKPOINT_FILE, METRICS_FILE

FAST = ["policy.obs_keys=[pos]", "policy.preset=test", "policy.regime_plain=0.5", "policy.regime_ladder=0.5",
        "train.batch_size=16", "train.warmup_steps=1", "train.log_every=1", "train.ckpt_every=100",
        "train.eval_every=0", "train.lr=1e-3"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return bimodal_dataset(tmp_path_factory.mktemp("data") / "toy.zarr", n_episodes=4, length=20)


def train(toy: Path, out: Path, *extra: str, config: str | None = "lift_state_small", steps: int = 2) -> int:
    argv = ["train", "--dataset", str(toy), "--out", str(out), "--quiet"]
    if config:
        argv += ["--config", config]
    return main(argv + [*extra, "--set", *FAST, f"train.steps={steps}"])


def saved(out: Path) -> tuple[bytes, str]:
    return (out / CHECKPOINT_FILE).read_bytes(), (out / METRICS_FILE).read_text()


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(toy, out, steps=3) == 0
    before = saved(out)
    capsys.readouterr()
    assert train(toy, out, steps=2) == 2
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "step 3" in err and "--resume" in err
    assert "Traceback" not in err
    assert saved(out) == before                                 # nothing the user made is lost


def test_resume_with_another_config_names_the_fields_that_differ(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(toy, out, steps=2) == 0
    before = saved(out)
    capsys.readouterr()
    # lift_state_transformer differs from lift_state_small in policy.model (FAST sets the rest alike).
    assert train(toy, out, "--resume", config="lift_state_transformer", steps=4) == 2
    err = capsys.readouterr().err
    assert "policy.model" in err and "'unet'" in err and "'transformer'" in err
    assert "policy.preset" not in err                           # only the fields that differ
    assert saved(out) == before
    # Without --config the checkpoint's own config is resumed (--set may add steps).
    assert train(toy, out, "--resume", config=None, steps=4) == 0
    assert read_checkpoint(out / CHECKPOINT_FILE)["step"] == 4


def test_resume_of_a_finished_run_says_so_and_changes_nothing(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(toy, out, steps=2) == 0
    before = saved(out)
    capsys.readouterr()
    assert train(toy, out, "--resume", steps=2) == 0
    captured = capsys.readouterr()
    assert "already complete at step 2" in captured.out and "nothing was done" in captured.out
    assert "train.steps" in captured.out                        # how to train further
    assert "Traceback" not in captured.err
    assert saved(out) == before


def test_no_progress_prints_the_log_lines(toy, tmp_path, capsys):
    assert train(toy, tmp_path / "run", steps=3) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("loss" in line and "lr" in line for line in lines)


def test_a_dataset_without_attrs_points_at_set_attrs(toy, tmp_path, capsys):
    import shutil
    foreign = tmp_path / "foreign.zarr"
    shutil.copytree(toy, foreign)
    (foreign / ".zattrs").write_text(json.dumps({}))            # as Diffusion Policy's own stores are
    assert ReplayBuffer.open(foreign).attrs is None
    assert train(foreign, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "set_attrs" in err and "docs/datasets.md" in err and "`dpstack data` first" not in err
