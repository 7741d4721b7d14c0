"""Reading a ``GET /metrics`` answer in tests: the families as prometheus-client's own parser sees them, and the
value of one sample."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


def families(text: str) -> dict[str, Metric]:
    """Family name (as the parser names it: counters without ``_total``) → family."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0.0 when there is none)."""
    want = dict(labels or {})
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in want.items()):
                total += sample.value
    return total
