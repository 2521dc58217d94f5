"""customer-profile service."""
