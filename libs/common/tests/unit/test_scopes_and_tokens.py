"""Scopes per key, shopper tokens, and the HTTP guards every service gets by construction."""

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Annotated

import asyncpg
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import APIRouter, Depends
from omni_common.auth import DEFAULT_SCOPES, Caller, parse_api_keys, require, require_shopper
from omni_common.http import create_http_app
from omni_common.service import ServiceRuntime
from omni_common.settings import ServiceSettings
from pydantic import BaseModel, ValidationError

SECRET = "unit-test-shopper-secret-at-least-32-bytes"
KEYS = (
    "ops:ops-key-123:admin,pos:pos-key-123,web:web-key-123,"
    "call_center:cc-key-1234,robot:robot-key-1:stock.read+reports.read"
)


def _token(sub: str, secret: str = SECRET, **claims: object) -> str:
    payload = {"sub": sub, "exp": int(time.time()) + 60, "iss": "idp", "aud": "omni", **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def _hand_signed_hs256(header: dict, claims: dict, secret: str) -> str:
    # PyJWT refuses to sign with a public key as HMAC secret; an attacker would not.
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + b64(signature)).decode()


def _app(**settings: object):
    values = {
        "service_name": "probe",
        "api_keys": KEYS,
        "shopper_token_hs256_secret": SECRET,
        "shopper_token_issuer": "idp",
        "shopper_token_audience": "omni",
        **settings,
    }
    runtime = ServiceRuntime(ServiceSettings(**values))
    router = APIRouter()

    @router.put("/locations/{location_id}")
    async def put_location(
        location_id: str, caller: Annotated[Caller, Depends(require("locations.write"))]
    ) -> dict[str, str]:
        return {"by": caller.channel}

    @router.get("/customers/{customer_id}/orders")
    async def orders_of(
        customer_id: str, caller: Annotated[Caller, Depends(require_shopper("orders.read"))]
    ) -> dict[str, str | None]:
        return {"customer": customer_id, "as_shopper": caller.shopper_id}

    class Body(BaseModel):
        customer_id: str
        note: str = ""

    @router.post("/checkout")
    async def checkout(
        body: Body, caller: Annotated[Caller, Depends(require("checkout.write", shopper=True))]
    ) -> dict[str, str]:
        caller.check_shopper(body.customer_id)
        return {"ok": body.customer_id}

    @router.get("/overflow")
    async def overflow() -> None:
        raise asyncpg.NumericValueOutOfRangeError("integer out of range")

    return create_http_app(runtime, title="probe", routers=[router])


async def _call(app, method: str, path: str, key: str | None = None, **kwargs) -> httpx.Response:
    headers = kwargs.pop("headers", {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:
        return await client.request(method, path, headers=headers, **kwargs)


def test_entries_get_their_channels_default_scopes() -> None:
    keys = parse_api_keys(KEYS)
    assert keys["ops-key-123"].scopes == {"admin"}
    assert keys["pos-key-123"].scopes == DEFAULT_SCOPES["pos"] == {"sales.write", "stock.read"}
    assert "shopper" in keys["web-key-123"].scopes
    assert "orders.cancel" in keys["cc-key-1234"].scopes
    assert keys["robot-key-1"].scopes == {"stock.read", "reports.read"}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("web:s3cret-value:stock.raed", "unknown scope"),
        ("robot:s3cret-value", "no default scopes"),
        ("web:s3cret", "at least 8"),
        ("s3cret-value-without-channel", "is not CHANNEL"),
        ("Web Site:s3cret-value", "short lower-case name"),
        ("web:s3cret-value,app:s3cret-value", "twice"),
    ],
)
def test_a_bad_entry_stops_start_up_without_showing_the_secret(entry: str, message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        ServiceSettings(api_keys=entry)
    text = str(refused.value)
    assert message in text
    assert "s3cret" not in text


def test_shopper_token_settings_are_checked_at_start_up() -> None:
    with pytest.raises(ValidationError, match="at least 32 bytes") as short:
        ServiceSettings(shopper_token_hs256_secret="tiny-secret")
    assert "tiny-secret" not in str(short.value)
    with pytest.raises(ValidationError, match="only one of"):
        ServiceSettings(shopper_token_hs256_secret=SECRET, shopper_token_jwks_url="http://x/")
    with pytest.raises(ValidationError, match="not a usable JWKS"):
        ServiceSettings(shopper_token_jwks_file="/nonexistent/jwks.json")


async def test_each_route_needs_its_scope() -> None:
    app = _app()
    assert (await _call(app, "PUT", "/locations/w1")).status_code == 401
    assert (await _call(app, "PUT", "/locations/w1", "not-a-key")).status_code == 401
    refused = await _call(app, "PUT", "/locations/w1", "pos-key-123")
    assert refused.status_code == 403
    assert refused.json() == {"detail": "the pos key lacks scope locations.write"}
    assert (await _call(app, "PUT", "/locations/w1", "web-key-123")).status_code == 403
    assert (await _call(app, "PUT", "/locations/w1", "ops-key-123")).json() == {"by": "ops"}


async def test_staff_keys_read_any_shopper_web_keys_only_their_own() -> None:
    app = _app()
    path = "/customers/c-1/orders"
    staff = await _call(app, "GET", path, "cc-key-1234")
    assert staff.json() == {"customer": "c-1", "as_shopper": None}
    assert (await _call(app, "GET", path, "pos-key-123")).status_code == 403

    no_token = await _call(app, "GET", path, "web-key-123")
    assert no_token.status_code == 401 and "X-Shopper-Token" in no_token.json()["detail"]
    own = await _call(app, "GET", path, "web-key-123", headers={"X-Shopper-Token": _token("c-1")})
    assert own.json() == {"customer": "c-1", "as_shopper": "c-1"}
    other = await _call(app, "GET", path, "web-key-123", headers={"X-Shopper-Token": _token("c-2")})
    assert other.status_code == 403


@pytest.mark.parametrize(
    "token",
    [
        _token("c-1", secret="another-secret-that-is-32-bytes-long!!"),  # forged
        _token("c-1", exp=int(time.time()) - 3600),  # expired
        _token("c-1", aud="someone-else"),
        _token("c-1", iss="evil-idp"),
        jwt.encode({"sub": "c-1", "exp": int(time.time()) + 60}, key=None, algorithm="none"),
        "not-a-jwt",
    ],
)
async def test_untrustworthy_tokens_are_refused(token: str) -> None:
    response = await _call(
        _app(), "GET", "/customers/c-1/orders", "web-key-123", headers={"X-Shopper-Token": token}
    )
    assert response.status_code == 401


async def test_a_shopper_checks_out_only_for_themselves() -> None:
    app = _app()
    headers = {"X-Shopper-Token": _token("c-1")}
    own = await _call(app, "POST", "/checkout", "web-key-123", headers=headers,
                      json={"customer_id": "c-1"})  # fmt: skip
    assert own.status_code == 200
    other = await _call(app, "POST", "/checkout", "web-key-123", headers=dict(headers),
                        json={"customer_id": "c-2"})  # fmt: skip
    assert other.status_code == 403
    # The web key's checkout.write is "my checkout": without a token it is refused.
    assert (
        await _call(app, "POST", "/checkout", "web-key-123", json={"customer_id": "c-1"})
    ).status_code == 401
    assert (
        await _call(app, "POST", "/checkout", "ops-key-123", json={"customer_id": "c-2"})
    ).status_code == 200


async def test_es256_tokens_from_a_jwks_file(tmp_path: Path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1"}]}))
    app = _app(shopper_token_hs256_secret=None, shopper_token_jwks_file=str(tmp_path / "jwks.json"))
    claims = {"sub": "c-9", "exp": int(time.time()) + 60, "iss": "idp", "aud": "omni"}
    good = jwt.encode(claims, private, algorithm="ES256", headers={"kid": "k1"})
    response = await _call(
        app, "GET", "/customers/c-9/orders", "web-key-123", headers={"X-Shopper-Token": good}
    )
    assert response.json()["as_shopper"] == "c-9"
    # An HS256 token signed with the public key as secret (algorithm confusion) is refused.
    confused = _hand_signed_hs256({"alg": "HS256", "kid": "k1"}, claims, json.dumps(jwk))
    response = await _call(
        app, "GET", "/customers/c-9/orders", "web-key-123", headers={"X-Shopper-Token": confused}
    )
    assert response.status_code == 401


async def test_bodies_above_the_limit_are_refused_before_parsing() -> None:
    app = _app(http_max_body_bytes=1000)
    big = {"customer_id": "c-1", "note": "x" * 2000}
    response = await _call(app, "POST", "/checkout", "ops-key-123", json=big)
    assert response.status_code == 413

    async def chunks():
        for _ in range(5):
            yield b" " * 400

    streamed = await _call(app, "POST", "/checkout", "ops-key-123", content=chunks())
    assert streamed.status_code == 413
    small = await _call(app, "POST", "/checkout", "ops-key-123", json={"customer_id": "c"})
    assert small.status_code == 200


async def test_database_data_errors_are_422_not_500() -> None:
    response = await _call(_app(), "GET", "/overflow")
    assert response.status_code == 422
    assert response.json()["detail"]["reason"] == "invalid_value"


async def test_docs_are_off_unless_enabled() -> None:
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert (await _call(_app(), "GET", path)).status_code == 404
    assert (await _call(_app(http_docs_enabled=True), "GET", "/openapi.json")).status_code == 200
    # The schema stays available to code (tests, the fuzzer).
    assert "/customers/{customer_id}/orders" in _app().openapi()["paths"]


async def test_rs256_tokens_verified_against_a_jwks_url() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    body = json.dumps({"keys": [{**jwk, "kid": "idp-1", "use": "sig"}]}).encode()
    fetched: list[str] = []

    class Jwks(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetched.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Jwks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/.well-known/jwks.json"
        app = _app(shopper_token_hs256_secret=None, shopper_token_jwks_url=url)
        claims = {"sub": "c-7", "exp": int(time.time()) + 60, "iss": "idp", "aud": "omni"}
        token = jwt.encode(claims, private, algorithm="RS256", headers={"kid": "idp-1"})
        for _ in range(2):
            response = await _call(
                app, "GET", "/customers/c-7/orders", "web-key-123",
                headers={"X-Shopper-Token": token},
            )  # fmt: skip
            assert response.json()["as_shopper"] == "c-7"
        assert fetched == ["/.well-known/jwks.json"]  # fetched once, then cached
        unknown_kid = jwt.encode(claims, private, algorithm="RS256", headers={"kid": "other"})
        response = await _call(
            app, "GET", "/customers/c-7/orders", "web-key-123",
            headers={"X-Shopper-Token": unknown_kid},
        )  # fmt: skip
        assert response.status_code == 401
    finally:
        server.shutdown()


def test_the_scopes_a_route_declares_can_be_read_off_it() -> None:
    from omni_common.auth import api_routes, declared_scopes

    routes = {r.path: r for r in api_routes(_app().routes)}
    assert declared_scopes(routes["/locations/{location_id}"]) == {"locations.write"}
    assert declared_scopes(routes["/customers/{customer_id}/orders"]) == {"orders.read"}
    assert declared_scopes(routes["/overflow"]) == set()  # what the e2e check refuses


def test_a_misconfigured_service_stops_with_a_message_that_hides_the_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from omni_common.run import main

    monkeypatch.setenv("API_KEYS", "web:TopSecret-Key-Value:stock.raed")
    with pytest.raises(SystemExit) as stopped:
        main(["inventory"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "misconfigured" in err and "unknown scope(s) stock.raed" in err
    assert "TopSecret" not in err
