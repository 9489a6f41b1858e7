"""Test helpers for the data tests: a small robomimic-layout HDF5 file written with h5py."""
import json

import h5py
import numpy as np

LENGTHS = {"demo_0": 6, "demo_1": 9, "demo_2": 4, "demo_10": 7}
ENV_ARGS = {"env_name": "Lift", "type": 1,
            "env_kwargs": {"robots": ["Panda"], "control_freq": 20, "has_renderer": False,
                           "controller_configs": {"type": "OSC_POSE"}}}


def write_robomimic(path, lengths=LENGTHS, env_args=ENV_ARGS):
    rng = np.random.default_rng(0)
    demos = {}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        if env_args is not None:
            data.attrs["env_args"] = json.dumps(env_args)
        for i, (name, T) in enumerate(lengths.items()):  # written in string-sorted-unfriendly order
            g = data.create_group(name)
            acts = rng.uniform(-1, 1, size=(T, 7))
            acts[:, 6] = rng.choice([-1.0, 1.0], size=T)
            obs = {"robot0_eef_pos": rng.normal(size=(T, 3)) + 100 * i,
                   "object": rng.normal(size=(T, 10)),
                   "agentview_image": rng.integers(0, 255, size=(T, 16, 16, 3), dtype=np.uint8)}
            for k, v in obs.items():
                g.create_dataset(f"obs/{k}", data=v)
            g.create_dataset("actions", data=acts)
            g.create_dataset("rewards", data=np.arange(T, dtype=np.float64) == T - 1)
            g.create_dataset("dones", data=(np.arange(T) == T - 1).astype(np.int64))
            g.attrs["num_samples"] = T
            demos[name] = {**obs, "action": acts}
    return demos
