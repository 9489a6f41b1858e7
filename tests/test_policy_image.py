"""Image policies: DP's crop (random in training, centre at inference), the uint8 HWC step
encoder in the exported graph and its parity on camera-like frames, the runner's feature
cache against whole-window encoding, and old image packages refused with one sentence."""
import json
import logging

import numpy as np
import pytest
import torch

from dpstack.core.normalizer import Normalizer
from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec
from dpstack.policy.config import ConfigError, PolicyConfig, load_config
from dpstack.policy.export import export_model
from dpstack.policy.model import DiffusionPolicyModel
from dpstack.policy.nets.encoders import CropRandomizer
from dpstack.policy.torch_callables import torch_callables
from dpstack.runtime.package import MANIFEST, PackageError, SessionOptions, load_package, sha256_file
from dpstack.runtime.policy import PolicyRunner
from dpstack.runtime.verify import camera_frames, verify_onnx_only

logging.getLogger("torch.onnx").setLevel(logging.ERROR)
HW = 64
SPEC = RobotSpec("lift", "Panda", 20.0,
                 (ArraySpec("agentview_image", (HW, HW, 3), "uint8"), ArraySpec("wrist_image", (HW, 72, 3), "uint8"),
                  ArraySpec("eef_pos", (3,))),
                 ActionSpec(shape=(7,), gripper_dims=(6,), low=(-1,) * 7, high=(1,) * 7))
CAMERAS = ("agentview_image", "wrist_image")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(encoder: str = "small", **cfg) -> DiffusionPolicyModel:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    norm = Normalizer.fit({"eef_pos": rng.normal(size=(64, 3)), **{k: np.zeros((1, 1, 1, 3), np.uint8) for k in CAMERAS},
                           "action": np.concatenate([rng.uniform(-1, 1, (64, 6)), rng.choice([-1.0, 1.0], (64, 1))], 1)},
                          image_keys=CAMERAS)
    config = PolicyConfig(obs_keys=SPEC.obs_keys, image_keys=CAMERAS, preset="test", n_action_steps=4,
                          image_encoder=encoder, image_width=8, image_keypoints=4, image_feature_dim=8,
                          **{"image_crop": 0.9, **cfg})
    return DiffusionPolicyModel(config, SPEC, norm).eval()


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory):
    model = make_model()
    out = export_model(model, tmp_path_factory.mktemp("img") / "pkg")
    return model, out


def test_crop_is_random_in_training_and_the_centre_at_inference():
    crop = CropRandomizer((10, 12), (6, 8))
    x = torch.arange(2 * 10 * 12, dtype=torch.float32).reshape(1, 2, 10, 12).repeat(64, 1, 1, 1)
    centre = x[:, :, 2:8, 2:10]
    assert torch.equal(crop.eval()(x), centre)
    out = crop.train()(x)
    assert out.shape == (64, 2, 6, 8)
    tops = set()
    for i in range(64):  # every training crop is a window of the frame, both channels the same window
        top, left = divmod(int(out[i, 0, 0, 0]), 12)
        assert torch.equal(out[i], x[i, :, top:top + 6, left:left + 8])
        tops.add((top, left))
    assert len(tops) > 5  # frames of one batch get different crops


def test_training_mode_changes_the_features_eval_mode_is_deterministic():
    m = make_model(image_color_jitter=0.3)
    obs = {"agentview_image": torch.rand(2, 2, HW, HW, 3) * 2 - 1, "wrist_image": torch.rand(2, 2, HW, 72, 3) * 2 - 1,
           "eef_pos": torch.randn(2, 2, 3)}
    with torch.no_grad():
        assert torch.equal(m.eval().encoder(obs), m.encoder(obs))
        assert not torch.allclose(m.train().encoder(obs), m.eval().encoder(obs))


def test_too_small_a_crop_is_refused():
    with pytest.raises(ConfigError, match="image_crop"):
        make_model(image_crop=0.5)


def test_exported_encoder_takes_uint8_hwc_frames_at_the_cameras_size(package_dir):
    import onnx

    model, out = package_dir
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["encoder_form"] == "step" and manifest["step_dim"] * 2 == manifest["cond_dim"]
    graph = onnx.load(str(out / "encoder.onnx")).graph
    inputs = {i.name: (i.type.tensor_type.elem_type, [d.dim_value for d in i.type.tensor_type.shape.dim][1:]) for i in graph.input}
    assert inputs["obs_agentview_image"] == (onnx.TensorProto.UINT8, [HW, HW, 3])
    assert inputs["obs_wrist_image"] == (onnx.TensorProto.UINT8, [HW, 72, 3])
    assert inputs["obs_eef_pos"] == (onnx.TensorProto.FLOAT, [3])
    assert manifest["export"]["parity_max_abs_error"]["encoder"] < 1e-4
    assert max(verify_onnx_only(out)["self_consistency"].values()) < 1e-4  # `dpstack export --verify` without torch


def test_package_encoder_matches_torch_on_camera_frames(package_dir):
    model, out = package_dir
    pkg = load_package(out, options=SessionOptions(providers=("CPUExecutionProvider",)))
    rng = np.random.default_rng(3)
    frames = camera_frames((HW, HW, 3), (3, 2), rng)
    assert frames.dtype == np.uint8 and 20 < frames.std() and len(np.unique(frames)) > 100
    window = {"agentview_image": frames, "wrist_image": camera_frames((HW, 72, 3), (3, 2), rng),
              "eef_pos": rng.uniform(-1, 1, (3, 2, 3)).astype(np.float32)}
    ref = torch_callables(model)
    # torch on frames scaled in numpy (as the training set holds them) = the graph on uint8 frames
    scaled = {k: model.normalizer.normalize(k, v) if k in CAMERAS else v for k, v in window.items()}
    np.testing.assert_allclose(pkg.encode(window), ref.encode(scaled), atol=1e-4)
    np.testing.assert_allclose(pkg.encode(window), ref.encode(window), atol=1e-4)


def test_feature_cache_gives_the_conditions_of_whole_window_encoding(package_dir):
    _, out = package_dir
    pkg = load_package(out, options=SessionOptions(providers=("CPUExecutionProvider",)))
    rng = np.random.default_rng(4)
    episode = [{"agentview_image": camera_frames((HW, HW, 3), (), rng), "wrist_image": camera_frames((HW, 72, 3), (), rng),
                "eef_pos": rng.uniform(-1, 1, 3).astype(np.float32)} for _ in range(7)]
    calls = []
    counted = pkg.with_backend(pkg.encode, pkg.denoise,
                               encode_step=lambda o: calls.append(len(o["eef_pos"])) or pkg.encode_step(o))
    cached, plain = PolicyRunner(counted, "ddim-2"), PolicyRunner(pkg, "ddim-2", feature_cache=False)
    assert cached.feature_cache and not plain.feature_cache
    for episode_obs in (episode[:4], episode[4:]):   # two episodes: the cache starts afresh at reset
        cached.reset(0)
        plain.reset(0)
        calls.clear()
        for i, obs in enumerate(episode_obs):
            cached.observe(obs)
            plain.observe(obs)
            if i == 2:
                continue  # a step without inference: its frame is encoded at the next one, with the newest
            np.testing.assert_allclose(cached.condition(), plain.condition(), rtol=0, atol=1e-6)
        # first step: the padded window encodes its one frame once; then only new frames
        assert calls == [1, 1, 2] if len(episode_obs) == 4 else calls == [1, 1]


def test_bench_latency_image_model_row(tmp_path):
    from dpstack.policy.bench_latency import main

    out = tmp_path / "lat.json"
    assert main(["--out", str(out), "--models", "test-image", "--samplers", "streaming-1", "--backends", "onnx",
                 "--steps", "4", "--forward-reps", "1"]) == 0
    records = json.loads(out.read_text())["records"]
    rows = {r["extra"]["feature_cache"]: r for r in records}
    assert set(rows) == {True, False}
    for r in rows.values():
        assert r["model"] == "test-image" and r["step"]["n"] == 4 and r["forward"]["p50_ms"] > 0
        assert r["extra"]["encoder_forward"]["p50_ms"] > 0 and r["extra"]["denoiser_forward"]["p50_ms"] > 0
    assert "test-image" in out.with_suffix(".md").read_text()


def test_an_image_package_from_before_uint8_encoders_is_refused(package_dir, tmp_path):
    import shutil

    _, out = package_dir
    old = tmp_path / "old"
    shutil.copytree(out, old)
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["encoder_form"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=r"re-export it from its checkpoint with `dpstack export`") as e:
        load_package(old)
    assert "\n" not in str(e.value)
    assert sha256_file(old / "encoder.onnx") == manifest["files"]["encoder.onnx"]["sha256"]  # nothing touched


def test_shipped_image_configs_build_the_cpu_encoder_with_dp_crop():
    for name in ("lift_image_small", "can_image_small"):
        p = load_config(name).policy
        assert (p.image_encoder, p.image_crop, p.n_obs_steps) == ("small", 0.905, 2)
        assert set(p.image_keys) == {"agentview_image", "robot0_eye_in_hand_image"}
    resnet = make_model("resnet18").num_parameters()["encoder"]
    small = make_model("small").num_parameters()["encoder"]
    assert small < resnet


def test_train_export_and_run_an_image_policy_end_to_end(tmp_path):
    """The trainer with the crop in train mode, the checkpoint (new config fields), the export
    of that checkpoint, and the runner fed uint8 frames as a robot sends them."""
    from _policy_data import bimodal_dataset
    from dpstack.policy.checkpoint import load_checkpoint
    from dpstack.policy.export import export_checkpoint
    from dpstack.policy.train import train
    from dpstack.policy.train_outputs import CHECKPOINT_FILE

    data = bimodal_dataset(tmp_path / "img.zarr", n_episodes=4, length=12, with_image=True)
    cfg = load_config("lift_image_small", ["policy.obs_keys=[cam_image, pos]", "policy.image_keys=[cam_image]",
                                           "policy.preset=test", "policy.image_width=8", "train.steps=2",
                                           "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1",
                                           "train.eval_every=0"])
    train(cfg, data, tmp_path / "run", progress=False)
    model, _ = load_checkpoint(tmp_path / "run" / CHECKPOINT_FILE)
    assert (model.config.image_encoder, model.config.image_crop) == ("small", 0.905)
    pkg = load_package(export_checkpoint(tmp_path / "run" / CHECKPOINT_FILE, tmp_path / "pkg"))
    runner = PolicyRunner(pkg, "streaming-1")
    runner.reset(0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        action = runner.control_step({"pos": rng.uniform(0, 0.3, 2).astype(np.float32),
                                      "cam_image": camera_frames((64, 64, 3), (), rng)})
        assert action.shape == (3,) and np.all(np.abs(action) <= 1)
