"""The order domain: the aggregate, its state machine and the rules it enforces (no I/O)."""
