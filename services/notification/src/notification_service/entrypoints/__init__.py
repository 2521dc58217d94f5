"""notification service: entrypoints."""
