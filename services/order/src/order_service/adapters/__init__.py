"""order service: adapters."""
