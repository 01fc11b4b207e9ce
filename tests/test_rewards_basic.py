"""Pixel-statistic rewards and RewardSet, against hand-computed values."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pro_grpo_lightning.rewards import Brightness, Colorfulness, JpegCompressibility, Reward, RewardSet


def solid(rgb, batch=1, size=8):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(batch, 3, size, size).clone()


def noise(batch=1, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g).float() / 255


class Const(Reward):
    """Returns given per-image values (a [B] tensor) whatever the images."""

    def __init__(self, values, **kw):
        super().__init__(**kw)
        self.values = torch.as_tensor(values, dtype=torch.float32)

    def score(self, images, prompts):
        return self.values[: images.shape[0]]


def close(actual, expected, atol=1e-6, rtol=1e-5):
    # torch.testing.assert_close costs ~1 s of lazy imports on first use; allclose is enough here
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape and torch.allclose(actual, expected, atol=atol, rtol=rtol), (actual, expected)


def prompts(n):
    return ["p"] * n


# ---- JPEG ----------------------------------------------------------------------------------------
def test_jpeg_flat_beats_noise():
    images = torch.cat([solid([0.5, 0.5, 0.5], size=32), noise()])
    score = JpegCompressibility()(images, prompts(2))
    assert score.dtype == torch.float32 and score.shape == (2,)
    assert score[0] > score[1] and (score < 0).all()


@pytest.mark.parametrize("quality", [95, 30])
def test_jpeg_equals_pil_size(quality):
    images = noise(size=24, seed=1)  # exactly k/255, so the uint8 conversion is lossless
    array = (images[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
    expected = -len(buffer.getvalue()) / 1000
    score = JpegCompressibility(quality=quality)(images, prompts(1))
    assert score.item() == pytest.approx(expected, abs=1e-6)


def test_jpeg_batch_equals_per_image_and_serial():
    images = torch.cat([noise(3, size=16, seed=2), solid([0.2, 0.7, 0.1], size=16)])
    batch = JpegCompressibility(num_workers=4)(images, prompts(4))
    serial = JpegCompressibility(num_workers=1)(images, prompts(4))
    single = torch.cat([JpegCompressibility()(images[i:i + 1], prompts(1)) for i in range(4)])
    close(batch, single, rtol=0, atol=0)
    close(batch, serial, rtol=0, atol=0)


def test_jpeg_rejects_bad_quality():
    with pytest.raises(ValueError, match="quality"):
        JpegCompressibility(quality=0)


# ---- Brightness ----------------------------------------------------------------------------------
def test_brightness_hand_values():
    images = torch.cat([solid([1, 0, 0]), solid([0, 1, 0]), solid([0, 0, 1]), solid([1, 1, 1]),
                        solid([0.5, 0.5, 0.5])])
    score = Brightness()(images, prompts(5))
    close(score, torch.tensor([0.299, 0.587, 0.114, 1.0, 0.5]))


def test_brightness_mixed_image():
    image = torch.zeros(1, 3, 1, 2)
    image[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # luma 0.299
    image[0, :, 0, 1] = torch.tensor([0.0, 0.0, 1.0])  # luma 0.114
    assert Brightness()(image, prompts(1)).item() == pytest.approx((0.299 + 0.114) / 2)


def test_brightness_target():
    images = torch.cat([solid([1, 0, 0]), solid([0.5, 0.5, 0.5]), solid([1, 1, 1])])
    score = Brightness(target=0.5)(images, prompts(3))
    close(score, torch.tensor([-0.201, 0.0, -0.5]))
    with pytest.raises(ValueError, match="target"):
        Brightness(target=1.5)


# ---- Colorfulness --------------------------------------------------------------------------------
def test_colorfulness_grey_is_zero():
    images = torch.cat([solid([0.3, 0.3, 0.3]), solid([1, 1, 1])])
    images[1, :, :4] = 0.0  # black and white halves: still grey
    close(Colorfulness()(images, prompts(2)), torch.zeros(2))


def test_colorfulness_two_pixels():
    image = torch.zeros(1, 3, 1, 2)
    image[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # rg 1, yb 0.5
    image[0, :, 0, 1] = torch.tensor([0.0, 0.0, 1.0])  # rg 0, yb -1
    # mean_rg 0.5, mean_yb -0.25; var_rg 0.25, var_yb 0.75^2 = 0.5625
    expected = math.sqrt(0.25 + 0.5625) + 0.3 * math.sqrt(0.25 + 0.0625)  # 1.069093
    assert Colorfulness()(image, prompts(1)).item() == pytest.approx(expected, rel=1e-6)


def test_colorfulness_solid_colour():
    # pure red everywhere: no spread, rg 1, yb 0.5 -> 0.3 * sqrt(1.25)
    assert Colorfulness()(solid([1, 0, 0]), prompts(1)).item() == pytest.approx(0.3 * math.sqrt(1.25))


# ---- Reward.forward validation -------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 1, 8, 8), (2, 4, 8, 8)])
def test_forward_rejects_bad_shape(shape):
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        Brightness()(torch.zeros(shape), prompts(2))


def test_forward_rejects_prompt_count():
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        Colorfulness()(torch.zeros(2, 3, 4, 4), prompts(3))


def test_forward_restores_train_mode_and_no_grad():
    reward = Brightness()
    reward.train()
    images = torch.rand(2, 3, 4, 4, requires_grad=True)
    out = reward(images, prompts(2))
    assert reward.training and not out.requires_grad


# ---- RewardSet -----------------------------------------------------------------------------------
def test_rewardset_weighted_sum_and_raw_components():
    images = torch.cat([solid([1, 0, 0]), solid([0.5, 0.5, 0.5])])
    rs = RewardSet([Brightness(weight=2.0), Colorfulness(weight=-0.5)])
    total, comps = rs(images, prompts(2))
    assert rs.names == ["brightness", "colorfulness"] and list(comps) == rs.names
    close(comps["brightness"], torch.tensor([0.299, 0.5]))
    close(comps["colorfulness"], torch.tensor([0.3 * math.sqrt(1.25), 0.0]))
    expected = torch.tensor([2 * 0.299 - 0.5 * 0.3 * math.sqrt(1.25), 2 * 0.5])
    close(total, expected)
    assert total.shape == (2,) and total.dtype == torch.float32


def test_rewardset_batch_normalization():
    a = Const([1.0, 2.0, 3.0], name="a", weight=1.0)
    b = Const([10.0, 10.0, 10.0], name="b", weight=5.0)  # all equal -> contributes 0
    c = Const([0.0, 100.0, 200.0], name="c", weight=0.5)
    total, comps = RewardSet([a, b, c], normalize="batch")(torch.zeros(3, 3, 2, 2), prompts(3))
    z = math.sqrt(1.5)  # (x - mean) / population std for [1, 2, 3]: [-1, 0, 1] * sqrt(3/2)
    close(total, torch.tensor([-1.5 * z, 0.0, 1.5 * z]), atol=1e-5, rtol=1e-5)
    close(comps["b"], torch.full((3,), 10.0))  # components stay raw
    close(comps["c"], torch.tensor([0.0, 100.0, 200.0]))


def test_rewardset_running_normalization_updates_only_when_asked():
    r = Const([1.0, 3.0, 5.0, 7.0], name="r")
    rs = RewardSet([r], normalize="running", momentum=0.5)
    images = torch.zeros(4, 3, 2, 2)
    # before any update: batch statistics (mean 4, var 5), stats untouched
    total, _ = rs(images, prompts(4))
    close(total, (torch.tensor([1.0, 3, 5, 7]) - 4) / math.sqrt(5), atol=1e-5, rtol=1e-5)
    assert rs.num_updates.item() == 0 and rs.running_mean.item() == 0 and rs.running_var.item() == 1
    # first update: initialised from the batch
    rs(images, prompts(4), update_stats=True)
    assert rs.num_updates.item() == 1
    close(rs.running_mean, torch.tensor([4.0]))
    close(rs.running_var, torch.tensor([5.0]))
    # a preview-like batch without update_stats: normalised with the running stats, which stay put
    r.values = torch.tensor([9.0, 9.0, 9.0, 9.0])
    total, comps = rs(images, prompts(4), update_stats=False)
    close(total, torch.full((4,), 5 / math.sqrt(5)), atol=1e-5, rtol=1e-5)
    close(comps["r"], torch.full((4,), 9.0))
    close(rs.running_mean, torch.tensor([4.0]))
    assert rs.num_updates.item() == 1
    # second update: EMA with momentum 0.5 (batch mean 9, var 0), then normalise with the new stats
    total, _ = rs(images, prompts(4), update_stats=True)
    close(rs.running_mean, torch.tensor([6.5]))
    close(rs.running_var, torch.tensor([2.5]))
    close(total, torch.full((4,), 2.5 / math.sqrt(2.5)), atol=1e-5, rtol=1e-5)


def test_rewardset_running_stats_resume_from_state_dict():
    rs = RewardSet([Const([1.0, 2.0], name="x"), Const([5.0, 9.0], name="y")], normalize="running")
    rs(torch.zeros(2, 3, 2, 2), prompts(2), update_stats=True)
    state = rs.state_dict()
    assert {"running_mean", "running_var", "num_updates"} <= set(state)
    fresh = RewardSet([Const([0.0, 0.0], name="x"), Const([0.0, 0.0], name="y")], normalize="running")
    fresh.load_state_dict(state)
    close(fresh.running_mean, torch.tensor([1.5, 7.0]))
    close(fresh.running_var, torch.tensor([0.25, 4.0]))
    assert fresh.num_updates.item() == 1


def test_rewardset_single_reward_normalization_keeps_group_ranking():
    values = torch.tensor([0.2, 0.9, 0.4, 0.1])
    images = torch.zeros(4, 3, 2, 2)
    raw, _ = RewardSet([Const(values)])(images, prompts(4))
    norm, _ = RewardSet([Const(values, weight=2.0)], normalize="batch")(images, prompts(4))
    centre = lambda x: (x - x.mean()) / x.std()  # group-relative advantage of one group
    close(centre(raw), centre(norm), atol=1e-5, rtol=1e-5)


def test_rewardset_errors():
    with pytest.raises(ValueError, match="unique"):
        RewardSet([Brightness(), Brightness(target=0.5)])
    RewardSet([Brightness(), Brightness(target=0.5, name="brightness_target")])  # renamed: fine
    with pytest.raises(ValueError, match="empty"):
        RewardSet([])
    with pytest.raises(ValueError, match="normalize"):
        RewardSet([Brightness()], normalize="zscore")
    with pytest.raises(ValueError, match="momentum"):
        RewardSet([Brightness()], momentum=1.0)


def test_rewardset_configure_model_calls_each():
    calls = []

    class Loads(Const):
        def configure_model(self):
            calls.append(self.name)

    RewardSet([Loads([0.0], name="u"), Loads([0.0], name="v")]).configure_model()
    assert calls == ["u", "v"]
