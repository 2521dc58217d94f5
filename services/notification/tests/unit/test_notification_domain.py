"""Pure rules: routing and consent, quiet hours across zones and midnight, the cap, carts."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from notification_service.adapters.templates import Templates, UnknownTemplate
from notification_service.adapters.tokens import (
    BadToken,
    ExpiredToken,
    Unsubscribe,
    UnsubscribeTokens,
)
from notification_service.domain.model import (
    Budget,
    Contact,
    Purpose,
    Reason,
    check_cart,
    next_slot,
    push_topic,
    quiet_until,
    route,
)
from notification_service.settings import NotificationSettings
from omni_contracts import Line, Money, NotificationChannel, Preferences

EMAIL, PUSH, SMS = NotificationChannel.EMAIL, NotificationChannel.PUSH, NotificationChannel.SMS
SUB = {"endpoint": "https://push.example/x", "keys": {"p256dh": "k", "auth": "a"}}


def contact(**prefs: object) -> Contact:
    return Contact(
        "c1",
        email="a@example.com",
        phone="+33600000000",
        push_subscriptions=(SUB,),
        preferences=Preferences.model_validate(prefs),
    )


def test_marketing_goes_only_where_the_shopper_said_yes_push_first() -> None:
    assert route(contact(), Purpose.MARKETING).refusal is Reason.NO_CONSENT
    routed = route(contact(consents={"email": True, "push": True}), Purpose.MARKETING)
    assert routed.channels == (PUSH, EMAIL)


def test_transactional_goes_unless_the_shopper_said_no_preferred_channel_first() -> None:
    routed = route(
        contact(preferred_channel="sms", transactional_consents={"push": False}),
        Purpose.TRANSACTIONAL,
    )
    assert routed.channels == (SMS, EMAIL)


def test_no_address_at_all_is_no_contact() -> None:
    assert route(None, Purpose.TRANSACTIONAL).refusal is Reason.NO_CONTACT
    assert route(Contact("c1"), Purpose.TRANSACTIONAL).refusal is Reason.NO_CONTACT


@pytest.mark.parametrize(
    ("now_utc", "start", "end", "zone", "expected_utc"),
    [
        # 23:30 in Paris (CET, UTC+1) inside 22:00-07:00: until 07:00 Paris = 06:00 UTC.
        ("2026-12-01T22:30:00", time(22), time(7), "Europe/Paris", "2026-12-02T06:00:00"),
        # 03:00 Paris, after midnight: the same morning.
        ("2026-12-02T02:00:00", time(22), time(7), "Europe/Paris", "2026-12-02T06:00:00"),
        # 12:00 Paris: not quiet.
        ("2026-12-02T11:00:00", time(22), time(7), "Europe/Paris", None),
        # A daytime window in New York (EST, UTC-5): 13:00-15:00, now 14:00 local.
        ("2026-12-02T19:00:00", time(13), time(15), "America/New_York", "2026-12-02T20:00:00"),
        # Unknown zone: the platform default (UTC).
        ("2026-12-02T23:00:00", time(22), time(7), "Mars/Olympus", "2026-12-03T07:00:00"),
    ],
)
def test_quiet_hours_end_in_the_shoppers_zone(
    now_utc: str, start: time, end: time, zone: str, expected_utc: str | None
) -> None:
    prefs = Preferences(time_zone=zone, quiet_hours_start=start, quiet_hours_end=end)
    now = datetime.fromisoformat(now_utc).replace(tzinfo=UTC)
    until = quiet_until(now, prefs, "UTC")
    expected = datetime.fromisoformat(expected_utc).replace(tzinfo=UTC) if expected_utc else None
    assert until == expected


def test_quiet_hours_ending_in_a_skipped_dst_hour_end_after_the_jump() -> None:
    # 2027-03-28 02:30 does not exist in Paris (02:00 -> 03:00).
    prefs = Preferences(
        time_zone="Europe/Paris", quiet_hours_start=time(22), quiet_hours_end=time(2, 30)
    )
    until = quiet_until(datetime(2027, 3, 27, 23, 0, tzinfo=UTC), prefs, "UTC")
    assert until is not None and until > datetime(2027, 3, 28, 0, 0, tzinfo=UTC)


def _at(hhmm: str) -> datetime:
    return datetime.fromisoformat(f"2026-12-02T{hhmm}:00+00:00")


def test_the_next_slot_inside_the_contact_budget_and_outside_quiet_hours() -> None:
    day = Budget(2, timedelta(hours=24))
    none = Preferences()
    # Room in the budget: now.
    assert next_slot(_at("12:00"), [_at("09:00")], day, none, "UTC") == (_at("12:00"), None)
    # Spent: when the oldest that keeps it spent is a window old.
    spent = [_at("08:00"), _at("09:00"), _at("10:00")]
    slot, why = next_slot(_at("12:00"), spent, day, none, "UTC")
    assert (slot, why) == (_at("09:00") + timedelta(hours=24), Reason.BUDGET)
    # Contacts older than the window do not count.
    assert (
        next_slot(_at("12:00"), [_at("09:00") - timedelta(days=1)] * 5, day, none, "UTC")[1] is None
    )
    # Quiet hours at the slot: their end; the budget is why it waits.
    night = Preferences(quiet_hours_start=time(8, 30), quiet_hours_end=time(9, 30))
    slot, why = next_slot(_at("12:00"), spent, day, night, "UTC")
    assert (slot, why) == (_at("09:30") + timedelta(hours=24), Reason.BUDGET)
    # Only quiet hours: their end, and they are why.
    lunch = Preferences(quiet_hours_start=time(11), quiet_hours_end=time(13))
    assert next_slot(_at("12:00"), [], day, lunch, "UTC") == (_at("13:00"), Reason.QUIET_HOURS)


def _line(sku: str) -> Line:
    return Line(sku=sku, qty=1, unit_price=Money(amount=Decimal("1.00"), currency="EUR"))


def test_a_cart_keeps_what_is_neither_bought_nor_sold_out() -> None:
    items = [_line("A"), _line("B"), _line("C")]
    check = check_cart(items, closed=False, bought_since={"A"}, online_available={"B": 0, "C": 4})
    assert [i.sku for i in check.remaining] == ["C"] and check.refusal is None
    gone = check_cart(items[1:2], closed=False, bought_since=(), online_available={"B": 0})
    assert gone.refusal is Reason.OUT_OF_STOCK
    bought = check_cart(items, closed=True, bought_since=(), online_available={})
    assert bought.refusal is Reason.ALREADY_BOUGHT


def test_push_topic_is_a_short_stable_url_safe_name() -> None:
    topic = push_topic("0b9c3a52-8f0d-4b8e-9a39-2f3c1d2e4f5a")
    assert len(topic) <= 32 and topic.isalnum()
    assert topic == push_topic("0b9c3a52-8f0d-4b8e-9a39-2f3c1d2e4f5a")


def test_unsubscribe_tokens_cannot_be_forged() -> None:
    tokens = UnsubscribeTokens(b"0123456789abcdef0123")
    token = tokens.sign(Unsubscribe("cust-1", "email", "marketing"))
    assert tokens.verify(token) == Unsubscribe("cust-1", "email", "marketing")
    other = UnsubscribeTokens(b"another-secret-of-20b").sign(
        Unsubscribe("cust-1", "email", "marketing")
    )
    for bad in (other, token[:-2], "garbage", token.split(".")[0] + ".AAAA"):
        with pytest.raises(BadToken):
            tokens.verify(bad)


def test_unsubscribe_tokens_are_decoded_strictly() -> None:
    tokens = UnsubscribeTokens(b"0123456789abcdef0123")
    token = tokens.sign(Unsubscribe("cust-1", "email", "marketing"))
    # Whatever follows or pads a valid signature, a lenient base64 decoder would skip it.
    last = token[-1]
    sibling = next(  # the same bytes in another spelling: the unused low bits set
        c for c in "AEIMQUYcgkosw048BFJNRVZdhlptx159" if c != last and _same_bytes(token, c)
    )
    for bad in (
        token + "=",
        token + '"><img src=x onerror=alert(1)>',
        token + "==<b>",
        token[:-1] + sibling,
        token.replace(".", "..", 1),
        " " + token,
        token + "A" * 600,
    ):
        with pytest.raises(BadToken):
            tokens.verify(bad)


def _same_bytes(token: str, last: str) -> bool:
    from itsdangerous.encoding import base64_decode

    signature = token.rsplit(".", 1)[1]
    try:
        return base64_decode(signature[:-1] + last) == base64_decode(signature)
    except Exception:
        return False


def test_unsubscribe_tokens_expire_and_survive_a_rotation() -> None:
    old = UnsubscribeTokens(b"the-old-secret-0123")
    token = old.sign(Unsubscribe("cust-1", "email", "marketing"))
    rotated = UnsubscribeTokens(b"the-new-secret-0123", previous=[b"the-old-secret-0123"])
    assert rotated.verify(token).customer_id == "cust-1"
    with pytest.raises(BadToken):
        UnsubscribeTokens(b"the-new-secret-0123").verify(token)
    with pytest.raises(ExpiredToken):
        UnsubscribeTokens(b"the-old-secret-0123", max_age=timedelta(seconds=-1)).verify(token)


def test_templates_escape_html_fall_back_to_the_default_language_and_name_unknown_kinds() -> None:
    templates = Templates("en")
    values = {
        "cart_id": "c1",
        "step": 1,
        "items": [{"sku": "<script>x</script>", "qty": 1, "unit_price": "1.00 EUR"}],
        "cart_url": "https://shop.example/cart/c1",
        "offer": None,
        "unsubscribe_url": None,
    }
    rendered = templates.render("cart_reminder", "de-CH", values)
    assert rendered.language == "en"
    assert "&lt;script&gt;" in rendered.html and "<script>" not in rendered.html
    assert "<script>x</script>" in rendered.text  # plain text is not HTML
    assert templates.render("cart_reminder", "fr-FR", values).language == "fr"
    with pytest.raises(UnknownTemplate):
        templates.render("no_such_kind", "en", {})


def test_smtp_settings_from_an_url() -> None:
    s = NotificationSettings(smtp_url="smtps://user:pw@relay.example:2465")
    assert s.smtp_target() == (
        "relay.example",
        2465,
        {"use_tls": True, "start_tls": None, "username": "user", "password": "pw"},
    )
    assert NotificationSettings(smtp_host="mailpit", smtp_port=1025).smtp_target() == (
        "mailpit",
        1025,
        {},
    )


def test_a_mistyped_zone_or_templates_directory_stops_the_settings(tmp_path: Path) -> None:
    assert NotificationSettings(notify_default_time_zone="Europe/Paris")
    with pytest.raises(ValueError, match="'Paris' is not an IANA time zone"):
        NotificationSettings(notify_default_time_zone="Paris")
    assert NotificationSettings(notify_templates_dir=str(tmp_path)).notify_templates_dir
    with pytest.raises(ValueError, match="is not a directory"):
        NotificationSettings(notify_templates_dir=str(tmp_path / "missing"))


def test_the_second_reminder_takes_seconds_or_iso_8601(monkeypatch: pytest.MonkeyPatch) -> None:
    for typed, hours in (("3600", 1), ("PT12H", 12), ("P1D", 24)):
        monkeypatch.setenv("CART_REMINDER_SECOND_AFTER", typed)
        assert NotificationSettings().cart_reminder_second_after.total_seconds() == hours * 3600


def test_a_short_unsubscribe_secret_is_a_settings_error_that_does_not_quote_it() -> None:
    # None: a random one per process, in development only (production refuses to start).
    assert NotificationSettings(unsubscribe_secret="", omni_env="development")
    assert NotificationSettings(unsubscribe_secret="").startup_refusals()
    with pytest.raises(ValueError, match="at least 16 bytes") as refused:
        NotificationSettings(unsubscribe_secret="short-secret")
    assert "short-secret" not in str(refused.value)


def test_the_vapid_key_may_be_given_inline_as_pem_or_raw_base64url(tmp_path: Path) -> None:
    from notification_service.adapters.providers import WebPush
    from omni_devkit.devstack.vapid import ensure_vapid_keys

    keys = ensure_vapid_keys(tmp_path)
    pem = keys.private_key_file.read_text()
    from_pem = WebPush.load_key(pem_file=None, pem=pem)
    from_file = WebPush.load_key(pem_file=str(keys.private_key_file), pem=None)
    assert from_pem is not None and from_file is not None
    assert from_pem.public_key.public_numbers() == from_file.public_key.public_numbers()
    raw = "QN8eCHwn2bOT_zWAyKOKE8wU8NHGUZvbq2STG4HHsvU"  # the README's example
    assert WebPush.load_key(pem_file=None, pem=raw) is not None
    assert WebPush.load_key(pem_file=None, pem=None) is None
