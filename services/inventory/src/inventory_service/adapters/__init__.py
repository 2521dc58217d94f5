"""inventory service: adapters."""
