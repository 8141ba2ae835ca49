"""Summaries of samples: percentiles, merged latency arrays, ratios. Pure functions."""

import math
from array import array


def merge(chunks) -> array:
    """Join latency arrays sent back by workers as bytes (µs, signed 64-bit)."""
    merged = array("q")
    for chunk in chunks:
        merged.frombytes(chunk)
    return merged


def percentile(ordered, q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_ms(samples_us) -> dict:
    """Return count, p50, p90, p99, max and mean in milliseconds (rounded to µs)."""
    ordered = sorted(samples_us)
    if not ordered:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}

    def ms(value_us):
        return round(value_us / 1000, 3)

    return {
        "count": len(ordered),
        "p50": ms(percentile(ordered, 50)),
        "p90": ms(percentile(ordered, 90)),
        "p99": ms(percentile(ordered, 99)),
        "max": ms(ordered[-1]),
        "mean": ms(sum(ordered) / len(ordered)),
    }


def ratio(hub, reference, digits: int = 3):
    """hub / reference, or None when either is missing or the reference is zero."""
    if hub is None or reference is None or reference == 0:
        return None
    return round(hub / reference, digits)


def rounded(value, digits: int = 1):
    return None if value is None else round(value, digits)
