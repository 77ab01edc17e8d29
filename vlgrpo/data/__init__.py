"""Datasets: sources and layouts read into one manifest, the image cache, validation (layer 2)."""
