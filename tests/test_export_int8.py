"""`dpstack export --weights int8`: MatMul weights quantized, its own parity tolerance,
recorded in the manifest, re-checked by --verify, and samples close to the float package."""
import json
import logging

import numpy as np
import onnx
import pytest
import torch

from dpstack.policy.checkpoint import build_payload, save_checkpoint
from dpstack.policy.config import Config, PolicyConfig
from dpstack.policy.export import ExportError, verify_package
from dpstack.policy.model import DiffusionPolicyModel
from dpstack.policy.quantize import QUANT_TOLERANCE
from dpstack.cli import main as dpstack
from dpstack.core.normalizer import Normalizer
from dpstack.runtime.package import SessionOptions, load_package
from dpstack.runtime.policy import PolicyRunner
from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec

logging.getLogger("torch.onnx").setLevel(logging.ERROR)

SPEC = RobotSpec("lift", "Panda", 20.0, (ArraySpec("eef_pos", (3,)), ArraySpec("object", (5,))),
                 ActionSpec(shape=(7,), gripper_dims=(6,), low=(-1,) * 7, high=(1,) * 7))
CPU = SessionOptions(providers=("CPUExecutionProvider",), intra_op_threads=1)


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """One transformer checkpoint (its layers export as MatMul) exported as fp32 and as int8."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    norm = Normalizer.fit({"eef_pos": rng.normal(size=(64, 3)), "object": rng.normal(size=(64, 5)),
                           "action": np.concatenate([rng.uniform(-1, 1, (64, 6)), rng.choice([-1.0, 1.0], (64, 1))], 1)})
    model = DiffusionPolicyModel(PolicyConfig(model="transformer", preset="test", n_action_steps=4), SPEC, norm).eval()
    root = tmp_path_factory.mktemp("int8")
    ckpt = save_checkpoint(root / "ckpt.pt", build_payload(model, model.state_dict(), Config(policy=model.config), 3, {"fingerprint": "f"}))
    assert dpstack(["export", str(ckpt), "--out", str(root / "fp32")]) == 0
    assert dpstack(["export", str(ckpt), "--out", str(root / "int8"), "--weights", "int8"]) == 0
    return ckpt, root / "fp32", root / "int8"


def test_matmul_weights_are_8_bit_and_the_manifest_says_so(packages):
    _, fp32, int8 = packages
    graph = onnx.load(str(int8 / "denoiser.onnx")).graph
    ops = [n.op_type for n in graph.node]
    constants = {i.name for i in graph.initializer}
    assert ops.count("MatMulNBits") >= 4
    assert not [n for n in graph.node if n.op_type == "MatMul" and any(i in constants for i in n.input)]
    assert (int8 / "denoiser.onnx").stat().st_size < 0.6 * (fp32 / "denoiser.onnx").stat().st_size
    export = json.loads((int8 / "manifest.json").read_text())["export"]
    assert export["weights"] == "int8" and export["quantization"]["bits"] == 8
    assert export["parity_tolerance"] == QUANT_TOLERANCE
    assert 0 < export["parity_max_abs_error"]["denoiser"] < QUANT_TOLERANCE
    assert json.loads((fp32 / "manifest.json").read_text())["export"]["weights"] == "fp32"


def test_verify_uses_the_packages_own_tolerance_and_a_tight_one_refuses(packages):
    ckpt, _, int8 = packages
    assert verify_package(int8, ckpt)["parity"]["denoiser"] < QUANT_TOLERANCE
    with pytest.raises(ExportError, match="differs"):
        verify_package(int8, ckpt, tolerance=1e-4)


def test_int8_samples_stay_close_to_the_float_package(packages):
    _, fp32, int8 = packages
    obs = {"eef_pos": np.array([0.1, -0.2, 0.3], np.float32), "object": np.zeros(5, np.float32)}
    chunks = []
    for pdir in (fp32, int8):
        runner = PolicyRunner(load_package(pdir, options=CPU), "ddim-10")
        runner.reset(seed=5)
        chunks.append(runner.act(obs).actions)
    diff = np.abs(chunks[0] - chunks[1])
    assert diff.max() < 0.1, diff
