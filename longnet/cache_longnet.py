"""LongNetCache: the key/value cache whose size stays bounded however long LongNet generates."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class LongNetCacheLayer(DynamicLayer):
    """One layer's keys and values, less the oldest positions that no later query can attend.

    ``get_seq_length`` still counts the dropped positions, so generation sees the whole text. Keys and
    values are views into buffers with room to grow, so a decoding step writes one position instead of
    copying the whole cache (as ``torch.cat`` does); a full buffer is replaced by one twice the size.
    """

    def __init__(self):
        super().__init__()
        self.dropped = 0
        self.key_buffer = self.value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.requires_grad or value_states.requires_grad:
            # Autograd may hold the earlier views: never write into their buffer.
            self.key_buffer = self.value_buffer = None
            return super().update(key_states, value_states)
        self.keys, self.key_buffer = append_in_buffer(self.keys, self.key_buffer, key_states)
        self.values, self.value_buffer = append_in_buffer(self.values, self.value_buffer, value_states)
        return self.keys, self.values

    def drop_front(self, count: int) -> None:
        if count > 0 and self.is_initialized:
            self.keys = self.keys[..., count:, :]
            self.values = self.values[..., count:, :]
            self.dropped += count

    def get_seq_length(self) -> int:
        return self.dropped + super().get_seq_length()

    def reset(self) -> None:
        super().reset()
        self.dropped = 0
        self.key_buffer = self.value_buffer = None


def append_in_buffer(
    stored: torch.Tensor, buffer: torch.Tensor | None, new: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``stored`` with ``new`` appended along the sequence (dim 2), and the buffer that now holds it.

    Written in place when ``stored`` is a slice of ``buffer`` with room after it; otherwise (first call,
    full buffer, ``stored`` replaced by beam search's reordering, or a buffer more than four times what
    it holds, as after a long prompt's keys were dropped) copied into a new buffer with twice the room
    it needs, so appending one position costs O(1) amortized and memory stays within 4x what is stored.
    """
    length = stored.shape[2] if stored.numel() else 0
    end = length + new.shape[2]
    begin = slice_start(stored, buffer) if length else 0
    if (
        buffer is None
        or begin is None
        or begin + end > buffer.shape[2]
        or buffer.shape[2] > 4 * max(end, 16)
        or buffer.shape[:2] != new.shape[:2]
    ):
        buffer = new.new_empty(new.shape[0], new.shape[1], max(2 * end, 16), new.shape[3])
        if length:
            buffer[:, :, :length] = stored
        begin = 0
    buffer[:, :, begin + length : begin + end] = new
    return buffer[:, :, begin : begin + end], buffer


def slice_start(view: torch.Tensor, buffer: torch.Tensor | None) -> int | None:
    """Where ``view`` starts in ``buffer`` along dim 2 if it is such a slice of it, else None."""
    if (
        buffer is None
        or view.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
        or view.stride() != buffer.stride()
        or view.shape[:2] != buffer.shape[:2]
        or view.dtype != buffer.dtype
    ):
        return None
    start, rest = divmod(view.storage_offset() - buffer.storage_offset(), buffer.stride(2))
    return start if rest == 0 and start >= 0 else None


class LongNetCache(DynamicCache):
    """LongNet's default KV cache: its size stays bounded however long generation runs.

    A query at position t attends, in branch (w, r), only keys of its own segment, which starts at
    or after ``t - t mod L`` for ``L = lcm(segment_lengths)``. So keys before the current period of
    length L are dropped; dilated positions stay exact because each row's kept keys start at a
    multiple of L of that row's own positions. With the paper's segment lengths L is the longest one.
    """

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=LongNetCacheLayer)
        self.recording = False

    @property
    def dropped(self) -> int:
        return self.layers[0].dropped if self.layers else 0

    def activate_past_recording(self, **kwargs) -> None:
        """From now on no key is dropped: generate() rolls an assistant's cache back (``crop``) over tokens it
        drafted, which may lie before a period start that a later draft step reached. (The keyword arguments,
        such as ``recurrent_states_to_keep``, concern recurrent layers, which LongNet has none of.)"""
        self.recording = True

    def drop_front(self, count: int) -> None:
        if self.recording:
            return
        for layer in self.layers:
            layer.drop_front(count)


def trim_cache(
    cache: LongNetCache, attention_mask: torch.Tensor | None, position_ids: torch.Tensor, period: int
) -> torch.Tensor | None:
    """Drops what no query of this step can attend and returns the key mask for what is left.

    ``attention_mask`` is ``(B, total length)`` or None; ``position_ids`` ``(B, Lq)`` give the batch and
    query sizes. Dilated attention counts a row's positions from its first real token (``find_documents``),
    whatever ``position_ids`` say, so row b needs keys from the start of its current period in that count,
    ``past - (past - first real) mod period``; the cache keeps the earliest of those over the batch and the
    returned mask hides, per row, the kept keys before its own start. Anything but left padding (holes,
    packed rows) keeps the cache whole.
    """
    past_length = cache.get_seq_length()
    if attention_mask is not None and not bool((attention_mask[:, 1:] >= attention_mask[:, :-1]).all()):
        return attention_mask[:, cache.dropped :]
    if attention_mask is None:
        first_real = torch.zeros(position_ids.shape[0], dtype=torch.long, device=position_ids.device)
    else:
        first_real = attention_mask.long().argmax(-1)  # left padding: the first 1
    row_start = past_length - (past_length - first_real) % period  # (B,)
    cache.drop_front(int(row_start.min()) - cache.dropped)
    key_index = torch.arange(cache.dropped, past_length + position_ids.shape[1], device=position_ids.device)
    mask = key_index >= row_start[:, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, cache.dropped :]
    return mask


__all__ = ["LongNetCache", "LongNetCacheLayer", "trim_cache"]
