"""A tiny hand-built policy package (ONNX graphs from onnx.helper, no torch) for runtime tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dpstack.core.normalizer import Normalizer
from dpstack.runtime.package import DENOISER_FILE, ENCODER_FILE, FORMAT, FORMAT_VERSION, MANIFEST, sha256_file
from dpstack.core.schedule import NoiseSchedule
from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec

TP, TO, TA, A, C = 8, 2, 4, 3, 6
SPEC = RobotSpec("reach", "TinyArm", 10.0, (ArraySpec("pos", (2,)), ArraySpec("vel", (2,))),
                 ActionSpec(shape=(A,), gripper_dims=(2,), low=(-2.0, -2.0, -1.0), high=(2.0, 2.0, 1.0)))


def _encoder(rng: np.random.Generator) -> onnx.ModelProto:
    # cond = concat(flatten(pos), flatten(vel)) @ W: linear, so tests can see which window went in
    w = numpy_helper.from_array(rng.standard_normal((TO * 4, C)).astype(np.float32), "W")
    nodes = [helper.make_node("Flatten", ["obs_pos"], ["fp"], axis=1), helper.make_node("Flatten", ["obs_vel"], ["fv"], axis=1),
             helper.make_node("Concat", ["fp", "fv"], ["f"], axis=1), helper.make_node("MatMul", ["f", "W"], ["cond"])]
    graph = helper.make_graph(nodes, "encoder", [helper.make_tensor_value_info("obs_pos", TensorProto.FLOAT, ["B", TO, 2]),
                                                 helper.make_tensor_value_info("obs_vel", TensorProto.FLOAT, ["B", TO, 2])],
                              [helper.make_tensor_value_info("cond", TensorProto.FLOAT, ["B", C])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _denoiser(rng: np.random.Generator) -> onnx.ModelProto:
    # eps = 0.5 x + 0.001 t + (cond @ Wc) broadcast over the horizon
    inits = [numpy_helper.from_array(rng.standard_normal((C, A)).astype(np.float32) * 0.3, "Wc"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half"), numpy_helper.from_array(np.array(0.001, np.float32), "milli"),
             numpy_helper.from_array(np.array([-1], np.int64), "last"), numpy_helper.from_array(np.array([1], np.int64), "one")]
    nodes = [helper.make_node("Mul", ["x", "half"], ["hx"]),
             helper.make_node("Cast", ["t"], ["tf"], to=TensorProto.FLOAT), helper.make_node("Mul", ["tf", "milli"], ["ts"]),
             helper.make_node("Unsqueeze", ["ts", "last"], ["tu"]), helper.make_node("MatMul", ["cond", "Wc"], ["cw"]),
             helper.make_node("Unsqueeze", ["cw", "one"], ["cu"]), helper.make_node("Add", ["hx", "tu"], ["s"]),
             helper.make_node("Add", ["s", "cu"], ["eps"])]
    graph = helper.make_graph(nodes, "denoiser", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", TP, A]),
                                                  helper.make_tensor_value_info("t", TensorProto.INT64, ["B", TP]),
                                                  helper.make_tensor_value_info("cond", TensorProto.FLOAT, ["B", C])],
                              [helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["B", TP, A])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def write_tiny_package(out: Path, seed: int = 0, **manifest_over) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    onnx.save(_encoder(rng), out / ENCODER_FILE)
    onnx.save(_denoiser(rng), out / DENOISER_FILE)
    data = {"pos": rng.uniform(-1, 1, (50, 2)), "vel": rng.uniform(-3, 3, (50, 2)),
            "action": np.concatenate([rng.uniform(-2, 2, (50, 2)), rng.choice([-1.0, 1.0], (50, 1))], axis=1)}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "task": SPEC.task, "robot": SPEC.robot,
                "control_hz": SPEC.control_hz, "spec": SPEC.to_dict(), "obs_keys": ["pos", "vel"],
                "encoder_inputs": ["obs_pos", "obs_vel"], "cond_dim": C, "normalizer": Normalizer.fit(data).to_dict(),
                "schedule": NoiseSchedule().to_dict(), "horizon": TP, "n_obs_steps": TO, "n_action_steps": TA,
                "regimes": {"ladder_rungs": 0, "gripper_scale": 1.0},
                "files": {n: {"sha256": sha256_file(out / n)} for n in (ENCODER_FILE, DENOISER_FILE)}}
    manifest.update(manifest_over)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out
