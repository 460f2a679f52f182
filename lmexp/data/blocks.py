"""Fixed-length blocks over a prepared split (a :class:`~lmexp.data.shards.ShardStream`), with the UTF-8
bytes and words each block's targets cover and the source it came from.

Blocks are :class:`~lmexp.data.packing.TokenBlocks` blocks (block i: inputs ``stream[iB : iB+B]``, labels
``stream[iB+1 : iB+B+1]``, the last one padded); the stream is the concatenation of the split's shards.
"""

from __future__ import annotations

import torch

from lmexp.data.packing import TokenBlocks
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
        super().__init__(stream, block_size, pad_id, None, split)
        self.source_id = source_id

    def _index(self, i: int) -> int:
        n_blocks = len(self)
        if i < 0:
            i += n_blocks
        if not 0 <= i < n_blocks:
            raise IndexError(f"block {i} out of range for {n_blocks} blocks")
        return i

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = self._index(int(i))
        item = super().__getitem__(i)
        _, n_bytes, n_words = self.text_between(i, i + 1)
        item["n_words"] = torch.tensor(n_words, dtype=torch.int64)
        item["n_bytes"] = torch.tensor(n_bytes, dtype=torch.int64)
        item["source"] = torch.tensor(self.source_id, dtype=torch.int64)
        return item

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
