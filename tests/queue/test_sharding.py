"""Sharding and the stable hash: the same answer in every process, balance measures."""

from __future__ import annotations

import subprocess
import sys
import zlib

import pytest

from fleet.policy.hashing import stable_hash64
from fleet.policy.sharding import shard_balance, shard_of


def test_hashes_are_stable_across_processes():
    code = (
        "from fleet.policy.hashing import stable_hash64 as h;"
        "from fleet.policy.sharding import shard_of as s;"
        "print(h('support', 'k42'), s('k42', 16))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert [int(x) for x in other] == [stable_hash64("support", "k42"), shard_of("k42", 16)]
    assert stable_hash64("abc") == stable_hash64("abc") != stable_hash64("abd")
    assert stable_hash64("a", 1) == stable_hash64("a\x1f1"), "parts are joined as text"


def test_shard_of_is_crc32_of_the_id_because_shard_files_depend_on_it():
    ids = [f"task-{i}" for i in range(1_000)]
    assert [shard_of(i, 7) for i in ids] == [zlib.crc32(i.encode()) % 7 for i in ids]
    assert shard_of("anything", 1) == 0
    with pytest.raises(ValueError, match="shards"):
        shard_of("x", 0)


def test_balance_measures():
    b = shard_balance([10, 10, 10, 10])
    assert (b.max_over_mean, b.cv) == (1.0, 0.0)
    b = shard_balance([40, 0, 0, 0])
    assert b.max_over_mean == 4.0 and b.cv == pytest.approx(3**0.5)
    assert shard_balance([]).shards == 0 and shard_balance([0, 0]).max_over_mean == 0.0
