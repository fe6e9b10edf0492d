"""Batches of generation: even sizes that cover every item once, in order."""

from __future__ import annotations

import pytest

from gmpipe.batching import even_batches


@pytest.mark.parametrize(("n", "batch_size", "sizes"), [
    (300, 250, [150, 150]), (1000, 250, [250] * 4), (700, 250, [233, 233, 234]), (1, 250, [1]), (5, 1, [1] * 5),
    (251, 250, [125, 126]),
])
def test_batches_cover_every_item_once_in_order_with_sizes_within_one(n, batch_size, sizes):
    batches = even_batches(n, batch_size)
    assert [stop - start for start, stop in batches] == sizes
    assert batches[0][0] == 0 and batches[-1][1] == n
    assert all(previous[1] == following[0] for previous, following in zip(batches, batches[1:], strict=False))
    assert max(sizes) <= batch_size


def test_no_items_is_no_batch():
    assert even_batches(0, 8) == []
