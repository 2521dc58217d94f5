"""order service: entrypoints."""
