"""The embedded development stack: no Docker, no Kafka or PostgreSQL install.

- :mod:`omni_common.devstack.postgres`: ``EmbeddedPostgres`` (PostgreSQL 18 on TCP).
- :mod:`omni_common.devstack.kafka`: ``TansuBroker`` (a Kafka-compatible broker, memory storage).
- :mod:`omni_common.devstack.topics`: ``create_topics`` / ``wait_for_broker``.
- :mod:`omni_common.devstack.stack`: ``DevStack``, behind ``omni dev up|down|status``.
"""
