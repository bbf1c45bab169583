"""Containerfile -> image (not yet implemented; see issue 4)."""
