import random

import pytest

from dataflow.transport.arena import ALIGN, RangeAllocator


def no_overlaps(spans):
    return all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_allocations_never_overlap_under_random_out_of_order_frees():
    rng = random.Random(0)
    alloc = RangeAllocator(64 * ALIGN, base=4096)
    live = []
    for _ in range(2000):
        if live and (rng.random() < 0.5 or len(live) > 20):
            alloc.free(live.pop(rng.randrange(len(live))))
        else:
            offset = alloc.allocate(rng.randint(1, 8 * ALIGN))
            if offset is not None:
                assert offset % ALIGN == 0 and 4096 <= offset < 4096 + 64 * ALIGN
                live.append(offset)
        assert no_overlaps(alloc.spans())
        assert all(end <= 4096 + 64 * ALIGN for _, end in alloc.spans())


def test_allocation_continues_after_the_last_one_and_wraps_around_to_freed_space():
    alloc = RangeAllocator(4 * ALIGN)
    a, b, c = (alloc.allocate(ALIGN) for _ in range(3))
    assert (a, b, c) == (0, ALIGN, 2 * ALIGN)
    alloc.free(a)
    assert alloc.allocate(ALIGN) == 3 * ALIGN  # next-fit: the freed start is reused as late as possible
    assert alloc.allocate(ALIGN) == 0  # then it wraps around
    assert alloc.allocate(ALIGN) is None


def test_a_range_that_fits_only_in_a_hole_freed_out_of_order_is_found():
    alloc = RangeAllocator(4 * ALIGN)
    offsets = [alloc.allocate(ALIGN) for _ in range(4)]
    alloc.free(offsets[2])
    alloc.free(offsets[1])
    assert alloc.allocate(2 * ALIGN) == ALIGN


def test_a_range_larger_than_the_arena_never_fits():
    assert RangeAllocator(4 * ALIGN).allocate(4 * ALIGN + 1) is None


def test_reset_rebuilds_the_used_set_from_live_ranges():
    alloc = RangeAllocator(8 * ALIGN)
    alloc.reset([(2 * ALIGN, ALIGN), (5 * ALIGN, 2 * ALIGN), (2 * ALIGN, ALIGN)])
    assert alloc.used_bytes == 3 * ALIGN
    got = sorted(alloc.allocate(ALIGN) for _ in range(5))
    assert got == [0, ALIGN, 3 * ALIGN, 4 * ALIGN, 7 * ALIGN]
    assert alloc.allocate(1) is None


def test_a_capacity_that_is_not_aligned_is_refused():
    with pytest.raises(ValueError, match="multiple"):
        RangeAllocator(100)
