"""OCI distribution client (not yet implemented; see issue 5)."""
