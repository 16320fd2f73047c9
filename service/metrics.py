"""Prometheus metrics of DESIGN §6 (prefix ``hiedit_``, base units, no ids or prompts in labels).

Each app gets its own registry, so tests can run several apps in one process; the
``/metrics`` route exposes exactly this registry (plus nothing global).
``hiedit_replica_lag_edits`` is registered by replicas only (``service.replica``), on the same registry.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# The *_created series double the exposition and no alert or dashboard here uses them.
disable_created_metrics()

# Edits take 10 ms (tiny models) to tens of seconds (8B on a small GPU).
EDIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
GENERATE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The service's metric families, bound to one registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        # prometheus_client appends _total to counter names.
        self.edits = Counter("hiedit_edits", "Edit requests by method and outcome "
                             "(applied, rejected = refused before logging, failed = logged but not applied)",
                             ["method", "status"], registry=r)
        self.edit_duration = Histogram("hiedit_edit_duration_seconds",
                                       "Time from dequeue to applied and scored, per edit", ["method"],
                                       buckets=EDIT_BUCKETS, registry=r)
        self.rollbacks = Counter("hiedit_rollbacks", "Edits rolled back", registry=r)
        self.active_edits = Gauge("hiedit_active_edits", "Edits currently applied to the served weights", registry=r)
        self.generate_duration = Histogram("hiedit_generate_duration_seconds", "Time per /generate request",
                                           buckets=GENERATE_BUCKETS, registry=r)
        self.generated_tokens = Counter("hiedit_generated_tokens", "Tokens generated for /generate", registry=r)
        self.layer_selections = Counter("hiedit_layer_selections", "Times a module was selected by an edit",
                                        ["module"], registry=r)
        self.specificity = Gauge("hiedit_probe_specificity_ratio",
                                 "Share of specificity probes whose greedy answer is unchanged (NaN: no probes)",
                                 registry=r)
        self.retention = Gauge("hiedit_edit_retention_ratio",
                               "Share of active edits whose target is still the greedy continuation "
                               "(NaN: no active edits)", registry=r)
        self.queue_depth = Gauge("hiedit_edit_queue_depth", "Jobs waiting for the single writer", registry=r)
        self.model_info = Gauge("hiedit_model_info", "The served model and the edit methods available",
                                ["model", "methods"], registry=r)
        self.specificity.set(float("nan"))
        self.retention.set(float("nan"))
