"""Engine metrics through TorchServe's `context.metrics`, so they appear on its Prometheus
endpoint (with `metrics_mode=prometheus` and `model_metrics_auto_detect=true`).

Gauges and counters are refreshed from `AsyncLLMEngine.get_stats()` by a background thread
(only when something changed, so an idle server stays quiet); latency histograms get one
sample per finished request.
"""

from __future__ import annotations

import threading
from typing import Any

from pagedbackend.metrics import METRICS
from pagedbackend.outputs import RequestOutput

try:  # imported lazily by TorchServe workers; tests of this module run without TorchServe
    from ts.metrics.metric_type_enum import MetricTypes
except ImportError:  # pragma: no cover
    MetricTypes = None  # type: ignore[assignment]


def _dimension(name: str, value: str) -> Any:
    """TorchServe's metric dimension (name, value); a plain pair where TorchServe is absent."""
    try:
        from ts.metrics.dimension import Dimension
    except ImportError:  # pragma: no cover
        return (name, value)
    return Dimension(name, value)

GAUGES = {m.torchserve: (m.key, m.unit, m.scale) for m in METRICS if m.kind == "gauge"}
COUNTERS = {m.torchserve: m.key for m in METRICS if m.kind == "counter"}  # emitted as increments
# Seconds, as Prometheus expects (TorchServe's histogram buckets run from 5 ms to 10 s).
HISTOGRAMS = {m.key: m.torchserve for m in METRICS if m.kind == "histogram"}
# Sampled when a request finishes (`request_finished`); the others are read from the stats.
REQUEST_HISTOGRAMS = ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
                      "request_prompt_tokens", "request_generation_tokens", "request_params_n")
# Lists of counters, one per position: emitted as increments with a Position dimension.
POSITIONAL = {m.torchserve: m.key for m in METRICS if m.kind == "positional"}


class EngineMetrics:
    def __init__(self, metrics: Any, engine: Any, interval_s: float = 1.0) -> None:
        self._metrics = metrics
        self._engine = engine
        self._interval = interval_s
        self._lock = threading.Lock()  # TorchServe's metric cache is not thread-safe
        self._last: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pagedbackend-metrics", daemon=True)

    def start(self) -> None:
        self.refresh()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.refresh()
            except Exception:  # metrics must never take the worker down
                pass

    def refresh(self) -> None:
        stats = self._engine.get_stats()
        with self._lock:
            for name, (key, unit, scale) in GAUGES.items():
                value = round(float(stats.get(key, 0)) * scale, 3)
                if self._last.get(name) != value:
                    self._metrics.add_metric(name, value, unit, metric_type=MetricTypes.GAUGE)
                    self._last[name] = value
            for name, key in COUNTERS.items():
                total = int(stats.get(key, 0))
                delta = total - self._last.get(name, 0)
                if delta > 0 or name not in self._last:
                    self._metrics.add_metric(name, delta, "count", metric_type=MetricTypes.COUNTER)
                    self._last[name] = total
            for name, key in POSITIONAL.items():
                for i, total in enumerate(stats.get(key) or ()):
                    label = f"{name}/{i}"
                    delta = int(total) - self._last.get(label, 0)
                    if delta > 0:
                        self._metrics.add_metric(name, delta, "count", dimensions=[_dimension("Position", str(i))],
                                                 metric_type=MetricTypes.COUNTER)
                        self._last[label] = int(total)

            for key, name in HISTOGRAMS.items():
                if key not in REQUEST_HISTOGRAMS:
                    self._histogram_from_stats(name, stats.get(key))

    def _histogram_from_stats(self, name: str, hist: dict | None) -> None:
        """A histogram the engine keeps (grammar compile time): the observations since the
        last refresh, each as their mean (TorchServe takes samples, the engine keeps buckets)."""
        if not hist:
            return
        count, total = int(hist["count"]), float(hist["sum"])
        last_count, last_total = self._last.get(name, (0, 0.0))
        if count > last_count:
            mean = (total - last_total) / (count - last_count)
            for _ in range(min(count - last_count, 100)):
                self._metrics.add_metric(name, round(mean, 6), "s", metric_type=MetricTypes.HISTOGRAM)
            self._last[name] = (count, total)

    def request_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        samples: dict[str, tuple[float | None, str]] = {
            "request_prompt_tokens": (len(out.prompt_token_ids), "count"),
            "request_params_n": (len(out.outputs), "count"),
            "request_generation_tokens": (m.num_generated_tokens if m is not None
                                          else sum(len(c.token_ids) for c in out.outputs), "count")}
        if m is not None:
            samples.update({
                "time_to_first_token_seconds": (m.time_to_first_token, "s"),
                "time_per_output_token_seconds": (m.time_per_output_token, "s"),
                "e2e_request_latency_seconds": (m.finished_time - m.arrival_time if m.finished_time is not None
                                                else None, "s")})
        with self._lock:
            for key, (value, unit) in samples.items():
                if value is not None:
                    self._metrics.add_metric(HISTOGRAMS[key], round(value, 6), unit, metric_type=MetricTypes.HISTOGRAM)
