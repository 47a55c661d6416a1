"""The shapes task: synthetic images of coloured shapes with questions that need the image."""

from cppo.toy.shapes import (
    CHANCE,
    COLORS,
    DEFAULT_IMAGE_SIZE,
    QUESTION_TYPES,
    SHAPES,
    SPLITS,
    Scene,
    Shape,
    ShapesItem,
    export_shapes_dataset,
    make_item,
    make_scene,
    render,
    split_items,
    target_response,
)

__all__ = [
    "CHANCE",
    "COLORS",
    "DEFAULT_IMAGE_SIZE",
    "QUESTION_TYPES",
    "SHAPES",
    "SPLITS",
    "Scene",
    "Shape",
    "ShapesItem",
    "export_shapes_dataset",
    "make_item",
    "make_scene",
    "render",
    "split_items",
    "target_response",
]
