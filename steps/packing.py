"""Best-fit-decreasing packing of tokenized documents into rows, with per-document positions.

Several short conversations share one row of ``capacity`` tokens. Each keeps its own
``position_ids`` (restarting at 0), which is all transformers needs to build a
document-isolated causal mask when a forward gets ``position_ids`` and ``attention_mask=None``
(``masking_utils.find_packed_sequence_indices``)::

    documents    A = [a0 a1 a2]   B = [b0 b1]   C = [c0 c1 c2 c3]      capacity 6
    bins         [C, B]  [A]                  (best fit decreasing, see below)
    row 0        input_ids    [c0 c1 c2 c3 b0 b1]
                 position_ids [ 0  1  2  3  0  1]
    row 1        input_ids    [a0 a1 a2]          (rows are not padded on disk)
                 position_ids [ 0  1  2]

:func:`collate_rows` pads rows to a fixed width when they are batched; the pad run gets
label -100 and positions that restart at 0, so it is one more document that nothing attends to.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100
"""Label of a token that takes no loss."""


class _BinsByRemaining:
    """Open bins indexed by remaining capacity, to find the fullest bin that fits in O(log C).

    A segment tree over remaining capacities ``0..capacity`` counts the bins at each value;
    each value keeps a heap of bin indices, so ties go to the bin opened first.
    """

    def __init__(self, capacity: int):
        self._num_leaves = 1
        while self._num_leaves < capacity + 1:
            self._num_leaves *= 2
        self._counts = [0] * (2 * self._num_leaves)
        self._bins_at: list[list[int]] = [[] for _ in range(capacity + 1)]

    def _add_count(self, remaining: int, delta: int) -> None:
        node = remaining + self._num_leaves
        while node:
            self._counts[node] += delta
            node //= 2

    def push(self, remaining: int, bin_index: int) -> None:
        heapq.heappush(self._bins_at[remaining], bin_index)
        self._add_count(remaining, 1)

    def pop_fullest_fitting(self, length: int) -> tuple[int, int] | None:
        """Remove and return ``(remaining, bin_index)`` of the smallest ``remaining >= length``."""
        counts = self._counts
        node = length + self._num_leaves
        if not counts[node]:
            # Climb until a right sibling holds a bin: those siblings cover the remaining
            # capacities above `length` in increasing order.
            while True:
                if node == 1:
                    return None
                if node % 2 == 0 and counts[node + 1]:
                    node += 1
                    break
                node //= 2
            while node < self._num_leaves:  # then take the leftmost non-empty leaf
                node = 2 * node if counts[2 * node] else 2 * node + 1
        remaining = node - self._num_leaves
        bin_index = heapq.heappop(self._bins_at[remaining])
        self._add_count(remaining, -1)
        return remaining, bin_index


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group document indices into bins of at most ``capacity`` tokens, best fit decreasing.

    Documents are placed longest first (equal lengths: lower index first), each into the
    fullest open bin that still has room for it (equal room: the bin opened first), or into
    a new bin. Bins come back in the order they were opened, and the indices inside a bin in
    the order they were placed, so the same lengths always give the same bins.
    O(n log n + n log capacity).

    Example (capacity 10)::

        lengths        [5, 3, 8, 2, 4]      (indices 0..4)
        place 8 (#2)   new bin 0            bin 0 = [2]       room 2
        place 5 (#0)   fits nowhere         bin 1 = [0]       room 5
        place 4 (#4)   fullest fit: bin 1   bin 1 = [0, 4]    room 1
        place 3 (#1)   fits nowhere         bin 2 = [1]       room 7
        place 2 (#3)   bin 0 (room 2) is fuller than bin 2 (room 7)
                                            bin 0 = [2, 3]    room 0

        >>> pack_best_fit_decreasing([5, 3, 8, 2, 4], capacity=10)
        [[2, 3], [0, 4], [1]]

    Raises:
        ValueError: a length is above ``capacity`` or below 1, or ``capacity`` is below 1.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    for index, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"document {index} has {length} tokens, more than the capacity {capacity}")
        if length < 1:
            raise ValueError(f"document {index} has {length} tokens; empty documents cannot be packed")

    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    bins: list[list[int]] = []
    open_bins = _BinsByRemaining(capacity)
    for index in order:
        length = lengths[index]
        found = open_bins.pop_fullest_fitting(length)
        if found is None:
            remaining, bin_index = capacity, len(bins)
            bins.append([])
        else:
            remaining, bin_index = found
        bins[bin_index].append(index)
        open_bins.push(remaining - length, bin_index)
    return bins


def pack_row(docs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, np.ndarray]:
    """Concatenate ``(input_ids, labels)`` documents into one row with restarting positions.

    Example::

        >>> row = pack_row([([7, 8, 9], [-100, 8, 9]), ([5, 6], [-100, 6])])
        >>> {name: values.tolist() for name, values in row.items()}
        {'input_ids': [7, 8, 9, 5, 6], 'labels': [-100, 8, 9, -100, 6], 'position_ids': [0, 1, 2, 0, 1]}

    Returns:
        int32 arrays ``input_ids``, ``labels`` and ``position_ids`` of the row's length.
    """
    for index, (input_ids, labels) in enumerate(docs):
        if len(input_ids) != len(labels):
            raise ValueError(f"document {index}: {len(input_ids)} input_ids but {len(labels)} labels")
    lengths = [len(input_ids) for input_ids, _ in docs]
    return {
        "input_ids": np.concatenate([np.asarray(ids, dtype=np.int32) for ids, _ in docs]),
        "labels": np.concatenate([np.asarray(labels, dtype=np.int32) for _, labels in docs]),
        "position_ids": np.concatenate([np.arange(length, dtype=np.int32) for length in lengths]),
    }


def pack_rows(docs: Sequence[tuple[Sequence[int], Sequence[int]]], capacity: int) -> list[dict[str, list[int]]]:
    """Pack ``(input_ids, labels)`` documents into rows of at most ``capacity`` tokens.

    Bins come from :func:`pack_best_fit_decreasing`; each row is :func:`pack_row` of its bin.

    Example (capacity 6)::

        >>> docs = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5]), ([6, 7, 8, 9], [-100, -100, 8, 9])]
        >>> for row in pack_rows(docs, capacity=6):
        ...     print(row)
        {'input_ids': [6, 7, 8, 9, 4, 5], 'labels': [-100, -100, 8, 9, -100, 5], 'position_ids': [0, 1, 2, 3, 0, 1]}
        {'input_ids': [1, 2, 3], 'labels': [-100, 2, 3], 'position_ids': [0, 1, 2]}
    """
    bins = pack_best_fit_decreasing([len(input_ids) for input_ids, _ in docs], capacity)
    rows = []
    for indices in bins:
        row = pack_row([docs[index] for index in indices])
        rows.append({name: values.tolist() for name, values in row.items()})
    return rows


def collate_rows(rows: Sequence[Mapping[str, Sequence[int]]], row_tokens: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows to ``row_tokens`` and stack them into LongTensors ``[num_rows, row_tokens]``.

    Pad tokens get label -100 and positions that restart at 0, so the pad run is a document
    of its own: no real token attends to it, and it takes no loss.

    Example (``row_tokens`` 5, ``pad_id`` 0)::

        >>> batch = collate_rows([{"input_ids": [7, 8, 9], "labels": [-100, 8, 9], "position_ids": [0, 1, 0]}], 5, 0)
        >>> {name: tensor.tolist() for name, tensor in batch.items()}
        {'input_ids': [[7, 8, 9, 0, 0]], 'labels': [[-100, 8, 9, -100, -100]], 'position_ids': [[0, 1, 0, 0, 1]]}
    """
    num_rows = len(rows)
    input_ids = torch.full((num_rows, row_tokens), pad_id, dtype=torch.long)
    labels = torch.full((num_rows, row_tokens), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(row_tokens, dtype=torch.long).repeat(num_rows, 1)
    for index, row in enumerate(rows):
        length = len(row["input_ids"])
        if length > row_tokens:
            raise ValueError(f"row {index} has {length} tokens, more than row_tokens={row_tokens}")
        if len(row["labels"]) != length or len(row["position_ids"]) != length:
            raise ValueError(f"row {index}: input_ids, labels and position_ids differ in length")
        input_ids[index, :length] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        labels[index, :length] = torch.as_tensor(row["labels"], dtype=torch.long)
        position_ids[index, :length] = torch.as_tensor(row["position_ids"], dtype=torch.long)
        position_ids[index, length:] -= length  # the pad run restarts at 0
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
