"""A latency histogram with fixed buckets, as Prometheus has them: cheap to observe (one
bisect), read as cumulative counts per upper bound."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

__all__ = ["DNS_BUCKETS", "Histogram"]

# seconds: a cached answer upstream is well under a millisecond away, a timeout seconds
DNS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
               5.0)


class Histogram:
    """Observations counted in the first bucket whose upper bound holds them."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = DNS_BUCKETS) -> None:
        if not bounds or any(b <= a for a, b in itertools.pairwise(bounds)):
            raise ValueError("bucket bounds must be increasing and not empty")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)     # the last: above every bound
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        value = max(0.0, value)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with (inf, count)."""
        total, out = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out

    def to_json(self) -> dict[str, object]:
        return {"Count": self.count, "Sum": round(self.sum, 6),
                "Buckets": {("+Inf" if b == float("inf") else repr(b)): n
                            for b, n in self.cumulative()}}
