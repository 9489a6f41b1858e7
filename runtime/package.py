"""Exported policy packages: a directory with manifest.json, encoder.onnx and denoiser.onnx.

The manifest carries everything the runtime needs besides the two networks:
the RobotSpec, normaliser statistics, noise schedule, horizons, the regimes the
model was trained with, and the sha256 of each ONNX file. Loading refuses a
package whose files were changed, whose format is unknown, or whose spec does
not fit the robot it is asked to serve; the error says what differs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dpstack.core.normalizer import Normalizer
from dpstack.runtime.samplers import Denoise, TrainedRegimes
from dpstack.core.schedule import NoiseSchedule
from dpstack.core.spec import RobotSpec

FORMAT = "dpstack-policy"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST = "manifest.json"
ENCODER_FILE = "encoder.onnx"
DENOISER_FILE = "denoiser.onnx"
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

Encode = Callable[[Mapping[str, np.ndarray]], np.ndarray]


class PackageError(ValueError):
    """A policy package cannot be used; the message says why."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(policy_dir: str | Path) -> dict[str, Any]:
    path = Path(policy_dir) / MANIFEST
    if not path.is_file():
        raise PackageError(f"{policy_dir}: no {MANIFEST}; not a policy package")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PackageError(f"{path}: invalid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise PackageError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    version = manifest.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise PackageError(f"{path}: format_version {version!r} is not supported; this runtime reads {list(SUPPORTED_VERSIONS)}")
    for key in ("spec", "normalizer", "schedule", "horizon", "n_obs_steps", "n_action_steps", "obs_keys", "files"):
        if key not in manifest:
            raise PackageError(f"{path}: manifest is missing {key!r}")
    return manifest


def verify_files(policy_dir: str | Path, manifest: Mapping[str, Any]) -> None:
    """Raise PackageError unless every file listed in the manifest exists with its recorded sha256."""
    for name in (ENCODER_FILE, DENOISER_FILE):
        if name not in manifest["files"]:
            raise PackageError(f"{policy_dir}: manifest lists no {name}")
    for name, info in manifest["files"].items():
        path = Path(policy_dir) / name
        if not path.is_file():
            raise PackageError(f"{path}: missing (listed in the manifest)")
        digest = sha256_file(path)
        if digest != info.get("sha256"):
            raise PackageError(f"{path}: sha256 {digest[:16]}... does not match the manifest's "
                               f"{str(info.get('sha256'))[:16]}...; the file was modified or corrupted")


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """TensorRT, then CUDA, then CPU: whichever this onnxruntime build offers (or `requested`, if available)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = list(requested) if requested else list(PREFERRED_PROVIDERS)
    chosen = [p for p in wanted if p in available]
    if not chosen:
        raise PackageError(f"none of the providers {wanted} is available; onnxruntime offers {available}")
    return chosen


@dataclass(frozen=True)
class SessionOptions:
    intra_op_threads: int = 2
    inter_op_threads: int = 1
    providers: tuple[str, ...] = ()   # empty = the preferred order above
    # Worker threads spin between ops: lowest latency on a quiet machine, much worse when
    # the cores are oversubscribed (measured on the shared 2-core box); turn off there.
    spin: bool = True


def make_session(path: str | Path, options: SessionOptions = SessionOptions()):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not options.spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # TensorRT/CUDA fallbacks are expected on CPU machines
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=choose_providers(options.providers))
    except PackageError:
        raise
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise PackageError(f"{path}: onnxruntime cannot load it: {str(e).splitlines()[0]}") from None


def onnx_encoder(session, obs_keys: Sequence[str], input_names: Sequence[str]) -> Encode:
    """Numpy callable: normalised {key: (B, To, *shape)} -> cond (B, C)."""
    names = dict(zip(obs_keys, input_names))
    out = session.get_outputs()[0].name

    def encode(obs: Mapping[str, np.ndarray]) -> np.ndarray:
        return session.run([out], {names[k]: np.ascontiguousarray(obs[k], dtype=np.float32) for k in obs_keys})[0]
    return encode


def onnx_denoiser(session) -> Denoise:
    """Numpy callable: (x (B,Tp,A), t (B,Tp) int64, cond (B,C)) -> eps (B,Tp,A)."""
    x_name, t_name, c_name = (i.name for i in session.get_inputs())
    out = session.get_outputs()[0].name

    def denoise(x: np.ndarray, t: np.ndarray, cond: np.ndarray) -> np.ndarray:
        return session.run([out], {x_name: np.ascontiguousarray(x, dtype=np.float32),
                                   t_name: np.ascontiguousarray(t, dtype=np.int64),
                                   c_name: np.ascontiguousarray(cond, dtype=np.float32)})[0]
    return denoise


@dataclass(frozen=True)
class PolicyPackage:
    """A loaded policy: its description plus numpy callables for the two networks.

    `with_backend(encode, denoise)` swaps the networks (e.g. the torch model, for
    comparisons) while keeping everything else.
    """

    manifest: Mapping[str, Any]
    spec: RobotSpec
    normalizer: Normalizer
    schedule: NoiseSchedule
    obs_keys: tuple[str, ...]
    trained: TrainedRegimes
    encode: Encode
    denoise: Denoise
    path: Path | None = None
    providers: tuple[str, ...] = field(default_factory=tuple)

    @property
    def horizon(self) -> int:
        return self.trained.horizon

    @property
    def n_obs_steps(self) -> int:
        return self.trained.n_obs_steps

    @property
    def n_action_steps(self) -> int:
        return self.trained.n_action_steps

    @property
    def action_dim(self) -> int:
        return self.spec.action.dim

    def with_backend(self, encode: Encode, denoise: Denoise, providers: tuple[str, ...] = ()) -> "PolicyPackage":
        return replace(self, encode=encode, denoise=denoise, providers=providers)


def describe(manifest: Mapping[str, Any], serves: RobotSpec | None = None) -> tuple[RobotSpec, Normalizer, NoiseSchedule, TrainedRegimes]:
    """The plain-data half of a package (no onnxruntime), checked against the robot it should serve."""
    spec = RobotSpec.from_dict(manifest["spec"])
    if serves is not None:
        spec.check_serves(serves)  # raises SpecMismatch naming the differing fields
    normalizer = Normalizer.from_dict(manifest["normalizer"])
    for key in (*manifest["obs_keys"], spec.action.key):
        normalizer[key]  # raises KeyError naming a missing key
    regimes = manifest.get("regimes", {})
    trained = TrainedRegimes(horizon=int(manifest["horizon"]), n_obs_steps=int(manifest["n_obs_steps"]),
                             n_action_steps=int(manifest["n_action_steps"]),
                             ladder_rungs=int(regimes.get("ladder_rungs", 0) or 0),
                             ladder_chunk_len=int(regimes.get("ladder_chunk_len", 0) or 0),
                             gripper_scale=float(regimes.get("gripper_scale", 1.0)),
                             gripper_dims=spec.action.gripper_dims)
    return spec, normalizer, NoiseSchedule.from_dict(manifest["schedule"]), trained


def load_package(policy_dir: str | Path, serves: RobotSpec | None = None,
                 options: SessionOptions = SessionOptions()) -> PolicyPackage:
    """Load and check a package; `serves` is the robot's spec (None: skip that check)."""
    policy_dir = Path(policy_dir)
    manifest = read_manifest(policy_dir)
    verify_files(policy_dir, manifest)
    spec, normalizer, schedule, trained = describe(manifest, serves)
    obs_keys = tuple(manifest["obs_keys"])
    enc = make_session(policy_dir / ENCODER_FILE, options)
    den = make_session(policy_dir / DENOISER_FILE, options)
    input_names = manifest.get("encoder_inputs") or [i.name for i in enc.get_inputs()]
    if len(input_names) != len(obs_keys):
        raise PackageError(f"{policy_dir}: encoder has inputs {input_names} for observation keys {list(obs_keys)}")
    return PolicyPackage(manifest=manifest, spec=spec, normalizer=normalizer, schedule=schedule, obs_keys=obs_keys,
                         trained=trained, encode=onnx_encoder(enc, obs_keys, input_names), denoise=onnx_denoiser(den),
                         path=policy_dir, providers=tuple(den.get_providers()))
