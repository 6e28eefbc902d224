"""The shared statistics: nearest-rank percentiles, Jain's index, recovery time."""

from __future__ import annotations

import pytest

from fleet.stats import jain_index, median, percentile, percentiles, recovery_s


def test_percentile_is_the_smallest_value_with_q_of_the_values_at_or_below_it():
    v = list(range(1, 101))  # 1..100
    assert [percentile(v, q) for q in (0.0, 0.01, 0.5, 0.95, 0.99, 1.0)] == [
        1,
        1,
        50,
        95,
        99,
        100,
    ]
    assert percentile(v, 0.07) == 7, "0.07 x 100 is 7.000000000000001 in floating point"
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([], 0.5) is None
    assert percentile([1, 2, 3, 4], 0.5) == 2, "the lower middle of an even count"
    with pytest.raises(ValueError):
        percentile(v, 1.5)


def test_percentiles_sort_and_name_their_keys():
    assert percentiles([5, 1, 4, 2, 3]) == {"p50": 3, "p95": 5, "p99": 5}
    assert percentiles([], (0.5, 0.995)) == {"p50": 0.0, "p99.5": 0.0}
    assert median([4, 1, 3, 2]) == 2
    with pytest.raises(ValueError):
        median([])


def test_jain_index():
    assert jain_index([5, 5, 5]) == 1.0
    assert jain_index([1, 0, 0, 0]) == pytest.approx(0.25)
    assert jain_index([]) == 1.0 and jain_index([0, 0]) == 1.0


def test_recovery_is_time_back_to_ninety_percent():
    counts = [100] * 10 + [20, 40, 60, 95, 100, 100, 100, 100]
    # Three-second averages from the kill's second: 40, 65, 85, 98.3 >= 90.
    assert recovery_s(counts, 10.0) == 3.0
    assert recovery_s(counts, 10.5) == 2.5, "from the kill, not from its second"
    assert recovery_s([100] * 20, 10.0) == 0.0, "never fell below the mark"
    assert recovery_s([100] * 10 + [0] * 10, 10.0) is None
    assert recovery_s([0] * 10 + [5] * 10, 10.0) == 0.0, "no reference level"
    assert recovery_s(counts, 0.0) == 0.0, "nothing before the kill"


def test_recovery_in_wider_buckets_and_capped_by_the_offered_load():
    # 2 s buckets: the pre window (5 s) spans 3 buckets, the post window (3 s) 2.
    done = [200] * 5 + [0, 100, 190, 200, 200]
    assert recovery_s(done, 10.0, bucket_s=2.0) == 4.0
    # Less arrives after the kill: back once what arrives is completed.
    offered = [200] * 5 + [50] * 5
    low = [200] * 5 + [10, 50, 50, 50, 50]
    assert recovery_s(low, 10.0, bucket_s=2.0, offered=offered) == 2.0
    assert recovery_s(low, 10.0, bucket_s=2.0) is None


def test_most_at_once_counts_overlapping_spans_and_not_touching_ones():
    from fleet.stats import most_at_once

    assert most_at_once([]) == 0
    assert most_at_once([(0, 2), (1, 3), (1.5, 1.8), (2, 4)]) == 3
    assert most_at_once([(0, 1), (1, 2), (2, 3)]) == 1  # each ends as the next starts
