"""Reading fleet's metrics back from Ray's metrics agents.

Ray's metrics agent on each node serves what that node's processes recorded
(``MetricsExportPort`` in ``ray.nodes()``). ``fleet_exposition`` fetches every live
node's page, keeps the ``ray_fleet_*`` families of this Ray session, sums away the
labels Ray adds per process (``aggregate``) and renders them as one text exposition:
what the ingress's ``GET /metrics`` and ``FleetClient.metrics_text()`` serve to
scrapers that cannot reach Ray's endpoints, with fleet's labels only (and so clean for
``promtool check metrics``, which Ray's CamelCase labels are not). ``total`` sums a
metric's samples over the labels Ray adds, which is how tests read a value.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from fleet.observability.metrics import CATALOG, EXPORTED_PREFIX, Kind

FLEET_PREFIX = EXPORTED_PREFIX + "fleet_"
SCRAPE_TIMEOUT_S = 5.0
# Family name (as the parser names it: a counter's without _total) -> fleet's labels.
_FLEET_LABELS = {
    d.exported.removesuffix("_total") if d.kind is Kind.COUNTER else d.exported: d.labels
    for d in CATALOG.values()
}
# A histogram reaches Ray's endpoint as three gauge families (``RaySink``): each part's
# family -> the histogram's.
_HIST_PART = {
    f"{d.exported}{part}": d.exported
    for d in CATALOG.values()
    if d.kind is Kind.HISTOGRAM
    for part in ("_bucket", "_count", "_sum")
}
# Labels OpenTelemetry's Prometheus exporter adds to every series: no information.
_DROP_LABELS = ("otel_scope_name", "otel_scope_schema_url", "otel_scope_version")


def metrics_endpoints() -> list[str]:
    """``host:port`` of every live node's Ray metrics agent (Ray must be initialized)."""
    import ray

    return [
        f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}"
        for n in ray.nodes()
        if n.get("Alive") and n.get("MetricsExportPort")
    ]


def session_name() -> str | None:
    import ray

    try:
        return ray.get_runtime_context().get_session_name()  # type: ignore[no-any-return]
    except Exception:
        return None


def fetch(endpoint: str, timeout_s: float = SCRAPE_TIMEOUT_S) -> str:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=timeout_s) as r:
        return r.read().decode()  # type: ignore[no-any-return]


def fleet_families(texts: Iterable[str], session: str | None = None) -> dict[str, Any]:
    """name -> (type, help, samples) of the ``ray_fleet_*`` families in ``texts``, only
    the samples of Ray session ``session`` when given."""
    out: dict[str, Any] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if not fam.name.startswith(FLEET_PREFIX):
                continue
            entry = out.setdefault(fam.name, (fam.type, fam.documentation, []))
            for s in fam.samples:
                if session is not None and s.labels.get("SessionName", session) != session:
                    continue
                labels = {k: v for k, v in s.labels.items() if k not in _DROP_LABELS}
                entry[2].append(Sample(s.name, labels, s.value))
    return out


def aggregate(families: Mapping[str, Any]) -> dict[str, Any]:
    """The families with only fleet's own labels (and ``le``): samples that differ only
    in the labels Ray adds per process and node (``WorkerId``, ``NodeAddress``,
    ``SessionName``…) are summed, as a dashboard's ``sum by`` would, and a histogram's
    three gauge families are one histogram family again. Counters of a replaced host
    stay in the sums (Ray's agent keeps them); its gauges and histograms leave them."""
    out: dict[str, Any] = {}
    for name, (kind, doc, samples) in families.items():
        base = _HIST_PART.get(name)
        if base is not None:  # one part of a histogram: into the histogram's family
            name, kind = base, "histogram"
        keep = set(_FLEET_LABELS.get(name, ())) | {"le"}
        summed: dict[tuple[str, tuple[tuple[str, str], ...]], float]
        summed = out.setdefault(name, (kind, doc, {}))[2]
        for s in samples:
            key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k in keep)))
            summed[key] = summed.get(key, 0.0) + s.value
    return {
        name: (
            kind,
            doc,
            [
                Sample(n, dict(labels), v)
                for (n, labels), v in sorted(summed.items(), key=_sample_order)
            ],
        )
        for name, (kind, doc, summed) in out.items()
    }


def _sample_order(item: tuple[tuple[str, tuple[tuple[str, str], ...]], float]) -> Any:
    """A histogram's samples by label set, buckets (by ``le``) before count and sum."""
    (name, labels), _ = item
    plain = tuple(kv for kv in labels if kv[0] != "le")
    le = dict(labels).get("le")
    part = 0 if name.endswith("_bucket") else 1 if name.endswith("_count") else 2
    return plain, part, float(le) if le is not None else 0.0, name


def render(families: Mapping[str, Any]) -> str:
    """The text exposition of ``fleet_families``' result."""
    lines: list[str] = []
    for name in sorted(families):
        kind, doc, samples = families[name]
        if not samples:
            continue
        doc = doc.replace("\\", "\\\\").replace("\n", "\\n")
        # The parser names a counter's family without its _total; the text format
        # names it with.
        head = f"{name}_total" if kind == "counter" and not name.endswith("_total") else name
        lines.append(f"# HELP {head} {doc}")
        lines.append(f"# TYPE {head} {kind}")
        for s in samples:
            labels = ",".join(
                f'{k}="{_escape(v)}"' for k, v in sorted(s.labels.items(), key=_le_last)
            )
            lines.append(f"{s.name}{{{labels}}} {_num(s.value)}")
    return "\n".join(lines) + "\n" if lines else ""


def _le_last(kv: tuple[str, str]) -> tuple[bool, str]:
    return kv[0] == "le", kv[0]


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v))


def fleet_exposition(endpoints: Iterable[str] | None = None) -> str:
    """Every live node's fleet metrics of this session, as one text exposition. A node
    that does not answer is left out (its series come back with it)."""
    texts = []
    for ep in metrics_endpoints() if endpoints is None else endpoints:
        try:
            texts.append(fetch(ep))
        except Exception:  # a node that does not answer, or answers garbage
            continue
    return render(aggregate(fleet_families(texts, session_name())))


def total(text: str, name: str, /, **match: str) -> float:
    """Sum of sample ``name`` (exported name, e.g. ``ray_fleet_tasks_total`` or
    ``ray_fleet_task_latency_seconds_count``) over series whose labels include
    ``match``; 0.0 when there is none."""
    out = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in match.items()):
                out += s.value
    return out
