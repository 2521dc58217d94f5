"""loyalty service: domain."""
