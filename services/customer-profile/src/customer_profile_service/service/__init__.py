"""customer-profile service: service."""
