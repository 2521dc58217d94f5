"""``omni bench notify`` end to end at a tiny scale, on this test's broker and database."""

from __future__ import annotations

from notification_service.entrypoints.bench import measure


async def test_the_notify_bench_delivers_every_message_and_measures_raw_smtp(omni_env) -> None:
    result = await measure(
        omni_env.bootstrap, omni_env.database_url, messages=20, say=lambda _: None
    )
    assert result["messages"] == 20
    assert result["push_rejected"] == 0
    assert result["notify_msgs_per_s"] > 0 and result["raw_smtp_msgs_per_s"] > 0
