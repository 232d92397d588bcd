"""Engine stats in the Prometheus text exposition format (for adapters whose framework has no
metrics API of its own that the engine can feed, e.g. PyTriton)."""

from __future__ import annotations

from typing import Any

# name: (stats key, type, help, scale)
_SCALARS = {
    "pagedbackend_kv_cache_usage_ratio": ("kv_cache_usage", "gauge", "Fraction of KV-cache blocks in use.", 1.0),
    "pagedbackend_num_requests_running": ("num_running", "gauge", "Sequences being computed.", 1.0),
    "pagedbackend_num_requests_waiting": ("num_waiting", "gauge", "Sequences waiting to be scheduled.", 1.0),
    "pagedbackend_num_kv_blocks_free": ("num_free_blocks", "gauge", "KV-cache blocks free now.", 1.0),
    "pagedbackend_prefix_cache_hit_rate": ("prefix_cache_hit_rate", "gauge", "Prompt tokens served from the prefix cache / prompt tokens.", 1.0),
    "pagedbackend_batch_size": ("last_batch_seqs", "gauge", "Sequences computed in the latest step.", 1.0),
    "pagedbackend_max_batch_size": ("max_batch_seqs", "gauge", "Most sequences computed in one step so far.", 1.0),
    "pagedbackend_preemptions_total": ("num_preemptions", "counter", "Sequences preempted (recompute).", 1.0),
    "pagedbackend_prompt_tokens_total": ("prompt_tokens", "counter", "Prompt tokens received.", 1.0),
    "pagedbackend_generation_tokens_total": ("generation_tokens", "counter", "Tokens generated.", 1.0),
}
_HISTOGRAMS = {
    "pagedbackend_time_to_first_token_seconds": ("time_to_first_token_seconds", "Arrival to first token."),
    "pagedbackend_time_per_output_token_seconds": ("time_per_output_token_seconds", "Mean time between tokens, per request."),
}


def _labels(labels: dict[str, str], extra: str = "") -> str:
    parts = [f'{k}="{v}"' for k, v in labels.items()]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def render(stats: dict[str, Any], labels: dict[str, str] | None = None) -> str:
    labels = labels or {}
    lines = []
    for name, (key, kind, help_text, scale) in _SCALARS.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                  f"{name}{_labels(labels)} {float(stats.get(key, 0)) * scale}"]
    for name, (key, help_text) in _HISTOGRAMS.items():
        h = stats.get(key)
        if not h:
            continue
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for bound, count in zip([*h["buckets"], "+Inf"], h["cumulative_counts"]):
            le = 'le="' + str(bound) + '"'
            lines.append(f"{name}_bucket{_labels(labels, le)} {count}")
        lines += [f"{name}_sum{_labels(labels)} {h['sum']}", f"{name}_count{_labels(labels)} {h['count']}"]
    return "\n".join(lines) + "\n"
