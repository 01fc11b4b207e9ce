"""Coloured shapes with exact captions: a text-to-image task whose answer can be checked.

Every image shows ``count`` (1-3) objects of one ``shape`` (circle, square, triangle) in one
``colour`` (red, green, blue, yellow) on a black background, all inside one half of the image
(``position``: left, right, top, bottom), and its prompt says exactly that:
"two red circles on the left". 4 x 3 x 3 x 4 = 144 prompts, split once and for all into 108
train and 36 held-out prompts (``shapes_prompts``); every single attribute value occurs in both.

Rendering is a pure function of (prompts, resolution, seed): sizes and centres come from one
``numpy`` PCG64 stream drawn for the whole batch, and all objects are rasterised at once by
broadcasting over a pixel grid (no per-pixel Python). Geometry, at 32 px (scaled with the side):

- object size ``s`` (bounding-box side) in 7..9 px (7..8 for three objects);
- the named half holds the objects; its long side is cut into ``count`` equal slots, one object
  per slot, so objects never touch (edges >= 2 px apart) and never cross the midline;
- square: the s x s box; circle: the inscribed disc; triangle: apex up, base = height = s;
  boxes snap to whole pixels, so each (shape, size) has one left-right and (but for the triangle)
  top-bottom symmetric pixel pattern: circles fill 0.75-0.86 of their box, squares all of it.

Pixels take exact palette colours (no anti-aliasing), so the exact reward
(``rewards.shapes.ShapesReward``) scores every rendered image 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# The prompt grammar is the reward's (it parses prompts); the task renders and splits it.
from ..rewards.shapes import (BACKGROUND, COLOURS, COUNT_WORDS, COUNTS, POSITION_PHRASES, POSITIONS,  # noqa: F401
                              SHAPES, ShapeSpec)

#: The train / held-out split is fixed (a property of the task, not of a run).
SPLIT_SEED = 0
NUM_HELDOUT = 36

#: Geometry at 32 px, in pixels; everything scales with ``resolution / 32``.
BASE_RESOLUTION = 32
SIZE_MIN, SIZE_MAX = 7, 9
GAP = 2.0  # least distance between two objects' boxes (and twice the least border margin)
MARGIN = 0.5  # least distance from an object's box to the image border / the midline

def all_specs() -> list[ShapeSpec]:
    """The 144 specs in canonical order (count, colour, shape, position)."""
    return [ShapeSpec(n, c, s, p) for n in COUNTS for c in COLOURS for s in SHAPES for p in POSITIONS]


def split_specs() -> dict[str, list[ShapeSpec]]:
    """{"train": 108 specs, "heldout": 36, "all": 144}, each in canonical order; fixed by SPLIT_SEED."""
    specs = all_specs()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(specs))
    held = set(order[:NUM_HELDOUT].tolist())
    return {"train": [s for i, s in enumerate(specs) if i not in held],
            "heldout": [s for i, s in enumerate(specs) if i in held],
            "all": specs}


def shapes_prompts(split: str = "train", n: int | None = None, seed: int | None = 0) -> list[str]:
    """Prompts of a split ("train", "heldout" or "all").

    ``n=None``: the whole split, in canonical order if ``seed`` is None, else shuffled by ``seed``.
    ``n`` given: the first ``n`` of a stream of seeded shuffles of the split (repeats once the split
    is used up), so any ``n`` works and equal (split, seed) give prefixes of one stream.
    """
    splits = split_specs()
    if split not in splits:
        raise ValueError(f"split must be one of {sorted(splits)}, got {split!r}")
    prompts = [s.prompt for s in splits[split]]
    if seed is None:
        if n is None:
            return prompts
        return [prompts[i % len(prompts)] for i in range(n)]
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    total = len(prompts) if n is None else n
    out: list[str] = []
    while len(out) < total:
        out += [prompts[i] for i in rng.permutation(len(prompts))]
    return out[:total]


def _as_specs(items: Sequence[ShapeSpec | str]) -> list[ShapeSpec]:
    return [s if isinstance(s, ShapeSpec) else ShapeSpec.parse(s) for s in items]


def layout_objects(specs: Sequence[ShapeSpec], resolution: int = BASE_RESOLUTION,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Every object's image, centre, size, shape and colour: arrays of length N = sum of counts.

    One PCG64 stream (``seed``) draws three uniforms per object, in image order, so the layout
    of image i depends on the images before it only through the stream position.
    """
    scale = resolution / BASE_RESOLUTION
    counts = np.array([s.count for s in specs], dtype=np.int64)  # [B]
    image = np.repeat(np.arange(len(specs)), counts)  # [N]
    slot_index = np.concatenate([np.arange(c) for c in counts]) if len(specs) else np.zeros(0, np.int64)  # [N]
    n = counts[image].astype(np.float64)  # [N] objects in the same image
    u = np.random.default_rng(seed).random((image.size, 3))  # [N, 3]: size, long axis, short axis

    slot = resolution / n  # [N] length of each object's slot along the long axis
    largest = np.minimum(SIZE_MAX, np.floor(BASE_RESOLUTION / n) - GAP)  # [N] 9, 9, 8 for 1, 2, 3 objects
    size_px = SIZE_MIN + np.floor(u[:, 0] * (largest - SIZE_MIN + 1))  # [N] integer sizes at 32 px
    size = size_px * scale  # [N]
    long_c = slot * (slot_index + 0.5) + (u[:, 1] - 0.5) * (slot - size - GAP * scale)  # [N]
    half = resolution / 2
    margin = MARGIN * scale
    far = np.array([specs[i].position in ("right", "bottom") for i in image], dtype=np.float64)  # [N]
    short_c = far * half + margin + size / 2 + u[:, 2] * (half - size - 2 * margin)  # [N]
    vertical = np.array([specs[i].position in ("left", "right") for i in image])  # [N] long axis is y
    # Snap every box to whole pixels (edges on integers), so each (shape, size) has one symmetric
    # pixel pattern and small circles never come out nearly square.
    cx = _snap(np.where(vertical, short_c, long_c), size)  # [N]
    cy = _snap(np.where(vertical, long_c, short_c), size)  # [N]
    shape = np.array([SHAPES.index(specs[i].shape) for i in image], dtype=np.int64)  # [N]
    colour = np.array([list(COLOURS).index(specs[i].colour) for i in image], dtype=np.int64)  # [N]
    return {"image": image, "cx": cx, "cy": cy, "size": size, "shape": shape, "colour": colour}


def _snap(centre: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Centres moved (by < 1/2 px) so that the box ``centre +- size / 2`` has integer edges."""
    return np.round(centre - size / 2) + size / 2


def rasterise(objects: dict[str, np.ndarray], resolution: int) -> Tensor:
    """[N, R, R] bool masks of the objects, all at once (pixel centres at i + 0.5)."""
    grid = torch.arange(resolution, dtype=torch.float64) + 0.5  # [R]
    cx = torch.from_numpy(objects["cx"])[:, None, None]  # [N, 1, 1]
    cy = torch.from_numpy(objects["cy"])[:, None, None]
    h = torch.from_numpy(objects["size"])[:, None, None] / 2  # [N, 1, 1] half size
    dx = grid[None, None, :] - cx  # [N, 1, R]
    dy = grid[None, :, None] - cy  # [N, R, 1]
    square = (dx.abs() < h) & (dy.abs() < h)  # [N, R, R]
    circle = dx**2 + dy**2 < h**2  # [N, R, R]
    depth = (dy + h) / (2 * h)  # [N, R, 1] 0 at the apex row, 1 at the base
    triangle = (depth > 0) & (depth < 1) & (dx.abs() < depth * h)  # [N, R, R] apex up
    shape = torch.from_numpy(objects["shape"])[:, None, None]  # [N, 1, 1]
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))  # [N, R, R]


def render_shapes(prompts: Sequence[ShapeSpec | str], resolution: int = BASE_RESOLUTION,
                  seed: int = 0) -> Tensor:
    """Images [B, 3, R, R] float32 in [0, 1] for prompts (or specs); deterministic in ``seed``."""
    if resolution < 16 or resolution % 16:
        raise ValueError(f"resolution must be a positive multiple of 16, got {resolution}")
    specs = _as_specs(prompts)
    objects = layout_objects(specs, resolution, seed)
    masks = rasterise(objects, resolution).float()  # [N, R, R]
    B = len(specs)
    fg = torch.zeros(B, resolution, resolution).index_add_(0, torch.from_numpy(objects["image"]), masks)  # [B, R, R]
    fg = fg.clamp(max=1)[:, None]  # [B, 1, R, R]
    palette = torch.tensor([COLOURS[s.colour] for s in specs]).view(B, 3, 1, 1)  # [B, 3, 1, 1]
    bg = torch.tensor(BACKGROUND).view(1, 3, 1, 1)
    return (fg * palette + (1 - fg) * bg).float()  # [B, 3, R, R]


def sample_shapes(n: int, split: str = "train", resolution: int = BASE_RESOLUTION,
                  seed: int = 0) -> tuple[Tensor, list[str]]:
    """``n`` (image, prompt) pairs of a split: prompts from ``shapes_prompts(split, n, seed)``."""
    prompts = shapes_prompts(split, n, seed)
    return render_shapes(prompts, resolution, seed), prompts


def write_shapes_dataset(folder: str, n: int, split: str = "train", resolution: int = BASE_RESOLUTION,
                         seed: int = 0) -> str:
    """PNG files plus ``metadata.jsonl`` (file, prompt and attributes per line) and ``prompts.txt``."""
    from PIL import Image

    images, prompts = sample_shapes(n, split, resolution, seed)
    os.makedirs(folder, exist_ok=True)
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [n, R, R, 3]
    width = max(5, len(str(n - 1)))
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as meta:
        for i, (img, prompt) in enumerate(zip(pixels, prompts)):
            name = f"{i:0{width}d}.png"
            Image.fromarray(img).save(os.path.join(folder, name))
            spec = ShapeSpec.parse(prompt)
            meta.write(json.dumps({"file_name": name, "prompt": prompt, "count": spec.count,
                                   "colour": spec.colour, "shape": spec.shape,
                                   "position": spec.position}) + "\n")
    with open(os.path.join(folder, "prompts.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(prompts) + "\n")
    return folder
