"""loyalty service: entrypoints."""
