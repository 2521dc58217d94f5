"""loyalty service: adapters."""
