"""inventory service: entrypoints."""
