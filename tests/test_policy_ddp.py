"""Data-parallel training with 2 processes over gloo, as torchrun would launch it."""
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from _policy_data import bimodal_dataset
from _policy_ddp_worker import run_rank
from dpstack.policy.checkpoint import read_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_rank_gloo_run_keeps_ranks_identical(tmp_path: Path):
    data = bimodal_dataset(tmp_path / "toy.zarr", n_episodes=6, length=20)
    out = tmp_path / "run" / "out"
    overrides = ["policy.preset=test", "policy.regime_ladder=0.5", "train.steps=6", "train.batch_size=16",
                 "train.warmup_steps=2", "train.log_every=2", "train.ckpt_every=3", "train.lr=1e-3", "train.device=cpu", "train.track=tensorboard"]
    mp.spawn(run_rank, args=(2, free_port(), str(data), str(out), overrides), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "run" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "run" / "rank1.pt", weights_only=True)
    assert r0["step"] == r1["step"] == 6
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), k
    # Only rank 0 wrote, and what it wrote is the shared final state.
    ckpt = read_checkpoint(out / "last.pt")
    assert ckpt["step"] == 6
    for k, v in ckpt["model"].items():
        assert torch.equal(v, r0["weights"][k]), k
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "last.pt", "loss.png", "metrics.jsonl", "tensorboard"]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0's tracker only
    # The EMA (deployed) weights lag the raw ones; both were saved.
    assert any(not torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["model"])
