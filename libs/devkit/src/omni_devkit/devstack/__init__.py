"""The embedded development stack: no Docker, no Kafka or PostgreSQL install.

- :mod:`omni_devkit.devstack.postgres`: ``EmbeddedPostgres`` (PostgreSQL 18 on TCP).
- :mod:`omni_devkit.devstack.kafka`: ``TansuBroker`` (a Kafka-compatible broker, memory storage).

- :mod:`omni_devkit.devstack.stack`: ``DevStack``, behind ``omni dev up|down|status``.
"""
