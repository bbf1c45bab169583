"""Linux isolation for kiln run and RUN steps (not yet implemented; see issue 3)."""
