"""The exact reward of the shapes task (``tasks.shapes``): parse the prompt, measure the image.

Per image, all in batched tensor ops (no per-pixel Python, no SciPy):

1. Colour classes: each pixel takes the nearest palette colour (background or one of the four
   object colours) if it lies within ``colour_threshold`` (RGB Euclidean distance); otherwise it
   is unclassified (an edge blend, a smear).
2. Objects: 4-connected components of the prompt colour's mask (parallel min-label propagation
   with pointer jumping), ignoring specks smaller than ``min_area`` (a fraction of the image).
3. Shape of each object from two numbers of its bounding box: ``fill`` (area / box area) and
   ``top`` (share of the area in the box's upper half, a middle row counting half). A triangle
   (apex up) has top 1/4, circles and squares 1/2, and blur keeps these apart (it shaves the
   apex and rounds corners but moves little mass between the halves): ``top`` below
   ``triangle_top`` is a triangle; else ``fill`` above ``square_fill`` a square (1 ideally; a
   square missing its four corner pixels still is one), else a circle (pi/4; 0.75-0.86 as drawn).
4. Position: an object's centroid lies in the named half.

Parts, each in [0, 1] (the score is their weighted mean):
    colour:   share of the colour-classified object pixels that have the prompt's colour, over
              ``colour_purity`` and capped at 1 (0 with no coloured pixels): wrong colours and
              extra objects cost, a few stray edge pixels do not (group-normalised advantages
              would otherwise turn a 0.99-vs-1 difference into a full-size signal)
    count:    1 / (1 + |objects found - count asked|), 0 when no object of the colour is found
    shape:    share of the found objects with the asked shape; with ``shape_margin`` m > 0 each
              object's credit is graded near the two decision boundaries: its square-ness ramps
              linearly over ``square_fill -+ m`` and its triangle-ness over ``triangle_top -+ m``
              (drawn shapes lie outside both ramps, so ground truth still scores 1), so a square
              that is getting sharper earns more before it crosses the threshold: RL sees a slope
              where the hard rule gives a step. ``exact`` always uses the hard rule.
    position: share of the found objects whose centroid is in the asked half
``parts`` adds ``exact``: 1 where all four are 1 (the image is right), else 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..tasks.shapes import BACKGROUND, COLOURS, SHAPES, ShapeSpec
from .base import Reward

PART_NAMES = ("colour", "count", "shape", "position")


def connected_components(mask: Tensor) -> Tensor:
    """4-connected components of a batch of masks.

    mask [B, H, W] bool -> labels [B, H, W] long: each foreground pixel gets the flat index
    (y * W + x) of its component's first pixel in raster order; background pixels get H * W.
    Min-label propagation to the 4 neighbours, then pointer jumping (``label <- label[label]``),
    repeated until nothing changes: a few dozen iterations even for snake-like blobs.
    """
    B, H, W = mask.shape
    n = H * W
    idx = torch.arange(n, device=mask.device).expand(B, n)  # [B, HW]
    flat_mask = mask.reshape(B, n)  # [B, HW]
    labels = torch.where(flat_mask, idx, n)  # [B, HW]
    while True:
        grid = labels.new_full((B, H + 2, W + 2), n)  # [B, H+2, W+2] a frame of background labels
        grid[:, 1:-1, 1:-1] = labels.view(B, H, W)
        # elementwise minimum of the pixel and its 4 neighbours (much faster than stack + amin)
        neighbours = torch.minimum(torch.minimum(grid[:, 1:-1, 1:-1], grid[:, :-2, 1:-1]),
                                   torch.minimum(grid[:, 2:, 1:-1], grid[:, 1:-1, :-2]))
        neighbours = torch.minimum(neighbours, grid[:, 1:-1, 2:])  # [B, H, W]
        new = torch.where(flat_mask, neighbours.reshape(B, n), n)  # [B, HW]
        # pointer jumping: a label is a pixel of the same component whose own label is <= it
        padded = torch.cat([new, new.new_full((B, 1), n)], 1)  # [B, HW + 1] (index n -> n)
        new = torch.gather(padded, 1, new)  # [B, HW]
        if torch.equal(new, labels):
            return labels.view(B, H, W)
        labels = new


def component_stats(labels: Tensor) -> dict[str, Tensor]:
    """Per-label statistics, indexed by label (the root pixel): each [B, H*W].

    area, centroid (cx, cy in pixels, pixel centres at i + 0.5), bounding box (x0, x1, y0, y1,
    inclusive pixel indices) and ``top_area``: pixels in the upper half of the box.
    """
    B, H, W = labels.shape
    n = H * W
    dev = labels.device
    lab = labels.reshape(B, n)  # [B, HW]
    fg = lab < n  # [B, HW]
    slot = torch.where(fg, lab, 0)  # [B, HW] background pixels scatter into slot 0 with weight 0
    ys = torch.arange(H, device=dev).repeat_interleave(W).expand(B, n).float()  # [B, HW]
    xs = torch.arange(W, device=dev).repeat(H).expand(B, n).float()  # [B, HW]
    w = fg.float()  # [B, HW]
    zeros = torch.zeros(B, n, device=dev)
    area = zeros.scatter_add(1, slot, w)  # [B, HW]
    sx = zeros.scatter_add(1, slot, w * (xs + 0.5))
    sy = zeros.scatter_add(1, slot, w * (ys + 0.5))
    big = float(max(H, W))
    x0 = torch.full((B, n), big, device=dev).scatter_reduce(1, slot, torch.where(fg, xs, big), "amin")
    y0 = torch.full((B, n), big, device=dev).scatter_reduce(1, slot, torch.where(fg, ys, big), "amin")
    x1 = torch.full((B, n), -1.0, device=dev).scatter_reduce(1, slot, torch.where(fg, xs, -1.0), "amax")
    y1 = torch.full((B, n), -1.0, device=dev).scatter_reduce(1, slot, torch.where(fg, ys, -1.0), "amax")
    mid = torch.gather((y0 + y1 + 1) / 2, 1, slot)  # [B, HW] each pixel's box's vertical middle
    # pixels above the middle count 1, a middle row (odd box height) 1/2: symmetric blobs get 1/2
    upper = ((ys + 0.5 < mid).float() + 0.5 * (ys + 0.5 == mid).float()) * w  # [B, HW]
    top_area = zeros.scatter_add(1, slot, upper)
    safe = area.clamp(min=1)
    return {"area": area, "cx": sx / safe, "cy": sy / safe, "x0": x0, "x1": x1, "y0": y0, "y1": y1,
            "top_area": top_area}


class ShapesReward(Reward):
    """Exact, graded reward of the shapes task; see the module docstring.

    Args:
        colour_threshold: largest RGB distance at which a pixel counts as a palette colour
            (palette colours are >= 1 apart).
        colour_purity: share of the coloured pixels in the prompt's colour that earns full colour
            credit.
        min_area: smallest object, as a fraction of the image's pixels (4 px at 32 px).
        square_fill: bounding-box fill above which a non-triangle is a square.
        triangle_top: ``top`` below which a blob is a triangle (see the module docstring).
        shape_margin: half-width of the linear ramps that grade the shape credit around
            ``square_fill`` and ``triangle_top`` (0: the hard rule).
        part_weights: weights of (colour, count, shape, position) in the score (normalised).
        weight, name: see ``Reward``.
    """

    default_name = "shapes"

    def __init__(self, colour_threshold: float = 0.5, colour_purity: float = 0.9, min_area: float = 4 / 1024, square_fill: float = 0.9,
                 triangle_top: float = 0.4, shape_margin: float = 0.0, part_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        if len(part_weights) != len(PART_NAMES) or min(part_weights) < 0 or sum(part_weights) <= 0:
            raise ValueError(f"part_weights must be {len(PART_NAMES)} non-negative weights for {PART_NAMES} "
                             f"with a positive sum, got {list(part_weights)}")
        if not 0 < colour_threshold < 1:
            raise ValueError(f"colour_threshold must be in (0, 1) (palette colours are 1 apart), got {colour_threshold}")
        if not 0 < colour_purity <= 1:
            raise ValueError(f"colour_purity must be in (0, 1], got {colour_purity}")
        if not 0 <= shape_margin < 0.1:
            raise ValueError(f"shape_margin must be in [0, 0.1) (drawn shapes must stay outside the ramps), "
                             f"got {shape_margin}")
        self.colour_threshold = float(colour_threshold)
        self.shape_margin = float(shape_margin)
        self.colour_purity = float(colour_purity)
        self.min_area = float(min_area)
        self.square_fill = float(square_fill)
        self.triangle_top = float(triangle_top)
        w = torch.tensor(list(part_weights), dtype=torch.float32)
        self.register_buffer("part_weights", w / w.sum(), persistent=False)
        # row 0 is the background, rows 1.. the colours in COLOURS order
        self.register_buffer("palette", torch.tensor([BACKGROUND, *COLOURS.values()]), persistent=False)

    def classify_pixels(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, H, W] long: 0 background, 1.. the colours, -1 unclassified."""
        pal = self.palette.to(images.device, torch.float32)  # [C + 1, 3]
        x = images.float()
        # |x - p|^2 = |x|^2 - 2 x.p + |p|^2, one small contraction instead of a [B, C+1, 3, H, W] tensor
        d2 = (x * x).sum(1, keepdim=True) - 2 * torch.einsum("bchw,kc->bkhw", x, pal) \
            + (pal * pal).sum(1).view(1, -1, 1, 1)  # [B, C + 1, H, W]
        dist2, cls = d2.min(1)  # [B, H, W]
        return torch.where(dist2 <= self.colour_threshold ** 2, cls, -1)

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Raise ``ValueError`` naming the first prompt this reward cannot parse (cheap: text only)."""
        for p in prompts:
            ShapeSpec.parse(p)

    @torch.no_grad()
    def parts(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """{"colour", "count", "shape", "position", "exact"}: each [B] float32 in [0, 1]."""
        B, _, H, W = images.shape
        if len(prompts) != B:
            raise ValueError(f"{self.name}: {B} images but {len(prompts)} prompts")
        dev = images.device
        specs = [ShapeSpec.parse(p) for p in prompts]
        colour_id = torch.tensor([1 + list(COLOURS).index(s.colour) for s in specs], device=dev)  # [B]
        want_count = torch.tensor([s.count for s in specs], device=dev, dtype=torch.float32)  # [B]
        want_shape = torch.tensor([SHAPES.index(s.shape) for s in specs], device=dev)  # [B]
        pos = [s.position for s in specs]

        cls = self.classify_pixels(images)  # [B, H, W]
        target = cls == colour_id.view(B, 1, 1)  # [B, H, W]
        coloured = (cls > 0).flatten(1).sum(1).float()  # [B]
        purity = target.flatten(1).sum(1) / coloured.clamp(min=1)  # [B]
        colour = torch.where(coloured > 0, (purity / self.colour_purity).clamp(max=1), 0.0)  # [B]

        st = component_stats(connected_components(target))
        is_obj = st["area"] >= max(1.0, self.min_area * H * W)  # [B, HW] one entry per real object
        found = is_obj.sum(1).float()  # [B]
        count = torch.where(found > 0, 1 / (1 + (found - want_count).abs()), 0.0)  # [B]

        box = (st["x1"] - st["x0"] + 1).clamp(min=1) * (st["y1"] - st["y0"] + 1).clamp(min=1)  # [B, HW]
        fill = st["area"] / box  # [B, HW]
        top = st["top_area"] / st["area"].clamp(min=1)  # [B, HW]
        shape_id = torch.where(top < self.triangle_top, 2, torch.where(fill > self.square_fill, 1, 0))  # [B, HW]
        safe_found = found.clamp(min=1)
        hard_shape = ((shape_id == want_shape[:, None]) & is_obj).sum(1) / safe_found  # [B]
        if self.shape_margin > 0:
            m = self.shape_margin
            tri = ((self.triangle_top + m - top) / (2 * m)).clamp(0, 1)  # [B, HW] triangle-ness
            sq = ((fill - self.square_fill + m) / (2 * m)).clamp(0, 1)  # [B, HW] square-ness
            credit = torch.stack([(1 - tri) * (1 - sq), (1 - tri) * sq, tri], -1)  # [B, HW, 3] circle/square/triangle
            wanted = credit.gather(-1, want_shape.view(B, 1, 1).expand(B, credit.shape[1], 1)).squeeze(-1)  # [B, HW]
            shape = (wanted * is_obj).sum(1) / safe_found  # [B]
        else:
            shape = hard_shape

        left = torch.tensor([p == "left" for p in pos], device=dev)[:, None]  # [B, 1]
        right = torch.tensor([p == "right" for p in pos], device=dev)[:, None]
        top_pos = torch.tensor([p == "top" for p in pos], device=dev)[:, None]
        inside = torch.where(left, st["cx"] < W / 2, torch.where(right, st["cx"] > W / 2, torch.where(
            top_pos, st["cy"] < H / 2, st["cy"] > H / 2)))  # [B, HW]
        position = (inside & is_obj).sum(1) / safe_found  # [B]

        out = {"colour": colour, "count": count, "shape": shape.float(), "position": position.float()}
        out = {k: v.float() for k, v in out.items()}
        hard = {**out, "shape": hard_shape.float()}
        out["exact"] = torch.stack([hard[k] for k in PART_NAMES]).eq(1).all(0).float()  # [B]
        return out

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        p = self.parts(images, prompts)
        stacked = torch.stack([p[k] for k in PART_NAMES], 1)  # [B, 4]
        return stacked @ self.part_weights.to(stacked.device)  # [B]

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, colour_threshold={self.colour_threshold}, min_area={self.min_area}, "
                f"shape_margin={self.shape_margin}")


class ShapesExact(ShapesReward):
    """1 where the image is exactly right (all four parts), else 0: the task's strict measure.

    Meant as an evaluation reward (``eval_rewards``: the held-out exact rate in TensorBoard and the
    evaluation table); as a training reward it gives groups far less spread than the graded score.
    Takes ``ShapesReward``'s arguments (``shape_margin`` has no effect: exact uses the hard rule).
    """

    default_name = "shapes_exact"

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.parts(images, prompts)["exact"]  # [B]
