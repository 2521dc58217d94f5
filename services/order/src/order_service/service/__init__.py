"""order service: service."""
