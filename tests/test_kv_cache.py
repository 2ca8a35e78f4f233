"""The running batch's KV cache (``peftlab.serving.kv_cache``): new columns are written into
spare room instead of concatenated, joins write each batch into one buffer, and the cache
behaves as transformers' ``DynamicCache`` does for the model."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from peftlab.serving.kv_cache import MIN_ROOM, SpareCache, joined, room, trimmed


def states(rows: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, columns, 4, generator=g), torch.randn(rows, 2, columns, 4, generator=g)


def test_columns_are_appended_in_place_until_the_room_is_used() -> None:
    ours, plain = SpareCache(), DynamicCache()
    assert isinstance(ours, DynamicCache)
    keys, values = states(3, 5, 0)
    for cache in (ours, plain):
        cache.update(keys, values, 0)
    layer = ours.layers[0]
    buffer = layer.keys.untyped_storage().data_ptr()
    for step in range(room(5) + 2):
        k, v = states(3, 1, step + 1)
        got = ours.update(k, v, 0)
        want = plain.update(k, v, 0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        moved = layer.keys.untyped_storage().data_ptr() != buffer
        # the first buffer has room for room(5) more columns; the step after that makes a new one
        assert moved == (step >= room(5)), step
    assert ours.get_seq_length() == plain.get_seq_length() == 5 + room(5) + 2


def test_selected_rows_and_trimmed_columns_keep_the_values() -> None:
    ours, plain = SpareCache(), DynamicCache()
    keys, values = states(4, 6, 1)
    for cache in (ours, plain):
        cache.update(keys, values, 0)
        cache.batch_select_indices(torch.tensor([0, 2]))
    k, v = states(2, 1, 2)
    assert torch.equal(ours.update(k, v, 0)[0], plain.update(k, v, 0)[0])
    cut = trimmed(ours, 3)
    assert torch.equal(cut.layers[0].keys, plain.layers[0].keys[:, :, 3:])
    k, v = states(2, 1, 3)
    got = cut.update(k, v, 0)
    assert torch.equal(got[1], torch.cat([plain.layers[0].values[:, :, 3:], v], dim=2))


def test_joined_pads_the_narrower_batch_with_zero_columns_on_the_left() -> None:
    wide, narrow = SpareCache(), SpareCache()
    (k1, v1), (k2, v2) = states(2, 9, 4), states(3, 4, 5)
    wide.update(k1, v1, 0)
    narrow.update(k2, v2, 0)
    for first, second, rows in ((wide, narrow, slice(2, 5)), (narrow, wide, slice(0, 3))):
        both = joined(first, second)
        keys = both.layers[0].keys
        assert keys.shape == (5, 2, 9, 4)
        assert torch.equal(keys[rows, :, :5], torch.zeros(3, 2, 5, 4))
        assert torch.equal(keys[rows, :, 5:], k2)
        assert torch.equal(both.layers[0].values[rows, :, 5:], v2)
        # the joined buffers have room: the next column is written in place
        ptr = keys.untyped_storage().data_ptr()
        k, v = states(5, 1, 6)
        out = both.update(k, v, 0)
        assert out[0].untyped_storage().data_ptr() == ptr and torch.equal(out[0][:, :, -1:], k)
    assert room(0) == MIN_ROOM
