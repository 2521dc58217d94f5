"""notification service: domain."""
