"""kiln: daemonless OCI image builder, layer store, registry client and container runtime."""

__version__ = "0.1.0"
