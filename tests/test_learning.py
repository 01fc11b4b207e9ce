"""End to end, the loop learns: rollout -> group advantages -> PPO-clip update moves the policy
toward higher reward, and a reversed reward moves it the other way. On the transparent affine
backend (2-dim latents) this takes a second; a sign error, or advantages landing on the wrong
trajectories after pruning, would make the reward drift at random instead."""

import pytest
import torch

from pro_grpo_lightning.objectives import group_advantages
from pro_grpo_lightning.rewards.base import Reward
from pro_grpo_lightning.rewards.combine import RewardSet
from pro_grpo_lightning.rollout import ExpandPruneRollout
from pro_grpo_lightning.schedules import PlainGRPOSchedule, ProGRPOSchedule
from pro_grpo_lightning.update import UpdateSettings, grpo_update
from tests.fakes import AdapterNet, AffineBackend, MeanPixel

PROMPTS = ["a cat", "two dogs", "a red square", "one blue circle"]


class ShiftAdapterNet(AdapterNet):
    """The fake's adapter plus a trainable shift, so the policy can move the samples' mean (the
    plain fake's adapter only rescales x, which barely moves a sigmoid's mean)."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x):
        out = super().forward(x)
        return out + self.shift if self.enabled else out


class ShiftBackend(AffineBackend):
    def configure_model(self) -> None:
        if self.net is None:
            self.net = ShiftAdapterNet()


class LowPixel(MeanPixel):
    default_name = "low_pixel"

    def score(self, images, prompts):
        return 1.0 - super().score(images, prompts)


def policy_value(backend, n=512) -> float:
    """Mean final 'pixel' of the policy over n fixed-noise samples of every prompt (plain rollout)."""
    rollout = ExpandPruneRollout(backend, RewardSet([MeanPixel()]), PlainGRPOSchedule(n))
    return rollout.run(PROMPTS, torch.Generator().manual_seed(12345)).rewards.mean().item()


def train(schedule, reward: Reward, rollouts: int = 30) -> tuple[float, float]:
    backend = ShiftBackend(num_steps=4)
    backend.configure_model()
    rollout = ExpandPruneRollout(backend, RewardSet([reward]), schedule)
    settings = UpdateSettings(train_batch_size=64, clip_range=0.2, max_grad_norm=None)
    opt = torch.optim.Adam(backend.trainable_parameters(), lr=0.03)
    before = policy_value(backend)
    for k in range(rollouts):
        res = rollout.run(PROMPTS, torch.Generator().manual_seed(k))
        adv = group_advantages(res.rewards, std_mode="group")
        grpo_update(backend, res, adv.flatten(), settings, opt, generator=torch.Generator().manual_seed(k))
    return before, policy_value(backend)


@pytest.mark.parametrize("schedule", [PlainGRPOSchedule(8), ProGRPOSchedule(16, [1, 2], [10, 8])],
                         ids=["plain", "pro"])
def test_grpo_raises_the_reward_and_lowers_the_reversed_one(schedule):
    before, up = train(schedule, MeanPixel())
    _, down = train(schedule, LowPixel())
    assert up > before + 0.04, (before, up)
    assert down < before - 0.04, (before, down)
