"""customer-profile service: adapters."""
