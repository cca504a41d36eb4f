"""rlhfkit.clients."""
