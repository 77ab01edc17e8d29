"""The GRPO maths: advantages, per-token losses and their aggregation, log-probabilities (layer 4)."""
