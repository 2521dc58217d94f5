"""notification service: service."""
