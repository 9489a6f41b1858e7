"""Denoisers take one level per horizon position; encoders; the gripper scale."""
import numpy as np
import pytest
import torch

from _policy_data import one_thread, toy_spec  # noqa: F401  (fixture)
from dpstack.policy.config import PolicyConfig
from dpstack.policy.dataset import fit_normalizer, prepare
from dpstack.policy.model import DiffusionPolicyModel
from dpstack.policy.regimes import sample_levels
from dpstack.core.normalizer import Normalizer

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_model(model: str = "unet", with_image: bool = False, **kw) -> DiffusionPolicyModel:
    spec = toy_spec(with_image)
    cfg = PolicyConfig(obs_keys=spec.obs_keys, image_keys=("cam_image",) if with_image else (), model=model,
                       preset="test", image_width=8, image_keypoints=4, image_feature_dim=8, **kw)
    norm = Normalizer.fit({"pos": np.random.rand(50, 2), "action": np.random.rand(50, 3) * 2 - 1,
                           **({"cam_image": np.zeros((2, 64, 64, 3), np.uint8)} if with_image else {})},
                          image_keys=("cam_image",) if with_image else ())
    torch.manual_seed(0)
    return DiffusionPolicyModel(cfg, spec, norm).eval()


@pytest.mark.parametrize("kind", ["unet", "transformer"])
def test_per_position_levels_change_the_output(kind):
    m = toy_model(kind)
    B, Tp = 2, m.horizon
    x = torch.randn(B, Tp, 3)
    cond = torch.randn(B, m.cond_dim)
    t = torch.full((B, Tp), 50, dtype=torch.int64)
    with torch.no_grad():
        base = m.denoiser(x, t, cond)
        assert torch.equal(base, m.denoiser(x, torch.tensor(50), cond))             # scalar broadcast
        assert torch.equal(base, m.denoiser(x, torch.tensor([50, 50]), cond))       # (B,) broadcast
        t2 = t.clone()
        t2[:, 12] = 5                                                                # one position's level only
        moved = m.denoiser(x, t2, cond)
    diff = (moved - base).abs().amax(dim=(0, 2))
    assert diff[12] > 1e-3, diff
    if kind == "transformer":  # causal: earlier positions cannot see position 12
        assert diff[:12].max() == 0


def test_preset_sizes():
    spec = toy_spec()
    norm = Normalizer.fit({"pos": np.random.rand(5, 2), "action": np.random.rand(5, 3)})
    n = lambda **kw: DiffusionPolicyModel(PolicyConfig(**kw), spec, norm).num_parameters()["denoiser"]  # noqa: E731
    assert 3e6 < n(preset="small") < 7e6
    assert 60e6 < n(preset="dp") < 72e6                                             # the paper's ~66 M
    assert 8e6 < n(model="transformer", preset="dp") < 11e6                         # the paper's ~9 M


def test_image_encoder_takes_hwc_in_minus_one_one():
    m = toy_model(with_image=True)
    obs = {"pos": torch.randn(3, 2, 2), "cam_image": torch.rand(3, 2, 64, 64, 3) * 2 - 1}
    cond = m.encoder(obs)
    assert cond.shape == (3, m.cond_dim) and m.cond_dim == 2 * (8 + 2)
    obs2 = dict(obs, cam_image=obs["cam_image"].clone())
    obs2["cam_image"][1, 1] = -obs2["cam_image"][1, 1]                               # change one frame of sample 1
    cond2 = m.encoder(obs2)
    assert torch.equal(cond2[0], cond[0]) and not torch.allclose(cond2[1], cond[1])


def test_regime_mix():
    cfg = PolicyConfig(regime_plain=0.5, regime_ladder=0.5, ladder_rungs=15, prefix_prob=0.5, prefix_max=3)
    levels, mask = sample_levels(np.random.default_rng(0), 4000, cfg)
    assert levels.shape == (4000, 16) and levels.min() == -1 and levels.max() == 99
    plain = np.all(levels[:, 3:] == levels[:, 3:4], axis=1)
    assert 0.4 < plain.mean() < 0.6                                                  # the ladder rises, plain is flat
    committed = levels == -1
    assert np.array_equal(mask == 0, committed)                                      # committed prefix is not trained on
    assert 0.4 < committed[:, 0].mean() < 0.6 and committed[:, 3].sum() == 0


def test_gripper_scale_round_trips():
    spec = toy_spec()
    rng = np.random.default_rng(0)
    action = np.concatenate([rng.uniform(-0.5, 0.7, (100, 2)), rng.choice([-1.0, 1.0], (100, 1))], 1).astype(np.float32)
    arrays = {"pos": rng.normal(size=(100, 2)).astype(np.float32), "action": action}
    cfg = PolicyConfig(obs_keys=("pos",), gripper_scale=10.0)
    data = prepare(arrays, np.array([50, 100]), spec, cfg)
    g = data.arrays["action"][:, 2]
    assert np.allclose(np.unique(g), [-0.1, 0.1])                                     # normalised gripper divided by 10
    assert np.abs(data.arrays["action"][:, :2]).max() == pytest.approx(1.0)           # other dims untouched
    back = data.normalizer.unnormalize("action", data.arrays["action"])
    assert np.allclose(back, action, atol=1e-5)
    plain = fit_normalizer(arrays, ("pos",), spec, PolicyConfig(obs_keys=("pos",)))
    assert np.allclose(np.abs(plain.normalize("action", action)[:, 2]), 1.0)
