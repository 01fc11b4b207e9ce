"""Rewards: ``Reward`` (one score per image), ``RewardSet`` (their weighted sum), and the rewards."""

from .base import Reward
from .combine import RewardSet
from .image_stats import Brightness, Colorfulness, JpegCompressibility
from .aesthetic import LaionAesthetic
from .clip_score import ClipScore
from .hps import HPSv21
from .image_reward import ImageReward
from .pickscore import PickScore
from .remote import RemoteReward
from .shapes import ShapesExact, ShapesReward

__all__ = [
    "Reward",
    "RewardSet",
    "Brightness",
    "Colorfulness",
    "JpegCompressibility",
    "PickScore",
    "HPSv21",
    "ImageReward",
    "ClipScore",
    "LaionAesthetic",
    "ShapesReward",
    "ShapesExact",
    "RemoteReward",
]
