"""Exported policy packages: a directory with manifest.json, encoder.onnx and denoiser.onnx.

The encoder comes in one of two forms (manifest "encoder_form"):
- "window" (state policies, and every package from before the field existed): the
  normalised observation window {key: (B, To, *shape)} -> cond (B, C).
- "step" (image policies): one step {key: (B, *shape)} -> features (B, step_dim), camera
  frames as the robot sends them (uint8 HWC at the camera's size; scaling, crop and layout
  happen inside the graph), low-dimensional keys normalised. cond is the time-major
  concatenation of To steps' features, so a runner keeps the features of earlier steps
  (`PolicyPackage.encode_step`) and encodes only the newest frame.

The manifest carries everything the runtime needs besides the two networks:
the RobotSpec, normaliser statistics, noise schedule, horizons, the regimes the
model was trained with, what bare `rti` means for it ("sampler_defaults", optional),
and the sha256 of each ONNX file. Loading refuses a
package whose files were changed, whose format is unknown, or whose spec does
not fit the robot it is asked to serve; the error says what differs.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dpstack.core.normalizer import Normalizer
from dpstack.runtime.samplers import DEFAULT_RTI, Denoise, TrainedRegimes, rti_list
from dpstack.core.schedule import NoiseSchedule
from dpstack.core.spec import RobotSpec

FORMAT = "dpstack-policy"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST = "manifest.json"
ENCODER_FILE = "encoder.onnx"
DENOISER_FILE = "denoiser.onnx"
WINDOW_FORM, STEP_FORM = "window", "step"  # manifest "encoder_form"
DENOISER_INPUTS = ("x", "t", "cond")  # (B, Tp, A), (B, Tp) int64, (B, C): the names the export gives them
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
GPU_HINT = ("for a GPU, install dpstack[gpu] (onnxruntime-gpu, in place of onnxruntime) on a machine with an NVIDIA "
            "GPU, CUDA and cuDNN (TensorRT too for its provider)")
# What the runtime writes for a package (the TensorRT engine cache) lives in this folder of it.
RUN_DIR = "run"

log = logging.getLogger(__name__)

Encode = Callable[[Mapping[str, np.ndarray]], np.ndarray]
# One step per row: {key: (N, *shape)} (images uint8, the rest normalised) -> (N, step_dim).
EncodeStep = Callable[[Mapping[str, np.ndarray]], np.ndarray]


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
    """TensorRT, then CUDA, then CPU: whichever this onnxruntime build offers (or `requested`, if available).
    A requested provider this build lacks is left out (`missing_providers` says so); with none left, the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = list(requested) if requested else list(PREFERRED_PROVIDERS)
    chosen = [p for p in wanted if p in available]
    if not chosen:
        if CPU_PROVIDER not in available:
            raise PackageError(f"none of the providers {wanted} is available; onnxruntime offers {available}")
        chosen = [CPU_PROVIDER]
    return chosen


def missing_providers(wanted: Sequence[str], available: Sequence[str]) -> str | None:
    """A sentence naming the wanted providers that `available` lacks (and how to get the GPU
    ones), or None."""
    missing = [p for p in wanted if p not in available]
    if not missing:
        return None
    hint = f"; {GPU_HINT}" if set(missing) & set(GPU_PROVIDERS) else ""
    return (f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not available in this onnxruntime "
            f"(it offers {', '.join(available)}){hint}")


@dataclass(frozen=True)
class SessionOptions:
    intra_op_threads: int = 2
    inter_op_threads: int = 1
    providers: tuple[str, ...] = ()   # empty = the preferred order above
    # Worker threads spin between ops: lowest latency on a quiet machine, much worse when
    # the cores are oversubscribed (measured on the shared 2-core box); turn off there.
    spin: bool = True
    # GPU providers (ignored on the CPU):
    device_id: int = 0
    trt_fp16: bool = True              # TensorRT may run layers in fp16
    trt_cache_dir: str | None = None   # TensorRT engines and timing cache; None: <package>/run/tensorrt
    max_batch: int = 32                # TensorRT optimisation profile: batches 1..max_batch (the server's sessions),
    opt_batch: int = 8                 # tuned for this one


def provider_options(provider: str, options: SessionOptions, cache_dir: Path | None,
                     shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, str]:
    """onnxruntime options for one execution provider. TensorRT: fp16, an engine and timing
    cache in `cache_dir` (built once, minutes for a large net, then loaded), and with `shapes`
    (input name -> shape without the batch) one optimisation profile for batches 1..max_batch,
    so a batch size the server has not run yet does not rebuild the engine. CUDA: the device
    and copies on the compute stream."""
    if provider == "TensorrtExecutionProvider":
        o = {"device_id": str(options.device_id), "trt_fp16_enable": str(options.trt_fp16)}
        if cache_dir is not None:
            o.update(trt_engine_cache_enable="True", trt_engine_cache_path=str(cache_dir),
                     trt_timing_cache_enable="True", trt_timing_cache_path=str(cache_dir))
        if shapes:
            def profile(batch: int) -> str:
                return ",".join(f"{name}:{'x'.join(str(d) for d in (batch, *shape))}" for name, shape in shapes.items())
            o.update(trt_profile_min_shapes=profile(1), trt_profile_opt_shapes=profile(min(options.opt_batch, options.max_batch)),
                     trt_profile_max_shapes=profile(options.max_batch))
        return o
    if provider == "CUDAExecutionProvider":
        return {"device_id": str(options.device_id), "do_copy_in_default_stream": "1"}
    return {}


def make_session(path: str | Path, options: SessionOptions = SessionOptions(),
                 shapes: Mapping[str, tuple[int, ...]] | None = None):
    """An onnxruntime session for one network; `shapes` (input name -> shape without the
    batch) sets TensorRT's optimisation profile. A GPU provider that is offered but cannot
    start (CUDA or cuDNN libraries missing) leaves the session on the CPU (`gpu_fallback`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not options.spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # TensorRT/CUDA fallbacks are expected on CPU machines
    providers = choose_providers(options.providers)
    cache = Path(options.trt_cache_dir) if options.trt_cache_dir else Path(path).parent / RUN_DIR / "tensorrt"
    if "TensorrtExecutionProvider" in providers:
        cache.mkdir(parents=True, exist_ok=True)
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=providers,
                                       provider_options=[provider_options(p, options, cache, shapes) for p in providers])
    except PackageError:
        raise
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise PackageError(f"{path}: onnxruntime cannot load it: {str(e).splitlines()[0]}") from None
    return session


def provider_problem(options: SessionOptions, session_providers: Sequence[str]) -> str | None:
    """One sentence when the providers asked for in `options` are not what a session runs on
    (this onnxruntime lacks them, or a GPU provider it offers did not start), else None."""
    import onnxruntime as ort

    if not options.providers:
        return None  # the preferred order: the CPU is expected on a CPU machine
    runs_on = f"it runs on {', '.join(session_providers)}"
    why = missing_providers(options.providers, ort.get_available_providers())
    if why:
        return f"{runs_on}: {why}"
    gpu = [p for p in options.providers if p in GPU_PROVIDERS]
    if gpu and gpu[0] not in session_providers:
        return (f"{runs_on}: {gpu[0]} is in this onnxruntime but did not start (CUDA, cuDNN or TensorRT libraries "
                f"missing, or no GPU); {GPU_HINT}")
    return None


def onnx_encoder(session, obs_keys: Sequence[str], input_names: Sequence[str]) -> Encode:
    """Numpy callable: {key: (B, To, *shape)} (or (N, *shape) for a step encoder) -> its output.
    Each input goes in at the dtype the graph declares (uint8 camera frames, float32 otherwise)."""
    names = dict(zip(obs_keys, input_names))
    dtypes = {i.name: np.uint8 if i.type == "tensor(uint8)" else np.float32 for i in session.get_inputs()}
    out = session.get_outputs()[0].name

    def encode(obs: Mapping[str, np.ndarray]) -> np.ndarray:
        return session.run([out], {names[k]: np.ascontiguousarray(obs[k], dtype=dtypes[names[k]]) for k in obs_keys})[0]
    return encode


def window_from_steps(encode_step: EncodeStep, obs_keys: Sequence[str]) -> Encode:
    """The window encoder of a step encoder: every step of {key: (B, To, *shape)} in one call,
    concatenated time-major -> (B, To * step_dim)."""
    def encode(obs: Mapping[str, np.ndarray]) -> np.ndarray:
        B, To = np.shape(obs[obs_keys[0]])[:2]
        flat = {k: np.reshape(obs[k], (B * To, *np.shape(obs[k])[2:])) for k in obs_keys}
        return np.asarray(encode_step(flat)).reshape(B, -1)
    return encode


def batch_limit(session) -> int:
    """Rows the session's first input takes per call: 0 for a dynamic batch axis, else its fixed size."""
    first = session.get_inputs()[0].shape[0]
    return first if isinstance(first, int) and first > 0 else 0


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
    comparisons) while keeping everything else. `encode` takes the window {key: (B, To,
    *shape)}: camera frames uint8 as the robot sends them, the other keys normalised.
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
    max_batch: int = 0   # rows one denoiser call takes: 0 = any (dynamic batch), 1 = a package exported at batch 1
    encode_step: EncodeStep | None = None  # a step-form encoder: one step's features, for a runner's feature cache

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

    def with_backend(self, encode: Encode, denoise: Denoise, providers: tuple[str, ...] = (),
                     encode_step: EncodeStep | None = None) -> "PolicyPackage":
        return replace(self, encode=encode, denoise=denoise, providers=providers, encode_step=encode_step)


def describe(manifest: Mapping[str, Any], serves: RobotSpec | None = None) -> tuple[RobotSpec, Normalizer, NoiseSchedule, TrainedRegimes]:
    """The plain-data half of a package (no onnxruntime), checked against the robot it should serve."""
    spec = RobotSpec.from_dict(manifest["spec"])
    if serves is not None:
        spec.check_serves(serves)  # raises SpecMismatch naming the differing fields
    normalizer = Normalizer.from_dict(manifest["normalizer"])
    for key in (*manifest["obs_keys"], spec.action.key):
        normalizer[key]  # raises KeyError naming a missing key
    regimes = manifest.get("regimes", {})
    schedule = NoiseSchedule.from_dict(manifest["schedule"])
    rti = (manifest.get("sampler_defaults") or {}).get("rti") or DEFAULT_RTI
    try:
        rti = rti_list(rti, schedule.num_train_steps)
    except ValueError as e:
        raise PackageError(f"manifest sampler_defaults.rti: {e}") from None
    trained = TrainedRegimes(horizon=int(manifest["horizon"]), n_obs_steps=int(manifest["n_obs_steps"]),
                             n_action_steps=int(manifest["n_action_steps"]),
                             ladder_rungs=int(regimes.get("ladder_rungs", 0) or 0),
                             ladder_chunk_len=int(regimes.get("ladder_chunk_len", 0) or 0),
                             gripper_scale=float(regimes.get("gripper_scale", 1.0)),
                             gripper_dims=spec.action.gripper_dims, rti_default=rti)
    return spec, normalizer, schedule, trained


def load_package(policy_dir: str | Path, serves: RobotSpec | None = None,
                 options: SessionOptions = SessionOptions()) -> PolicyPackage:
    """Load and check a package; `serves` is the robot's spec (None: skip that check)."""
    policy_dir = Path(policy_dir)
    manifest = read_manifest(policy_dir)
    verify_files(policy_dir, manifest)
    spec, normalizer, schedule, trained = describe(manifest, serves)
    obs_keys = tuple(manifest["obs_keys"])
    form = encoder_form(policy_dir, manifest, spec)
    names = manifest.get("encoder_inputs")
    window = (trained.n_obs_steps,) if form == WINDOW_FORM else ()
    enc_shapes = dict(zip(names, ((*window, *spec.obs(k).shape) for k in obs_keys))) if names else None
    enc = make_session(policy_dir / ENCODER_FILE, options, enc_shapes)
    den_shapes = None
    if "cond_dim" in manifest:
        den_shapes = dict(zip(DENOISER_INPUTS, ((trained.horizon, spec.action.dim), (trained.horizon,),
                                                (int(manifest["cond_dim"]),))))
    den = make_session(policy_dir / DENOISER_FILE, options, den_shapes)
    input_names = names or [i.name for i in enc.get_inputs()]
    problem = provider_problem(options, den.get_providers())
    if problem:
        log.warning("%s: %s", policy_dir, problem)
    if len(input_names) != len(obs_keys):
        raise PackageError(f"{policy_dir}: encoder has inputs {input_names} for observation keys {list(obs_keys)}")
    encode = onnx_encoder(enc, obs_keys, input_names)
    step = encode if form == STEP_FORM else None
    return PolicyPackage(manifest=manifest, spec=spec, normalizer=normalizer, schedule=schedule, obs_keys=obs_keys,
                         trained=trained, encode=window_from_steps(step, obs_keys) if step else encode,
                         denoise=onnx_denoiser(den), path=policy_dir, providers=tuple(den.get_providers()),
                         max_batch=batch_limit(den), encode_step=step)


def encoder_form(policy_dir: Path, manifest: Mapping[str, Any], spec: RobotSpec) -> str:
    """The package's encoder form; an image policy from before step encoders is refused."""
    form = manifest.get("encoder_form", WINDOW_FORM)
    if form not in (WINDOW_FORM, STEP_FORM):
        raise PackageError(f"{policy_dir}: encoder_form {form!r} is unknown; this runtime reads {WINDOW_FORM!r} and {STEP_FORM!r}")
    if form == WINDOW_FORM and any(spec.obs(k).is_image for k in manifest["obs_keys"]):
        raise PackageError(f"{policy_dir}: this image policy was exported before encoders took uint8 camera frames; "
                           "re-export it from its checkpoint with `dpstack export`")
    return form
