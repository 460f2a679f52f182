"""Document masking: ids and positions from eos, the block-causal mask, and GPT/Llama on packed blocks."""

from __future__ import annotations

import pytest
import torch

from lmexp.models.document_mask import (
    block_causal_mask,
    document_ids_and_positions,
    document_ids_from_eos,
    document_positions,
)
from lmexp.models.gpt import GPTConfig
from lmexp.models.layers import SelfAttention
from lmexp.models.llama import LlamaConfig

EOS = 2


def test_ids_and_positions_from_eos() -> None:
    #                   tail of a cut doc | [eos] doc         | [eos] doc   | [eos]
    block = torch.tensor([7, 8, EOS, 5, 6, 9, EOS, 4, EOS])
    ids, positions = document_ids_and_positions(block, EOS)
    assert ids.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 3]
    assert positions.tolist() == [0, 1, 0, 1, 2, 3, 0, 1, 0]
    # An eos that closes its document instead: the next document starts after it.
    closing = document_ids_from_eos(block, EOS, eos_starts_document=False)
    assert closing.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert document_positions(closing).tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1]
    batch = torch.stack([block, torch.tensor([EOS, 1, 1, 1, 1, 1, 1, 1, 1])])  # (B, T) works row by row
    assert document_ids_from_eos(batch, EOS)[1].tolist() == [1] * 9
    assert document_positions(document_ids_from_eos(batch, EOS))[1].tolist() == list(range(9))


def test_block_causal_mask_matches_its_definition() -> None:
    ids = torch.tensor([[0, 0, 1, 1, 1, 4, 4, 0], [3, 3, 3, 3, 3, 3, 3, 3]])
    mask = block_causal_mask(ids)
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    segment = [0, 0, 1, 1, 1, 2, 2, 3]  # a repeated id in a later run is still a new document
    for i in range(8):
        for j in range(8):
            assert mask[0, 0, i, j] == (j <= i and segment[i] == segment[j])
    assert torch.equal(mask[1, 0], torch.ones(8, 8, dtype=torch.bool).tril())  # one document: plain causal


def gpt(**overrides):
    return GPTConfig(n_layer=2, n_head=2, n_embd=32, max_seq_len=32, vocab_size=37, **overrides)


def llama(**overrides):
    return LlamaConfig(
        n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=32, vocab_size=37, **overrides
    )


@pytest.mark.parametrize("make_config", [gpt, llama], ids=["gpt", "llama"])
def test_documents_do_not_see_each_other(make_config) -> None:
    torch.manual_seed(0)
    model = make_config().build().eval()
    first = [5, 6, 7, 8, 9]  # the tail of a document cut by the block start
    second = [EOS, 10, 11, 12, 13, 14, 15]  # a whole document: it starts at its eos
    third = [EOS, 20, 21, 22]
    block = torch.tensor([first + second + third])  # (1, 16)
    ids = document_ids_from_eos(block, EOS)
    with torch.no_grad():
        packed = model(block, document_ids=ids)  # (1, 16, V)
        alone = model(torch.tensor([second]))  # the document run on its own
        changed_block = torch.tensor([[30] * 5 + second + [EOS, 31, 32, 33]])  # other documents changed
        changed = model(changed_block, document_ids=document_ids_from_eos(changed_block, EOS))
        plain = model(block)  # plain causal packing
    doc = slice(5, 12)
    assert torch.allclose(packed[:, doc], alone, atol=1e-5), "a document differs from the document alone"
    assert torch.allclose(changed[:, doc], packed[:, doc], atol=1e-5), "another document leaked in"
    assert torch.allclose(packed[:, :5], model(torch.tensor([first])), atol=1e-5)
    assert not torch.allclose(plain[:, doc], alone, atol=1e-3)  # without the mask the documents mix


@pytest.mark.parametrize("make_config", [gpt, llama], ids=["gpt", "llama"])
def test_one_document_equals_plain_causal_and_loss_path(make_config) -> None:
    torch.manual_seed(0)
    model = make_config().build().eval()
    block = torch.randint(3, 37, (2, 10))
    one_document = torch.zeros_like(block)
    with torch.no_grad():
        assert torch.allclose(model(block, document_ids=one_document), model(block), atol=1e-5)
        labels = torch.randint(0, 37, (2, 10))
        ids = document_ids_from_eos(block.index_fill(1, torch.tensor([4]), EOS), EOS)
        nll_sum, _ = model(block, labels=labels, document_ids=ids)
        logits = model(block, document_ids=ids)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    assert torch.allclose(nll_sum, expected, atol=1e-4)


@pytest.mark.parametrize("make_config", [gpt, llama], ids=["gpt", "llama"])
def test_document_ids_rejected_with_cache_or_wrong_shape(make_config) -> None:
    model = make_config().build()
    block = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="without kv_caches"):
        model(block, model.new_kv_caches(), document_ids=torch.zeros_like(block))
    with pytest.raises(ValueError, match="shape of input_ids"):
        model(block, document_ids=torch.zeros(1, 3, dtype=torch.long))


def test_self_attention_causal_mask_only_for_causal() -> None:
    x = torch.randn(1, 4, 16)
    mask = block_causal_mask(torch.zeros(1, 4, dtype=torch.long))
    encoder = SelfAttention(16, 2, 0.0, True, causal=False)
    with pytest.raises(ValueError, match="causal_mask is only supported"):
        encoder(x, causal_mask=mask)
    decoder = SelfAttention(16, 2, 0.0, True, causal=True).eval()
    assert torch.allclose(decoder(x, causal_mask=mask), decoder(x), atol=1e-6)
