"""A YAML mixes a weightless reward with a (tiny) CLIP-score model, and the tiny SD1.5 run trains on it."""

import glob

import pytest
import yaml

from pro_grpo_lightning.offline_tokenizers import byte_level_clip_tokenizer
from pro_grpo_lightning.cli import main
from tests.tiny_models import tiny_clip_model


@pytest.fixture()
def tiny_clip_dir(tmp_path):
    path = tmp_path / "tiny_clip"
    tiny_clip_model(seed=0).save_pretrained(path)
    byte_level_clip_tokenizer().save_pretrained(path)
    return path


def test_tiny_sd15_with_weighted_clip_score_and_brightness(tmp_path, tiny_clip_dir):
    cfg = yaml.safe_load(open("configs/tiny_sd15.yaml"))
    cfg["model"]["rewards"] = [
        {"class_path": "pro_grpo_lightning.rewards.image_stats.Brightness", "init_args": {"weight": 1.0}},
        {"class_path": "pro_grpo_lightning.rewards.clip_score.ClipScore",
         "init_args": {"pretrained": str(tiny_clip_dir), "weight": 0.5}},
    ]
    cfg["trainer"]["max_steps"] = 2
    cfg["trainer"]["callbacks"] = []
    cfg["trainer"]["enable_checkpointing"] = False
    cfg["trainer"]["enable_progress_bar"] = False
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    cfg["model"]["samples"] = {"every_n_rollouts": 0}
    p = tmp_path / "mix.yaml"
    p.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(p), "--trainer.default_root_dir", str(tmp_path)])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (events,) = glob.glob(str(tmp_path / "logs" / "tiny_sd15" / "*" / "events.out.tfevents.*"))
    acc = EventAccumulator(events, size_guidance={"scalars": 0})
    acc.Reload()
    total = [e.value for e in acc.Scalars("reward/mean")]
    bright = [e.value for e in acc.Scalars("reward/brightness")]
    clip = [e.value for e in acc.Scalars("reward/clip_score")]
    assert len(total) == 2
    for t, b, c in zip(total, bright, clip):
        assert t == pytest.approx(1.0 * b + 0.5 * c, rel=1e-5)  # each component logged raw, total weighted
        assert 0.0 <= c <= 100.0
