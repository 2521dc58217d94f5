"""notification service: adapters."""
