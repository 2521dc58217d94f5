"""inventory service: use cases, each inside one transaction the caller opens."""
