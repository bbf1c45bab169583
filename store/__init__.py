"""kiln storage: OCI layout store, blobs, layers, images."""
