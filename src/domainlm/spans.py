"""Cutting a row of lengths into contiguous spans of least total cost: a shortest path over the cut points.

Inference batches (`classify.batching.length_batches`) and the CPU attention over a packed stream
(`encoder.attention`) both pad each span to its longest member and pay a fixed cost per span; where to cut is the
same problem with different prices.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def cheapest_spans(
    lengths: np.ndarray, span_cost: Callable[[np.ndarray, np.ndarray], np.ndarray], max_rows: int | None = None
) -> list[tuple[int, int]]:
    """[start, end) spans covering `lengths` in order, at most `max_rows` long, minimising the sum of
    `span_cost(rows, longest)` (vectorised over the candidate starts of one end; inf forbids a span).
    O(n x max_rows); ties go to the earliest start, i.e. the fewest spans."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    max_rows = max_rows or n
    cost = np.zeros(n + 1)
    start_of = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        lo = max(0, end - max_rows)
        rows = end - np.arange(lo, end)
        longest = np.maximum.accumulate(lengths[lo:end][::-1])[::-1]  # of [start, end), for each start
        total = cost[lo:end] + span_cost(rows, longest)
        best = int(np.argmin(total))
        cost[end], start_of[end] = total[best], lo + best
    spans, end = [], n
    while end:
        spans.append((int(start_of[end]), end))
        end = spans[-1][0]
    return spans[::-1]
