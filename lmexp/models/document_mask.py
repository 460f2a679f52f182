"""Document masking for packed blocks: which document each token belongs to, its position, and the mask.

lmexp packs a split into one stream ``[eos] doc1 [eos] doc2 ...`` and cuts it into fixed-length blocks, so a
block usually holds the end of one document and the start of others. Plain causal attention lets a token
attend to the documents before it in the block. With document masking each token attends only to the
earlier tokens of its own document (a block-causal mask) and its position restarts at the document's
first token, so a document's logits are those of the document run on its own.

A block's documents are given as ``document_ids`` (B, T): any integers that stay the same within a
document and change from one document to the next (e.g. 0 0 0 1 1 2 2 2). Only the changes matter: a new
document starts at position 0 and wherever the id differs from the previous position's.

Shape legend: B = batch, T = sequence length.
"""

from __future__ import annotations

import torch


def document_ids_from_eos(
    input_ids: torch.Tensor, eos_id: int, eos_starts_document: bool = True
) -> torch.Tensor:
    """Document ids (..., T) of a packed block of tokens (..., T), counting documents from 0 in each row.

    Args:
        input_ids: Token ids of one block (T,) or a batch of blocks (B, T).
        eos_id: The id that separates documents.
        eos_starts_document: True for lmexp's packing (``[eos] doc [eos] doc``, lmexp/data/packing.py):
            the eos is the first input token of the document that follows it, as when a document is
            scored or generated on its own (``[eos] doc``). False for ``doc [eos] doc [eos]`` streams,
            where the eos closes its document and the next document starts after it.

    Returns:
        Long tensor of the shape of ``input_ids``; the tokens before a row's first document boundary (the
        tail of a document cut by the block start) are document 0.
    """
    is_eos = (input_ids == eos_id).long()  # (..., T)
    ids = is_eos.cumsum(dim=-1)  # (..., T): number of eos at or before each position
    return ids if eos_starts_document else ids - is_eos


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (..., T): True where a document starts (position 0 and wherever the id changes)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)  # (..., T)
    starts[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    return starts


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Position of every token within its document (..., T): 0 at each document start, then 1, 2, ..."""
    T = document_ids.shape[-1]
    index = torch.arange(T, device=document_ids.device).expand_as(document_ids)  # (..., T)
    # The index of the latest start at or before each position: a running maximum over the start indices.
    start_index = torch.where(document_starts(document_ids), index, 0).cummax(dim=-1).values  # (..., T)
    return index - start_index


def document_ids_and_positions(
    input_ids: torch.Tensor, eos_id: int, eos_starts_document: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(document_ids, positions)`` of a packed block (..., T); see :func:`document_ids_from_eos`.

    The data side can store both with each block; the models need only ``document_ids`` (they derive
    the positions themselves with :func:`document_positions`).
    """
    document_ids = document_ids_from_eos(input_ids, eos_id, eos_starts_document)
    return document_ids, document_positions(document_ids)


def block_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, T, T), True = may attend: earlier-or-same positions of the same document.

    Every position may attend to itself, so no row of the mask is empty (no NaN from the softmax).
    """
    if document_ids.dim() != 2:
        raise ValueError(f"document_ids must have shape (batch, seq_len), got {tuple(document_ids.shape)}")
    T = document_ids.shape[1]
    # Number the documents by their starts, so ids that repeat in a later document never merge them.
    segments = document_starts(document_ids).cumsum(dim=1)  # (B, T)
    same_document = segments[:, :, None] == segments[:, None, :]  # (B, T, T): query i, key j
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()  # (T, T): j <= i
    return (same_document & causal)[:, None]  # (B, 1, T, T): the same mask for every head
