"""rlhfkit.server."""
