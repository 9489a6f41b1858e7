"""Test helpers for the data tests: a small robomimic-layout HDF5 file written with h5py, and a
store in Diffusion Policy's zarr layout written with zarr's format-2 API."""
import json

import h5py
import numcodecs
import numpy as np
import zarr

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


def build_dp_store(store, lengths, compressor=True):
    """A store in Diffusion Policy's layout, written with zarr's format-2 API, no dpstack attrs."""
    root = zarr.open_group(store, mode="w", zarr_format=2)
    data, meta = root.create_group("data"), root.create_group("meta")
    n = int(sum(lengths))
    rng = np.random.default_rng(7)
    arrays = {"state": rng.normal(size=(n, 5)).astype(np.float32),
              "action": rng.normal(size=(n, 2)).astype(np.float32),
              "img": rng.integers(0, 255, size=(n, 6, 6, 3), dtype=np.uint8)}
    comp = numcodecs.Blosc(cname="lz4") if compressor else None
    for k, v in arrays.items():
        a = data.create_array(name=k, shape=v.shape, chunks=(7,) + v.shape[1:], dtype=v.dtype, compressors=comp)
        a[:] = v
    e = meta.create_array(name="episode_ends", shape=(len(lengths),), chunks=(2,), dtype=np.int64,
                          compressors=comp)
    e[:] = np.cumsum(lengths)
    return arrays
