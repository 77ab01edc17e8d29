"""Deterministic CLEVR-like scene generator (placeholder constants; the generator lands next)."""
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
          "purple": (150, 60, 200), "orange": (240, 140, 30), "cyan": (40, 200, 210), "white": (245, 245, 245)}
