"""evaluation.py on its own: per-item images independent of the batch, order-free gathering, the
tables' numbers, and ``evaluate_shapes`` on the same path."""

import csv

import pytest
import torch

from pro_grpo_lightning.backends.sd15 import TinySD15Backend
from pro_grpo_lightning.evaluation import (EVAL_TOTAL, EvalItems, ShardedSequentialSampler, collate_items,
                                           eval_columns, eval_scores, gather_items, item_rows, sample_items,
                                           write_eval_table)
from pro_grpo_lightning.noise import mix_seed
from pro_grpo_lightning.rewards.combine import RewardSet
from pro_grpo_lightning.rewards.image_stats import Brightness, Colorfulness
from pro_grpo_lightning.rewards.shapes import ShapesReward
from pro_grpo_lightning.tasks.shapes import shapes_prompts
from pro_grpo_lightning.tasks.shapes_eval import evaluate_shapes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backend():
    b = TinySD15Backend(num_steps=2, resolution=32, guidance_scale=1.0)
    b.configure_model()
    return b


def test_items_seeds_and_sharding_cover_every_item_once():
    items = EvalItems(["a", "b", "c"], 2, eval_seed=7)
    assert len(items) == 6
    assert items[3] == {"prompt": "b", "prompt_index": 1, "image_index": 1, "seed": mix_seed(7, 1, 1),
                        "metadata": None}
    shards = [list(ShardedSequentialSampler(len(items), 4, r)) for r in range(4)]
    assert shards == [[0, 4], [1, 5], [2], [3]]
    batch = collate_items([items[k] for k in (5, 0)])
    assert batch["prompts"] == ["c", "a"] and batch["prompt_index"].tolist() == [2, 0]
    assert batch["image_index"].tolist() == [1, 0] and batch["seeds"] == [mix_seed(7, 2, 1), mix_seed(7, 0, 0)]


def test_an_items_image_does_not_depend_on_its_batch(backend):
    prompts = ["a cat", "a dog", "a fox", "a cow"]
    seeds = [11, 12, 13, 14]
    together = sample_items(backend, prompts, seeds)  # [4, 3, 32, 32]
    alone = torch.cat([sample_items(backend, [p], [s]) for p, s in zip(prompts, seeds)])
    reordered = sample_items(backend, prompts[::-1], seeds[::-1]).flip(0)
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-5)
    torch.testing.assert_close(reordered, together, rtol=0, atol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-3)  # the seeds matter
    # the same seed, another prompt: another image (the conditioning reaches the sampler)
    assert not torch.allclose(sample_items(backend, ["a dog"], [11]), together[:1], atol=1e-4)


def test_scores_rows_gather_and_tables(tmp_path):
    rewards = RewardSet([Brightness(weight=2.0), Colorfulness(weight=-1.0)])
    extra = [Colorfulness(name="colour_eval")]
    names = eval_columns(rewards, extra)
    assert names == [EVAL_TOTAL, "brightness", "colorfulness", "colour_eval"]
    with pytest.raises(ValueError, match="brightness"):
        eval_columns(rewards, [Brightness()])
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 8, 8, generator=g)
    scores = eval_scores(rewards, extra, images, ["x", "y", "z"])
    assert list(scores) == names
    luma = images.mean((2, 3)) @ torch.tensor([0.299, 0.587, 0.114])  # [3] brightness by hand
    torch.testing.assert_close(scores["brightness"], luma)
    torch.testing.assert_close(scores[EVAL_TOTAL], 2 * luma - scores["colorfulness"])
    torch.testing.assert_close(scores["colour_eval"], scores["colorfulness"])
    batch = {"prompt_index": torch.tensor([1, 0, 1]), "image_index": torch.tensor([1, 0, 0])}
    rows = item_rows(batch, scores, torch.device("cpu"))  # [3, 2 + 4]
    # two "batches" out of order: gathering sorts by (prompt, image)
    out = gather_items([rows[:1], rows[1:]], len(names), torch.device("cpu"))
    assert out[:, :2].tolist() == [[0, 0], [1, 0], [1, 1]]
    torch.testing.assert_close(out, rows[[1, 2, 0]])
    assert gather_items([], len(names), torch.device("cpu")).shape == (0, 2 + len(names))

    base = write_eval_table("val", 12, out, names, ["p0", "p1"], str(tmp_path))
    assert base.endswith("val_step000012")
    with open(base + ".csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["prompt"], r["image_index"]) for r in table] == [("p0", "0"), ("p1", "0"), ("p1", "1")]
    assert float(table[2]["brightness"]) == pytest.approx(float(scores["brightness"][0]), rel=1e-5)
    md = open(base + ".md").read().splitlines()
    p1_mean = (out[1, 3] + out[2, 3]) / 2  # brightness of prompt 1's two images
    assert md[0] == "# val at step 12 (3 images, 2 prompts)"
    assert md[5].startswith("| p1 | ") and f"{float(p1_mean):.4f}" in md[5]


def test_evaluate_shapes_samples_items_with_fixed_noise_whatever_the_batch_size(backend):
    small = evaluate_shapes(backend, samples_per_prompt=2, seed=3, batch_size=1, max_prompts=3)
    large = evaluate_shapes(backend, samples_per_prompt=2, seed=3, batch_size=4, max_prompts=3)
    assert small["n"] == large["n"] == 6
    for k in small:
        assert small[k] == pytest.approx(large[k], abs=1e-6), k
    # exactly the reward of the items' own images, image j of prompt i seeded mix_seed(3, i, j)
    prompts = [p for p in shapes_prompts("heldout", seed=None)[:3] for _ in range(2)]
    seeds = [mix_seed(3, i, j) for i in range(3) for j in range(2)]
    reward = ShapesReward()
    expected = reward(sample_items(backend, prompts, seeds), prompts).mean().item()
    assert small["reward"] == pytest.approx(expected, abs=1e-6)
