"""rlhfkit.training."""
