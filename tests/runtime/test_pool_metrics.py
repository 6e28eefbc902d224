from prometheus_client import CollectorRegistry

from fleet.runtime.pool_metrics import PoolMetrics


def test_pool_metrics_follow_the_latest_dispatcher_stats():
    reg = CollectorRegistry()
    m = PoolMetrics(reg)
    m.update(
        {
            "work": {
                "ejected_agents": 2,
                "max_ejected_agents": 4,
                "retried_items": 7,
                "in_flight": 30,
                "hosts": 3,
                "note": "ignored",
            }
        }
    )
    assert reg.get_sample_value("fleet_pool_ejected_agents", {"pool": "work"}) == 2
    assert reg.get_sample_value("fleet_pool_max_ejected_agents", {"pool": "work"}) == 4
    assert reg.get_sample_value("fleet_pool_retried_items", {"pool": "work"}) == 7
    m.update({"work": {"ejected_agents": 0}})  # re-admitted: the gauge falls back
    assert reg.get_sample_value("fleet_pool_ejected_agents", {"pool": "work"}) == 0
    assert reg.get_sample_value("fleet_pool_retried_items", {"pool": "work"}) == 7
    assert reg.get_sample_value("fleet_pool_panic_hosts", {"pool": "work"}) is None
