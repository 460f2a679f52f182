"""Fixed-length blocks over a prepared split (a :class:`~lmexp.data.shards.ShardStream`), with the UTF-8
bytes and words each block's targets cover and the source it came from.

Blocks are :class:`~lmexp.data.packing.TokenBlocks` blocks (block i: inputs ``stream[iB : iB+B]``, labels
``stream[iB+1 : iB+B+1]``, the last one padded); the stream is the concatenation of the split's shards.
"""

from __future__ import annotations

import numpy as np
import torch

from lmexp.data.packing import IGNORE_INDEX, TokenBlocks
from lmexp.data.shards import ShardStream


class StreamBlocks(TokenBlocks):
    """:class:`TokenBlocks` over a :class:`ShardStream`; each item also has ``n_bytes``, ``n_words`` and
    ``source``.

    ``n_bytes`` / ``n_words``: the UTF-8 bytes / whitespace-separated words of the documents whose closing
    eos is among the block's labels (see :mod:`lmexp.data.shards`). A document counts in exactly one
    block, so over a split the sums are exact; summed NLL in bits over them gives bits per byte and bits
    per word comparable across tokenizers. (Unlike TokenBlocks' ``n_words``, which counts word-start
    pieces among the labels, these come from the original text.)
    """

    def __init__(
        self, stream: ShardStream, block_size: int, pad_id: int, source_id: int = 0, split: str = "data"
    ) -> None:
        super().__init__(stream, block_size, pad_id, split)
        self.source_id = source_id

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n_blocks = len(self)
        i = int(i) + n_blocks if int(i) < 0 else int(i)
        if not 0 <= i < n_blocks:
            raise IndexError(f"block {i} out of range for {n_blocks} blocks")
        start = i * self.block_size
        chunk = self.stream.read(start, start + self.block_size + 1).astype(np.int64)
        inputs, labels = chunk[:-1], chunk[1:]
        n_pad = self.block_size - len(labels)
        if n_pad:  # only the last block is short
            inputs = np.concatenate([inputs, np.full(n_pad, self.pad_id, dtype=np.int64)])
            labels = np.concatenate([labels, np.full(n_pad, IGNORE_INDEX, dtype=np.int64)])
        _, n_bytes, n_words = self.text_between(i, i + 1)
        return {
            "input_ids": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),
            "n_words": _scalar(n_words),
            "n_bytes": _scalar(n_bytes),
            "source": _scalar(self.source_id),
        }

    def text_between(self, first_block: int, stop_block: int) -> tuple[int, int, int]:
        """(documents, UTF-8 bytes, words) whose closing eos is a label of blocks ``first_block`` ..
        ``stop_block - 1``: two binary searches, whatever the range."""
        start = first_block * self.block_size + 1  # labels of block i are positions iB+1 .. iB+B
        stop = min(stop_block * self.block_size + 1, len(self.stream))
        return self.stream.documents_between(start, stop)

    @property
    def n_bytes(self) -> int:
        """UTF-8 bytes of the whole split (the bpb denominator)."""
        return self.stream.n_bytes

    @property
    def n_words(self) -> int:
        """Whitespace-separated words of the whole split (the bpw denominator)."""
        return self.stream.n_words


def _scalar(value: int) -> torch.Tensor:
    """A 0-d int64 tensor; through numpy, several times cheaper than ``torch.tensor`` per item."""
    return torch.from_numpy(np.array(value, dtype=np.int64))
