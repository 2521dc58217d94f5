"""The embedded development stack: no Docker, no Kafka or PostgreSQL install.

- :mod:`omni_devkit.devstack.postgres`: ``EmbeddedPostgres`` (PostgreSQL 18 on TCP).
- :mod:`omni_devkit.devstack.kafka`: ``ApacheKafkaBroker`` (real Apache Kafka in KRaft mode,
  jars fetched once by Maven, needs Java 17+) and ``TansuBroker`` (a Kafka-compatible broker,
  memory storage, the fallback without Java); ``choose_broker`` picks one.

- :mod:`omni_devkit.devstack.stack`: ``DevStack``, behind ``omni dev up|down|status``.
"""
