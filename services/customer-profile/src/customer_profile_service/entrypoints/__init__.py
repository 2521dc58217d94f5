"""customer-profile service: entrypoints."""
