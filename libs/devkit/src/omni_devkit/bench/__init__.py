"""The benchmarks behind ``omni bench NAME``: one module a benchmark.

Each module adds its command to :data:`omni_devkit.cli.bench_app` when imported, and is
registered under the ``omni.bench`` entry point group in the devkit's ``pyproject.toml``, so
``omni bench`` loads it (another installed package may register benchmarks of its own the
same way). What they share (where the stack is, consumers, a private stack, the raw broker
baseline) is in :mod:`omni_devkit.bench.kit`.

The benchmarks drive the services as a channel team would, through Kafka and HTTP, and start
them through their ``create_app`` (or as processes). The services never import this package:
it is part of the developer kit, which the container image does not carry.
"""
