"""The shapes task, its exact reward, and the pretrained tiny model shipped in the package."""

import json
import os
import time
from collections import deque
from dataclasses import replace

import numpy as np
import pytest
import torch

from pro_grpo_lightning.offline_tokenizers import byte_level_clip_tokenizer, char_level_t5_tokenizer
from pro_grpo_lightning.loading import check_pretrained_source, resolve_pretrained_source
from pro_grpo_lightning.rewards.shapes import ShapesExact, ShapesReward, component_stats, connected_components
from pro_grpo_lightning.tasks.shapes import (BACKGROUND, COLOURS, COUNTS, POSITIONS, SHAPES, ShapeSpec, all_specs,
                                             render_shapes, sample_shapes, shapes_prompts, split_specs,
                                             write_shapes_dataset)

ASSET = "pkg://pro_grpo_lightning/assets/tiny_shapes_sd3"
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


@pytest.fixture(scope="module", params=[0.0, 0.04], ids=["hard", "graded"])
def reward(request):
    """Every task-level property holds for the hard rule and for graded shape credit alike."""
    return ShapesReward(shape_margin=request.param)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the task ---------------------------------------------------------------------------------
def test_prompts_round_trip_and_parse_variants():
    specs = all_specs()
    assert len(specs) == len(set(specs)) == 144
    for s in specs:
        assert ShapeSpec.parse(s.prompt) == s
    assert ShapeSpec(2, "red", "circle", "left").prompt == "two red circles on the left"
    assert ShapeSpec(1, "blue", "triangle", "top").prompt == "one blue triangle at the top"
    assert ShapeSpec.parse("A Yellow square at the bottom.") == ShapeSpec(1, "yellow", "square", "bottom")
    assert ShapeSpec.parse("an green circle in the right") == ShapeSpec(1, "green", "circle", "right")
    for bad in ("two purple circles on the left", "four red circles on the left", "a red star on the left",
                "a red circle", "a cat"):
        with pytest.raises(ValueError, match="not a shapes prompt"):
            ShapeSpec.parse(bad)
    with pytest.raises(ValueError, match="count"):
        ShapeSpec(4, "red", "circle", "left")


def test_split_is_fixed_disjoint_and_covers_every_value():
    splits = split_specs()
    train, held = splits["train"], splits["heldout"]
    assert (len(train), len(held)) == (108, 36)
    assert not set(train) & set(held) and set(train) | set(held) == set(all_specs())
    for part in (train, held):
        assert {s.count for s in part} == set(COUNTS) and {s.colour for s in part} == set(COLOURS)
        assert {s.shape for s in part} == set(SHAPES) and {s.position for s in part} == set(POSITIONS)
    assert split_specs() == splits  # a property of the task, not of a run
    assert shapes_prompts("heldout", seed=None) == [s.prompt for s in held]
    assert sorted(shapes_prompts("train", seed=3)) == sorted(s.prompt for s in train)
    # n prompts: a prefix of one seeded stream of shuffles, cycling through the split
    long = shapes_prompts("heldout", 100, seed=7)
    assert shapes_prompts("heldout", 40, seed=7) == long[:40]
    assert sorted(long[:36]) == sorted(long[36:72]) == sorted(s.prompt for s in held)
    assert shapes_prompts("heldout", 40, seed=8) != long[:40]
    with pytest.raises(ValueError, match="split"):
        shapes_prompts("test")


def test_rendering_is_deterministic_and_uses_the_palette_only():
    prompts = shapes_prompts("all", 64, seed=1)
    a = render_shapes(prompts, 32, seed=5)
    assert a.shape == (64, 3, 32, 32) and a.dtype == torch.float32
    torch.testing.assert_close(render_shapes(prompts, 32, seed=5), a, rtol=0, atol=0)
    assert not torch.equal(render_shapes(prompts, 32, seed=6), a)
    palette = torch.tensor([BACKGROUND, *COLOURS.values()])  # [5, 3]
    pixels = a.permute(0, 2, 3, 1).reshape(-1, 3)
    assert (pixels[:, None] == palette[None]).all(-1).any(-1).all()
    # objects of one image share the prompt's colour; a fixed pixel count checks the rasteriser
    spec = ShapeSpec.parse(prompts[0])
    fg = (a[0] != torch.tensor(BACKGROUND).view(3, 1, 1)).any(0)  # [32, 32]
    assert torch.equal(a[0][:, fg].T.unique(dim=0), torch.tensor([COLOURS[spec.colour]]))
    images, got = sample_shapes(8, "heldout", 64, seed=2)
    assert images.shape == (8, 3, 64, 64) and got == shapes_prompts("heldout", 8, seed=2)
    with pytest.raises(ValueError, match="multiple of 16"):
        render_shapes(prompts[:1], 40)


def test_objects_sit_in_their_half_and_do_not_touch(reward):
    for res in (32, 64):
        prompts = shapes_prompts("all", 300, seed=res)
        images = render_shapes(prompts, res, seed=0)
        st = component_stats(connected_components(reward.classify_pixels(images) > 0))
        found = (st["area"] > 0).sum(1)
        assert found.tolist() == [ShapeSpec.parse(p).count for p in prompts]  # separate blobs, one each


def test_write_dataset(tmp_path):
    folder = write_shapes_dataset(str(tmp_path / "ds"), 5, "train", 32, seed=4)
    lines = [json.loads(x) for x in open(os.path.join(folder, "metadata.jsonl"))]
    assert [x["prompt"] for x in lines] == shapes_prompts("train", 5, seed=4)
    assert open(os.path.join(folder, "prompts.txt")).read().split("\n")[:5] == shapes_prompts("train", 5, seed=4)
    from PIL import Image

    img = np.asarray(Image.open(os.path.join(folder, lines[2]["file_name"])))
    expected = (render_shapes(shapes_prompts("train", 5, seed=4), 32, seed=4)[2] * 255).round().byte()
    assert np.array_equal(img, expected.permute(1, 2, 0).numpy())
    assert lines[2]["count"] == ShapeSpec.parse(lines[2]["prompt"]).count


# ---- the reward -------------------------------------------------------------------------------
def _bfs_components(mask: np.ndarray) -> np.ndarray:
    """Reference labelling: breadth-first search, 4-connectivity, label = first pixel in raster order."""
    H, W = mask.shape
    out = np.full((H, W), H * W)
    for y in range(H):
        for x in range(W):
            if mask[y, x] and out[y, x] == H * W:
                queue = deque([(y, x)])
                out[y, x] = y * W + x
                while queue:
                    cy, cx = queue.popleft()
                    for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                        if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and out[ny, nx] == H * W:
                            out[ny, nx] = y * W + x
                            queue.append((ny, nx))
    return out


def test_connected_components_match_breadth_first_search():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(12, 13, 17, generator=gen) < torch.linspace(0.2, 0.7, 12).view(12, 1, 1)
    masks[0] = True  # one component covering everything
    masks[1] = False  # none
    masks[2, :, ::2] = True  # a comb: long geodesic paths
    masks[2, 0, :] = True
    labels = connected_components(masks)
    for m, lab in zip(masks, labels):
        assert np.array_equal(lab.numpy(), _bfs_components(m.numpy()))


def test_ground_truth_scores_one(reward):
    for res, seed in ((32, 0), (32, 1), (64, 2)):
        prompts = shapes_prompts("all", 200, seed=seed)
        parts = reward.parts(render_shapes(prompts, res, seed=seed), prompts)
        for name, value in parts.items():
            assert value.min().item() == 1.0, (res, name)
        assert torch.equal(reward(render_shapes(prompts, res, seed=seed), prompts), torch.ones(200))


def _one_wrong(spec: ShapeSpec, what: str) -> ShapeSpec:
    if what == "count":
        return replace(spec, count=2 if spec.count != 2 else 3)  # off by one
    if what == "shape":
        return replace(spec, shape=SHAPES[(SHAPES.index(spec.shape) + 1) % 3])
    if what == "position":
        return replace(spec, position=OPPOSITE[spec.position])
    return replace(spec, colour=list(COLOURS)[(list(COLOURS).index(spec.colour) + 1) % 4])


def test_perturbations_score_lower_in_order(reward):
    specs = [ShapeSpec.parse(p) for p in shapes_prompts("all", 48, seed=11)]
    prompts = [s.prompt for s in specs]
    score = {"truth": reward(render_shapes(specs, 32, seed=3), prompts)}
    parts = {}
    for what in ("count", "shape", "position", "colour"):
        images = render_shapes([_one_wrong(s, what) for s in specs], 32, seed=3)
        score[what], parts[what] = reward(images, prompts), reward.parts(images, prompts)
    two = render_shapes([_one_wrong(_one_wrong(s, "shape"), "position") for s in specs], 32, seed=3)
    score["shape+position"] = reward(two, prompts)
    assert torch.equal(score["truth"], torch.ones(48))
    # exactly the perturbed part drops; an off-by-one count keeps half its credit
    torch.testing.assert_close(parts["count"]["count"], torch.full((48,), 0.5))
    torch.testing.assert_close(score["count"], torch.full((48,), 0.875))
    torch.testing.assert_close(score["shape"], torch.full((48,), 0.75))
    torch.testing.assert_close(score["position"], torch.full((48,), 0.75))
    torch.testing.assert_close(score["shape+position"], torch.full((48,), 0.5))
    torch.testing.assert_close(score["colour"], torch.zeros(48))  # nothing of the asked colour at all
    assert all(p["exact"].sum() == 0 for p in parts.values())
    # noise: more noise, lower mean score (a little noise stays within the colour threshold)
    images = render_shapes(specs, 32, seed=3)
    gen = torch.Generator().manual_seed(0)
    noisy = [reward((images + s * torch.randn(images.shape, generator=gen)).clamp(0, 1), prompts).mean().item()
             for s in (0.05, 0.25, 0.4, 0.6)]
    assert noisy[0] == 1.0 and noisy[0] > noisy[1] > noisy[2] > noisy[3], noisy
    assert reward(torch.zeros(4, 3, 32, 32), prompts[:4]).eq(0).all()  # blank


def test_extra_objects_of_another_colour_cost_colour_credit(reward):
    spec = ShapeSpec(1, "red", "square", "left")
    image = render_shapes([spec], 32, seed=0)
    extra = render_shapes([ShapeSpec(1, "blue", "circle", "right")], 32, seed=0)
    both = torch.where((extra != 0).any(1, keepdim=True), extra, image)
    parts = reward.parts(both, [spec.prompt])
    assert 0 < parts["colour"].item() < 1
    assert parts["count"].item() == parts["shape"].item() == parts["position"].item() == 1.0


def test_graded_shape_credit_ramps_across_the_square_threshold():
    """A 10 x 10 red square in the left half with pixels cut from its corners: fill = area / 100."""
    hard, graded = ShapesReward(), ShapesReward(shape_margin=0.04)
    red = torch.tensor(COLOURS["red"]).view(3, 1, 1)
    images, prompts = [], []
    for cut in (0, 10, 12, 14, 16):  # pixels cut, as evenly as possible from the four corners
        img = torch.zeros(3, 32, 32)
        img[:, 11:21, 2:12] = red
        corners = [(11, 2, 1, 1), (11, 11, 1, -1), (20, 2, -1, 1), (20, 11, -1, -1)]
        for i in range(cut):  # walk along each corner's row, one pixel per corner in turn
            y, x, dy, dx = corners[i % 4]
            img[:, y, x + dx * (i // 4)] = 0
        images.append(img)
        prompts.append("one red square on the left")
    images = torch.stack(images)
    g, h = graded.parts(images, prompts), hard.parts(images, prompts)
    # fill 1.0, 0.90, 0.88, 0.86, 0.80: square-ness ramps linearly over 0.86..0.94 (top stays ~1/2)
    torch.testing.assert_close(g["shape"], torch.tensor([1.0, 0.5, 0.25, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(h["shape"], torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))
    assert torch.equal(g["exact"], h["exact"])  # exact always uses the hard rule
    assert torch.equal(ShapesExact(shape_margin=0.04)(images, prompts), torch.tensor([1.0, 0, 0, 0, 0]))
    circles = graded.parts(images, ["one red circle on the left"] * 5)["shape"]
    torch.testing.assert_close(circles, 1 - g["shape"], atol=1e-6, rtol=0)  # the credit moves, not doubles
    with pytest.raises(ValueError, match="shape_margin"):
        ShapesReward(shape_margin=0.2)


def test_reward_is_fast_and_validates(reward):
    prompts = shapes_prompts("all", 64, seed=0)
    images = render_shapes(prompts, 32, seed=0)
    best = float("inf")
    for _ in range(3):  # one thread (the fixture): the per-image cost
        t0 = time.perf_counter()
        reward(images, prompts)
        best = min(best, time.perf_counter() - t0)
    assert best / 64 < 5e-3, f"{best / 64 * 1e3:.2f} ms per image"
    from pro_grpo_lightning.errors import RewardError

    with pytest.raises(RewardError, match="ShapesReward.*not a shapes prompt"):  # named, one line
        reward(images[:1], ["a cat"])
    with pytest.raises(ValueError, match="part_weights"):
        ShapesReward(part_weights=(1, 1, 1))
    weighted = ShapesReward(part_weights=(0, 0, 0, 1))  # position only
    wrong = render_shapes([_one_wrong(ShapeSpec.parse(p), "shape") for p in prompts[:8]], 32, seed=0)
    assert torch.equal(weighted(wrong, prompts[:8]), torch.ones(8))


# ---- tokenizers with whole words, pkg:// sources -------------------------------------------------
def test_word_tokens_keep_the_byte_fallback():
    words = ["one", "two", "three", "red", "green", "circles", "circle", "the", "left"]
    plain, clip, t5 = byte_level_clip_tokenizer(), byte_level_clip_tokenizer(16, words), char_level_t5_tokenizer(16, words)
    assert len(plain) == 514 and len(char_level_t5_tokenizer()) == len(t5) - len(words)
    for w in words:
        assert clip.convert_ids_to_tokens(clip(w).input_ids)[1:-1] == [w + "</w>"]
        assert t5.convert_ids_to_tokens(t5(w).input_ids)[:-1] == ["\u2581" + w]
    text = "three greenish circles"  # "greenish" is not a word token: bytes
    assert clip.decode(clip(text).input_ids, skip_special_tokens=True).strip() == text
    assert clip(text).input_ids[0] == plain(text).input_ids[0] == 512  # first 514 ids unchanged


def test_pkg_sources_resolve_to_the_installed_package(tmp_path):
    import pro_grpo_lightning

    root = os.path.dirname(pro_grpo_lightning.__file__)
    assert resolve_pretrained_source("pkg://pro_grpo_lightning/assets") == os.path.join(root, "assets")
    assert resolve_pretrained_source("some/hub-id") == "some/hub-id"
    check_pretrained_source(ASSET)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        check_pretrained_source("pkg://pro_grpo_lightning/assets/nothing_here")
    with pytest.raises(FileNotFoundError, match="no installed package"):
        check_pretrained_source("pkg://no_such_package_xyz/weights")


# ---- the shipped pretrained model ----------------------------------------------------------------
def test_pretrained_asset_loads_through_sd3backend_and_generates(reward):
    from pro_grpo_lightning.backends.sd3 import SD3Backend
    from pro_grpo_lightning.evaluation import sample_items

    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(resolve_pretrained_source(ASSET))
                for f in fs)
    assert total < 10e6
    backend = SD3Backend(pretrained=ASSET, num_steps=10, guidance_scale=4.5, resolution=32,
                         max_sequence_length=12)
    backend.configure_model()
    assert backend.latent_shape() == (4, 16, 16)  # 2x VAE, 4 channels
    prompts = shapes_prompts("heldout", 36, seed=None)
    images = sample_items(backend, prompts, seeds=range(len(prompts)))
    assert images.shape == (36, 3, 32, 32) and torch.isfinite(images).all()
    assert 0 <= images.min() and images.max() <= 1
    # it was pretrained to about half right: far above chance, far from perfect
    scores = reward(images, prompts)
    assert 0.5 < scores.mean().item() < 0.98, scores.mean()
