"""Every API route of every installed service declares the scope it needs.

Probes, metrics and the contract pages are public by design (not in the OpenAPI
document); everything in the OpenAPI document must depend on ``omni_common.auth.require``
(or ``require_shopper``). A route taking the bare ``Channel`` (any valid key) fails here.
"""

from __future__ import annotations

import pytest
from omni_common.auth import SCOPES, api_routes, declared_scopes
from omni_common.service import service_factories
from omni_common.settings import ServiceSettings

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("service", sorted(service_factories()))
def test_every_documented_route_requires_a_scope(service: str) -> None:
    app = service_factories()[service].load()(ServiceSettings(service_name=service))
    unscoped = []
    routes = api_routes(app.routes)
    documented = {path for path in app.openapi()["paths"]}
    assert documented <= {route.path for route in routes}  # no route escapes the check
    for route in routes:
        if not route.include_in_schema:
            continue
        scopes = declared_scopes(route)
        assert scopes <= SCOPES.keys() | {"public"}
        if not scopes:
            unscoped.append(f"{sorted(route.methods)} {route.path}")
    assert unscoped == [], f"{service}: routes without a scope: {unscoped}"
