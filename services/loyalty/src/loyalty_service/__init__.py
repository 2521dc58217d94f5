"""loyalty service."""
