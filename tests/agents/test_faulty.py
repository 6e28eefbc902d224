"""FaultyAgent: the misbehaving agent of the resilience tests."""

from __future__ import annotations

from fleet.agents.faulty import FaultyAgent, agent_index


def test_a_restarted_agent_keeps_the_recovery_deadline_of_its_first_instance():
    # The host's health rule restarts an agent whose error rate is high, which creates a
    # new instance with the same id. Its faults must still end when the first instance's
    # would have: otherwise each restart puts recovery back and the test that waits for
    # re-admission waits for ever (CI saw it).
    first = FaultyAgent("work/faulty-test/3", bad_agents=[3], recover_after_s=60.0)
    again = FaultyAgent("work/faulty-test/3", bad_agents=[3], recover_after_s=60.0)
    other = FaultyAgent("work/faulty-test/4", bad_agents=[4], recover_after_s=120.0)
    assert first.recover_at is not None and again.recover_at == first.recover_at
    assert other.recover_at is not None and other.recover_at > first.recover_at
    assert first.flaky and first.faulty() and again.faulty()


def test_without_a_recovery_time_an_agent_misbehaves_for_ever():
    a = FaultyAgent("work/faulty-test/5", hang_agents=[5])
    assert a.recover_at is None and a.hangs and a.faulty() and not a.flaky
    assert agent_index("work/r/12") == 12 and agent_index("no-index") == -1
