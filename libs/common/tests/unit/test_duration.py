"""``omni_common.settings.Duration``: the one type every unitless duration setting takes."""

from __future__ import annotations

from datetime import timedelta

import pytest
from omni_common.settings import Duration, ServiceSettings, parse_duration
from pydantic import BaseModel, ValidationError


class _Settings(ServiceSettings):
    """A service's settings with a duration, read from the environment as services do."""

    reminder_after: Duration = timedelta(hours=24)


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        (3600, timedelta(hours=1)),
        (0.5, timedelta(milliseconds=500)),
        (0, timedelta(0)),
        ("3600", timedelta(hours=1)),
        ("0.5", timedelta(milliseconds=500)),
        (" 90 ", timedelta(seconds=90)),
        ("1e3", timedelta(seconds=1000)),
        ("PT1H", timedelta(hours=1)),
        ("P7D", timedelta(days=7)),
        ("P1DT2H30M", timedelta(days=1, hours=2, minutes=30)),
        ("PT0.5S", timedelta(milliseconds=500)),
        ("pt15m", timedelta(minutes=15)),
        (timedelta(minutes=5), timedelta(minutes=5)),
    ],
)
def test_seconds_and_iso_8601_are_durations(typed: object, expected: timedelta) -> None:
    assert parse_duration(typed) == expected


@pytest.mark.parametrize(("raw", "expected"), [("3600", 3600), ("2.5", 2.5), ("PT2H", 7200)])
def test_a_setting_reads_what_a_user_types_in_the_environment(
    raw: str, expected: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMINDER_AFTER", raw)
    assert _Settings().reminder_after == timedelta(seconds=expected)


@pytest.mark.parametrize(
    "garbage", ["", "  ", "1 hour", "1h", "one", "P", "PT", "P1X", "nan", "inf", "12:00"]
)
def test_anything_else_is_refused_in_one_line_that_says_what_to_type(garbage: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_duration(garbage)
    message = str(refused.value)
    assert "\n" not in message
    assert "is not a duration" in message and "PT1H" in message and "3600" in message


@pytest.mark.parametrize("negative", [-1, "-5", timedelta(seconds=-1)])
def test_a_negative_duration_is_refused(negative: object) -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_duration(negative)


@pytest.mark.parametrize("wrong", [True, None, [3600], float("nan")])
def test_values_of_other_types_are_refused(wrong: object) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(wrong)


def test_the_settings_error_names_the_variable_and_the_remedy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REMINDER_AFTER", "1 hour")
    with pytest.raises(ValidationError) as refused:
        _Settings()
    (error,) = refused.value.errors(include_url=False)
    assert error["loc"] == ("reminder_after",)
    assert error["msg"] == (
        "Value error, '1 hour' is not a duration: give seconds (3600, 0.5) or an ISO 8601"
        " duration (PT1H, P7D)"
    )


def test_models_other_than_settings_take_it_too() -> None:
    class Timer(BaseModel):
        after: Duration

    assert Timer(after="P1D").after == timedelta(days=1)
    assert Timer.model_validate_json('{"after": 1.5}').after == timedelta(seconds=1.5)
