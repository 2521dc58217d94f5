"""loyalty service: service."""
