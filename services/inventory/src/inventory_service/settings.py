"""Inventory settings: the platform's settings plus what only inventory needs."""

from __future__ import annotations

from omni_common.settings import ServiceSettings
from pydantic import Field


class InventorySettings(ServiceSettings):
    """Settings of the inventory service (environment variables in upper case).

    - ``INVENTORY_RESERVATION_TTL_S``: how long a reservation holds stock before its order
      must be confirmed (default 15 minutes);
    - ``INVENTORY_LOW_STOCK_THRESHOLD``: the low-stock threshold of locations that do not
      set their own;
    - ``INVENTORY_SEED_FILE``: a YAML or JSON file of locations (and initial stock) loaded at
      start; ``demo`` loads the demo stores and warehouse shipped with the service;
    - ``INVENTORY_TIMER_POLL_S``: how often due reservation expiries are looked for;
    - ``INVENTORY_POLICY_BATCH``: SKUs told per transaction when a location's policy
      changes (each takes one lock per SKU: bounded, so any number of SKUs fits the
      database's lock table);
    - ``INVENTORY_STREAM_*``: the availability stream: changes kept per SKU for clients
      that resume (``RING``), changes read back at start (``WARM``, per partition), events a
      client may fall behind before it is dropped (``QUEUE``), connected clients at most
      (``MAX_CLIENTS``) and seconds between keep-alives (``HEARTBEAT_S``).
    """

    service_name: str = "inventory"
    inventory_reservation_ttl_s: float = Field(default=900.0, gt=0)
    inventory_low_stock_threshold: int = Field(default=5, ge=0)
    inventory_seed_file: str | None = None
    inventory_timer_poll_s: float = Field(default=0.5, gt=0)
    inventory_policy_batch: int = Field(default=500, ge=1, le=5000)
    inventory_stream_ring: int = Field(default=64, ge=1)
    inventory_stream_warm: int = Field(default=1000, ge=0)
    inventory_stream_queue: int = Field(default=256, ge=1)
    inventory_stream_max_clients: int = Field(default=10_000, ge=1)
    inventory_stream_heartbeat_s: float = Field(default=15.0, gt=0)
