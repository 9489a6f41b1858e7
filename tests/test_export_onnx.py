"""Export to ONNX: parity with torch for every sampler, atomic refusal, --verify, the CLI."""
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from dpstack.policy.checkpoint import build_payload, save_checkpoint
from dpstack.policy.config import Config, PolicyConfig
from dpstack.policy.export import ExportError, export_model, verify_package
from dpstack.policy.model import DiffusionPolicyModel
from dpstack.policy.torch_callables import torch_callables
from dpstack.cli import main as dpstack
from dpstack.core.normalizer import Normalizer
from dpstack.runtime.package import PackageError, SessionOptions, load_package
from dpstack.runtime.policy import PolicyRunner
from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec

logging.getLogger("torch.onnx").setLevel(logging.ERROR)

SPEC = RobotSpec("lift", "Panda", 20.0, (ArraySpec("eef_pos", (3,)), ArraySpec("object", (5,))),
                 ActionSpec(shape=(7,), gripper_dims=(6,), low=(-1,) * 7, high=(1,) * 7))


def make_model(kind: str = "unet", **cfg) -> DiffusionPolicyModel:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    norm = Normalizer.fit({"eef_pos": rng.normal(size=(64, 3)), "object": rng.normal(size=(64, 5)),
                           "action": np.concatenate([rng.uniform(-1, 1, (64, 6)), rng.choice([-1.0, 1.0], (64, 1))], 1)})
    config = PolicyConfig(model=kind, preset="test", n_action_steps=4, **cfg)
    return DiffusionPolicyModel(config, SPEC, norm).eval()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two eager threads on a shared 2-core machine are ~10x slower than one (spin-waiting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A checkpoint (trained with the ladder regime) exported through the real CLI."""
    root = tmp_path_factory.mktemp("export")
    model = make_model(regime_ladder=1.0, ladder_rungs=15)
    cfg = Config(policy=model.config)
    ckpt = save_checkpoint(root / "ckpt.pt", build_payload(model, model.state_dict(), cfg, 7, {"fingerprint": "abc123"}))
    assert dpstack(["export", str(ckpt), "--out", str(root / "policy")]) == 0
    return model, ckpt, root / "policy"


def test_manifest_describes_the_policy(exported):
    model, ckpt, out = exported
    m = json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["spec"] == SPEC.to_dict()
    assert (m["horizon"], m["n_obs_steps"], m["n_action_steps"]) == (16, 2, 4)
    assert m["regimes"]["ladder_rungs"] == 15 and m["regimes"]["gripper_scale"] == 1.0
    assert m["dataset"]["fingerprint"] == "abc123" and m["checkpoint"]["step"] == 7
    assert m["schedule"] == model.schedule.to_dict() and m["normalizer"] == model.normalizer.to_dict()
    assert max(m["export"]["parity_max_abs_error"].values()) < 1e-4
    assert set(m["files"]) == {"encoder.onnx", "denoiser.onnx"}


@pytest.mark.parametrize("sampler,calls", [("ddpm-100", 2), ("ddim-10", 4), ("rti-3,1,0", 8), ("rti", 8), ("streaming-1", 8), ("streaming-3", 8)])
def test_onnxruntime_and_torch_give_the_same_actions(exported, sampler, calls):
    model, _, out = exported
    package = load_package(out, serves=SPEC, options=SessionOptions(intra_op_threads=1))
    ref = torch_callables(model)
    onnx_runner = PolicyRunner(package, sampler)
    torch_runner = PolicyRunner(package.with_backend(ref.encode, ref.denoise), sampler)
    rng = np.random.default_rng(1)
    for step in range(calls):
        o = {"eef_pos": rng.normal(size=3).astype(np.float32), "object": rng.normal(size=5).astype(np.float32)}
        a, b = onnx_runner.act(o), torch_runner.act(o)
        assert a.nfe == b.nfe
        np.testing.assert_allclose(a.actions, b.actions, atol=1e-4, err_msg=f"{sampler} step {step}")


def test_a_package_carries_what_bare_rti_means_for_it(exported, tmp_path, capsys):
    model, ckpt, out = exported
    assert json.loads((out / "manifest.json").read_text())["sampler_defaults"] == {"rti": "rti-renoise-40,15,0"}
    assert dpstack(["export", str(ckpt), "--out", str(tmp_path / "lift"), "--rti-default", "renoise-20,10,0"]) == 0
    package = load_package(tmp_path / "lift", serves=SPEC, options=SessionOptions(intra_op_threads=1))
    assert package.trained.rti_default == "rti-renoise-20,10,0"
    names = {t: PolicyRunner(package, t).sampler.name for t in ("rti", "rti-ta4", "rti-3,1,0", "rti-renoise-40,15,0")}
    assert names == {"rti": "rti-renoise-20,10,0", "rti-ta4": "rti-renoise-20,10,0-ta4",
                     "rti-3,1,0": "rti-3,1,0", "rti-renoise-40,15,0": "rti-renoise-40,15,0"}  # a typed list wins
    capsys.readouterr()
    for bad, why in (("3,3,0", "fall strictly within"), ("renoise-120,0", "fall strictly within"),
                     ("rti-ta4", "not an RTI refinement list"), ("ddim-10", "not an RTI refinement list")):
        assert dpstack(["export", str(ckpt), "--out", str(tmp_path / "bad"), "--rti-default", bad]) == 1
        err = capsys.readouterr().err
        assert "--rti-default" in err and why in err, bad
        assert not (tmp_path / "bad").exists()
    m = json.loads((tmp_path / "lift" / "manifest.json").read_text())
    m["sampler_defaults"]["rti"] = "rti-5,9,0"  # a hand-edited manifest is refused on load, by name
    (tmp_path / "lift" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match="sampler_defaults.rti"):
        load_package(tmp_path / "lift")


def test_verify_checks_hashes_and_parity_against_the_checkpoint(exported, capsys):
    _, ckpt, out = exported
    report = verify_package(out)
    assert report["checkpoint"] == str(ckpt) and max(report["parity"].values()) < 1e-4
    assert dpstack(["export", "--verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_without_the_checkpoint_checks_onnx_consistency(exported, tmp_path):
    _, _, out = exported
    copy = tmp_path / "policy"
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    m = json.loads((copy / "manifest.json").read_text())
    m["checkpoint"]["path"] = str(tmp_path / "nowhere.pt")
    (copy / "manifest.json").write_text(json.dumps(m))
    report = verify_package(copy)
    assert "parity" not in report and max(report["self_consistency"].values()) < 1e-4
    data = bytearray((copy / "encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(PackageError, match="encoder.onnx: sha256"):
        verify_package(copy)
    assert dpstack(["export", "--verify", str(copy)]) == 1


def test_failed_parity_writes_nothing_then_transformer_exports(tmp_path):
    model = make_model("transformer")
    out = tmp_path / "policy"
    with pytest.raises(ExportError, match="onnxruntime differs from torch"):
        export_model(model, out, tolerance=1e-12)  # no real graph matches eager to 1e-12
    assert not out.exists() and list(tmp_path.iterdir()) == []
    export_model(model, out)
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["type"] == "transformer" and max(m["export"]["parity_max_abs_error"].values()) < 1e-4
    with pytest.raises(ExportError, match="exists"):
        export_model(model, out)


def test_verify_on_a_machine_without_torch(exported):
    """A robot computer has no torch: --verify still checks hashes and onnx self-consistency."""
    _, _, out = exported
    code = ("import sys; sys.modules['torch'] = None\n"
            "from dpstack.cli import main\n"
            f"sys.exit(main(['export', '--verify', {str(out)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "torch not installed" in proc.stdout and '"self_consistency"' in proc.stdout
