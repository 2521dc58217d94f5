"""Seed files shipped with the service (``demo.yaml``: demo stores and a warehouse)."""
