"""Fleet's custom Ray Serve autoscaling policy: hosts follow fleet's agent decision.

Fleet's controller decides how many logical agents a pool runs (``fleet.policy.
autoscaling``) and from that how many hosts it needs. Each host reports that number
as the custom metric ``desired_hosts`` (``AgentHost.record_autoscaling_stats``); this
function, run inside Serve's controller, only reads the metric. Serve's wrapper then
applies min/max replicas and the upscale/downscale delays from ``autoscaling_config``.
"""

from __future__ import annotations

import math
from typing import Any

DESIRED_HOSTS_METRIC = "desired_hosts"


def desired_hosts_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Serve policy: the largest ``desired_hosts`` any replica reported (hold if none)."""
    metrics = ctx.aggregated_metrics or {}
    per_replica = metrics.get(DESIRED_HOSTS_METRIC) or {}
    values = [v for v in per_replica.values() if v is not None and not math.isnan(v)]
    if not values:
        return ctx.target_num_replicas, {}
    return max(1, math.ceil(max(values))), {}
