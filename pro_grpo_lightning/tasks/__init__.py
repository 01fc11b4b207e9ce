"""Procedural image-text tasks with exact answers: a proving ground that needs no downloads."""

from .shapes import ShapeSpec, render_shapes, shapes_prompts, write_shapes_dataset

__all__ = ["ShapeSpec", "render_shapes", "shapes_prompts", "write_shapes_dataset"]
