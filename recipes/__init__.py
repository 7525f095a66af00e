"""YAML calibration recipes shipped as package data (``sawquant.recipes``)."""
