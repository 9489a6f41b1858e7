"""The files `dpstack train --out DIR` writes into DIR.

Kept apart from train.py and checkpoint.py so that what only looks for these files
(the demo's stages, the command line's help) does not import torch.
"""
CHECKPOINT_FILE = "last.pt"      # policy/checkpoint.py's format, replaced atomically at every save
METRICS_FILE = "metrics.jsonl"   # one JSON line per logged step
LOSS_PLOT_FILE = "loss.png"
CONFIG_FILE = "config.json"      # the resolved Config, for reading; --resume uses the checkpoint's copy
