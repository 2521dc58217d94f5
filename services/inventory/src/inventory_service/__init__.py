"""inventory service."""
