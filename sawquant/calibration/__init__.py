"""Calibration: capture a model's post-RoPE K/V/Q, measure outliers and quantization error, and
choose per layer the rotation block, group size and fallback heads (``sawquant calibrate``)."""

from sawquant.calibration.api import (
    CalibrationResult,
    LayerSummary,
    calibrate,
    calibrate_checkpoint,
    load_calibration,
)
from sawquant.calibration.recipe import Recipe, available_recipes, default_recipe_name, load_recipe

__all__ = [
    "CalibrationResult",
    "LayerSummary",
    "Recipe",
    "available_recipes",
    "calibrate",
    "calibrate_checkpoint",
    "default_recipe_name",
    "load_calibration",
    "load_recipe",
]
