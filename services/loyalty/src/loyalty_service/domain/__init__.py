"""The loyalty domain: pure rules, no I/O."""
