"""Client-side adaptive throttling (``fleet.policy.throttle``), the SRE book's rule."""

from __future__ import annotations

import pytest

from fleet.policy.throttle import ClientThrottle
from tests.utils import FakeClock


def test_nothing_is_held_back_while_the_server_accepts():
    t = ClientThrottle(FakeClock())
    t.record(100, 100)
    assert t.hold_share() == 0.0
    assert t.allowed(50) == 50


def test_the_share_held_back_follows_the_share_refused():
    clock = FakeClock()
    t = ClientThrottle(clock, k=2.0, window_s=10)
    t.record(100, 50)  # half accepted: k=2 asks for as much as it gets, twice over
    assert t.hold_share() == 0.0
    t.record(100, 0)  # now 200 asked, 50 accepted
    assert t.hold_share() == pytest.approx((200 - 2 * 50) / 201)
    assert t.allowed(100) == int(100 * (1 - (200 - 100) / 201))
    # one is always let through, so the client learns when the server takes work again
    t.record(10_000, 0)
    assert t.allowed(3) == 1


def test_refusals_age_out_of_the_window():
    clock = FakeClock()
    t = ClientThrottle(clock, window_s=10)
    t.record(100, 0)
    assert t.hold_share() > 0.9
    clock.advance(9.0)
    assert t.hold_share() > 0.9
    clock.advance(1.0)
    assert t.hold_share() == 0.0


@pytest.mark.parametrize(("kw", "field"), [({"k": 0.5}, "k"), ({"window_s": 0}, "window_s")])
def test_bad_settings_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        ClientThrottle(FakeClock(), **kw)
    with pytest.raises(ValueError, match="accepts"):
        ClientThrottle(FakeClock()).record(1, 2)
