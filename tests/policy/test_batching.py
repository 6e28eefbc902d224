from fleet.policy.batching import batch_size
from fleet.spec import BatchSpec


def test_shallow_queue_sends_single_items_and_deep_queue_large_batches():
    spec = BatchSpec(max_items=256, max_bytes=1 << 20, target_batches_in_flight=8)
    assert batch_size(spec, depth=1, free_capacity=1000, avg_item_bytes=300) == 1
    assert batch_size(spec, depth=8, free_capacity=1000, avg_item_bytes=300) == 1
    assert batch_size(spec, depth=800, free_capacity=1000, avg_item_bytes=300) == 100
    assert batch_size(spec, depth=10**6, free_capacity=1000, avg_item_bytes=300) == 256


def test_batch_bounded_by_capacity_bytes_and_nothing_to_do():
    spec = BatchSpec(max_items=256, max_bytes=10_000, target_batches_in_flight=1)
    assert batch_size(spec, depth=10**6, free_capacity=7, avg_item_bytes=10) == 7
    assert batch_size(spec, depth=10**6, free_capacity=500, avg_item_bytes=1_000) == 10
    assert batch_size(spec, depth=10**6, free_capacity=500, avg_item_bytes=50_000) == 1
    assert batch_size(spec, depth=0, free_capacity=500, avg_item_bytes=10) == 0
    assert batch_size(spec, depth=5, free_capacity=0, avg_item_bytes=10) == 0
