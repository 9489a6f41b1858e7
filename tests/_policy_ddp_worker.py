"""Worker for the 2-process gloo test (spawned; must be importable by path)."""
from __future__ import annotations

import os
from pathlib import Path


def run_rank(rank: int, world: int, port: int, dataset: str, out: str, overrides: list[str]) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from dpstack.policy.config import load_config
    from dpstack.policy.train import train

    result = train(load_config(None, overrides), dataset, out, progress=False)
    weights = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
    torch.save({"step": result.step, "weights": weights}, Path(out).parent / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()
