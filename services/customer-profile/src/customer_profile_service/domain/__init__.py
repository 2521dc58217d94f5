"""customer-profile service: domain."""
