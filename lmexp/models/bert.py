"""A BERT-style bidirectional encoder in one file: its config and the model (masked LM + NSP heads).

With ``norm_first=False`` (the default) the layout, the order of operations and the init follow Hugging
Face's ``BertForPreTraining`` (``hidden_act="gelu"``, i.e. exact erf GELU), so an exporter only has to
rename, and split the fused qkv projection into query/key/value (rows ``[0:C]``, ``[C:2C]``, ``[2C:3C]``)::

    tok_emb              -> bert.embeddings.word_embeddings
    pos_emb              -> bert.embeddings.position_embeddings
    type_emb             -> bert.embeddings.token_type_embeddings
    emb_ln               -> bert.embeddings.LayerNorm
    blocks.{i}.attn.qkv  -> bert.encoder.layer.{i}.attention.self.{query,key,value}
    blocks.{i}.attn.proj -> bert.encoder.layer.{i}.attention.output.dense
    blocks.{i}.ln1       -> bert.encoder.layer.{i}.attention.output.LayerNorm
    blocks.{i}.mlp.fc    -> bert.encoder.layer.{i}.intermediate.dense
    blocks.{i}.mlp.proj  -> bert.encoder.layer.{i}.output.dense
    blocks.{i}.ln2       -> bert.encoder.layer.{i}.output.LayerNorm
    pooler.dense         -> bert.pooler.dense
    mlm_head.dense       -> cls.predictions.transform.dense
    mlm_head.ln          -> cls.predictions.transform.LayerNorm
    mlm_head.decoder     -> cls.predictions.decoder (weight tied to tok_emb; its bias is cls.predictions.bias)
    nsp_head             -> cls.seq_relationship

``BertForMaskedLM`` takes the same names without ``pooler``/``nsp_head``; ``BertForSequenceClassification``
and ``BertForTokenClassification`` take the ``bert.*`` part (plus a fresh classifier). Padded vocabulary
rows (``tok_emb`` and the decoder bias beyond ``vocab_size``) are dropped on export.

``norm_first=True`` gives a pre-LN encoder with a final LayerNorm ``ln_f``; it trains more easily when deep
but has no Hugging Face BERT counterpart.

Shape legend: B = batch, T = sequence length, C = n_embd, V = padded vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from lmexp.config.schema import between, listed, positive
from lmexp.errors import ConfigError
from lmexp.models.config import ModelConfig, heads_problem
from lmexp.models.layers import Block, init_weights
from lmexp.models.lora import LoRAOptions

INIT_STD = 0.02  # BERT's initializer_range
GELU_APPROXIMATE = "none"  # Hugging Face's hidden_act="gelu" is the exact erf GELU


@dataclass
class BERTConfig(ModelConfig):
    """Architecture of a :class:`BERT` (``conf/model/bert.yaml``). Validated on construction; all problems are
    reported together."""

    n_layer: int = positive(2)
    """Number of transformer blocks."""
    n_head: int = positive(2)
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int = positive(128)
    """Model width (embedding and residual-stream size)."""
    max_seq_len: int = positive(128)
    """Number of learned absolute position embeddings; ``data.block_size`` must not exceed it."""
    type_vocab_size: int = positive(2)
    """Number of segment ids (token types): 2 for sentence A / sentence B."""
    vocab_size: int | None = positive(None)
    """Tokenizer vocabulary size. None means "the tokenizer's": the caller fills it in before ``build()``."""
    pad_vocab_to_multiple: int = positive(64)
    """Embedding rows are padded up to a multiple of this for matmul efficiency (1 = no padding)."""
    dropout: float = between(0.1, 0.0, 1.0, high_open=True)
    """Dropout on embeddings, attention probabilities and residual branches, in [0, 1)."""
    norm_first: bool = False
    """Pre-LN blocks plus a final LayerNorm if True; post-LN as the original BERT if False (needed for
    Hugging Face export parity)."""
    layer_norm_eps: float = positive(1e-12)
    """Epsilon of every LayerNorm (BERT uses 1e-12)."""
    mlp_ratio: int = positive(4)
    """MLP hidden width as a multiple of ``n_embd`` (BERT's intermediate_size = 4 * hidden_size)."""
    name: str = "bert"
    """Informational label for logs and run names."""
    lora: LoRAOptions = listed(LoRAOptions)
    """LoRA adapters (``model.lora.r=8 model.lora.target=[...]``, lmexp/models/lora.py); null ``r``: off."""

    def problems(self) -> list[str]:
        return heads_problem(self.n_embd, self.n_head)

    def build(self) -> BERT:
        """Construct the model (on the current default device, e.g. inside ``with torch.device("meta")``)."""
        self.require_vocab_size()
        return BERT(self)

    def num_parameters(self) -> int:
        """Number of distinct parameters of the built model, computed without building it."""
        C, V = self.n_embd, self.padded_vocab_size
        layer_norm = 2 * C
        linear_cc = C * C + C
        attn = (C * 3 * C + 3 * C) + linear_cc
        hidden = self.mlp_ratio * C
        mlp = (C * hidden + hidden) + (hidden * C + C)
        block = 2 * layer_norm + attn + mlp
        embeddings = (V + self.max_seq_len + self.type_vocab_size) * C + layer_norm
        ln_f = layer_norm if self.norm_first else 0
        mlm_head = linear_cc + layer_norm + V  # the decoder weight is the tied embedding; its bias is not
        pooler = linear_cc
        nsp_head = 2 * C + 2
        return embeddings + self.n_layer * block + ln_f + mlm_head + pooler + nsp_head


class MLMHead(nn.Module):
    """Masked-LM head: Linear(C, C) -> GELU -> LayerNorm -> decoder Linear(C, V) with its own bias.

    The decoder's weight is tied to the word embedding by :class:`BERT`.
    """

    def __init__(self, n_embd: int, vocab_size: int, layer_norm_eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(n_embd, n_embd)
        self.act = nn.GELU(approximate=GELU_APPROXIMATE)
        self.ln = nn.LayerNorm(n_embd, eps=layer_norm_eps)
        self.decoder = nn.Linear(n_embd, vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map hidden states (B, T, C) to vocabulary logits (B, T, V)."""
        h = self.ln(self.act(self.dense(hidden)))  # (B, T, C)
        return self.decoder(h)  # (B, T, V)


class Pooler(nn.Module):
    """Sentence representation: Linear(C, C) + tanh over the first ([CLS]) position."""

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.dense = nn.Linear(n_embd, n_embd)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map hidden states (B, T, C) to pooled vectors (B, C)."""
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, C)


class BERT(nn.Module):
    """Bidirectional transformer encoder with BERT's pre-training heads (masked LM and next-sentence).

    Word + position + token-type embeddings are summed, layer-normed and dropped out; non-causal blocks
    (post-LN by default) attend only to real tokens when an ``attention_mask`` is given.
    """

    def __init__(self, config: BERTConfig) -> None:
        super().__init__()
        self.config = config
        C, V = config.n_embd, config.padded_vocab_size  # padded_vocab_size fails if vocab_size is unset
        eps = config.layer_norm_eps
        self.tok_emb = nn.Embedding(V, C)
        self.pos_emb = nn.Embedding(config.max_seq_len, C)
        self.type_emb = nn.Embedding(config.type_vocab_size, C)
        self.emb_ln = nn.LayerNorm(C, eps=eps)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(
                n_embd=C,
                n_head=config.n_head,
                dropout=config.dropout,
                bias=True,
                causal=False,
                norm_first=config.norm_first,
                mlp_ratio=config.mlp_ratio,
                layer_norm_eps=eps,
                gelu_approximate=GELU_APPROXIMATE,
            )
            for _ in range(config.n_layer)
        )
        # Pre-LN leaves the residual stream un-normalised, so it gets a final norm; post-LN ends normed.
        self.ln_f = nn.LayerNorm(C, eps=eps) if config.norm_first else None
        self.mlm_head = MLMHead(C, V, eps)
        # Same Parameter object: one matrix, one gradient, counted once by parameters().
        self.mlm_head.decoder.weight = self.tok_emb.weight
        self.pooler = Pooler(C)
        self.nsp_head = nn.Linear(C, 2)

        # BERT's init: N(0, 0.02) weights, zero biases, LayerNorms at identity; no depth scaling.
        self.apply(partial(init_weights, std=INIT_STD))

    def _padding_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Boolean SDPA mask (B, 1, 1, T), True = may attend, from ``attention_mask`` (B, T), 1 = real."""
        keep = attention_mask != 0  # (B, T)
        # A row with no real token would give softmax over nothing (NaN); let it attend everywhere instead
        # so its (meaningless) outputs stay finite and cannot poison a loss that ignores them.
        keep = keep | ~keep.any(dim=1, keepdim=True)  # (B, T)
        return keep[:, None, None, :]  # (B, 1, 1, T): the same key mask for every head and query

    def encode(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Contextual hidden states of every position.

        Args:
            input_ids: Token ids of shape (B, T) with T <= ``config.max_seq_len``.
            token_type_ids: Segment ids (B, T) in ``[0, type_vocab_size)``; None = all zeros (sentence A).
            attention_mask: (B, T), 1 (or True) for real tokens and 0 for padding; padding is never
                attended to. None = every position is real.

        Returns:
            Hidden states of shape (B, T, C). Outputs at padded positions are not meaningful.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ConfigError(
                f"sequence length {T} exceeds model.max_seq_len={self.config.max_seq_len}: expected "
                "data.block_size <= model.max_seq_len"
            )
        for name, tensor in (("token_type_ids", token_type_ids), ("attention_mask", attention_mask)):
            if tensor is not None and tensor.shape != input_ids.shape:
                expected, got = tuple(input_ids.shape), tuple(tensor.shape)
                raise ValueError(f"{name} must have the shape of input_ids {expected}, got {got}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # (B, T)
        mask = None if attention_mask is None else self._padding_mask(attention_mask)  # (B, 1, 1, T)

        positions = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.tok_emb(input_ids) + self.pos_emb(positions) + self.type_emb(token_type_ids)  # (B, T, C)
        x = self.drop(self.emb_ln(x))  # (B, T, C)
        for block in self.blocks:
            x = block(x, mask)  # (B, T, C)
        if self.ln_f is not None:
            x = self.ln_f(x)  # (B, T, C)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mlm_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-training logits; the first three arguments are those of :meth:`encode`.

        Args:
            mlm_positions: Optional flat indices (N,) into the B * T positions: the MLM head then runs on
                those positions only (training needs it at the ~15% masked ones; the vocabulary-wide
                head is most of a small model's compute).

        Returns:
            ``(mlm_logits, nsp_logits)`` of shapes (B, T, V), or (N, V) with ``mlm_positions``, where
            V = ``config.padded_vocab_size``; and (B, 2) (index 0 = "B follows A", as in Hugging Face's
            ``next_sentence_label``).
        """
        hidden = self.encode(input_ids, token_type_ids, attention_mask)  # (B, T, C)
        nsp_logits = self.nsp_head(self.pool(hidden))  # (B, 2)
        if mlm_positions is not None:
            hidden = hidden.flatten(0, 1)[mlm_positions]  # (N, C)
        mlm_logits = self.mlm_head(hidden)  # (B, T, V) or (N, V)
        return mlm_logits, nsp_logits

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of distinct parameters (the tied decoder matrix counts once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------- the backbone contract (models/registry.py)
    def token_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, C); padding (``attention_mask`` 0) is never attended to.
        ``token_type_ids`` (B, T): segment ids, for tasks whose inputs are pairs (question answering)."""
        return self.encode(input_ids, token_type_ids, attention_mask)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence vectors (B, C) from hidden states (B, T, C): the pre-trained pooler (dense + tanh) over
        [CLS], position 0."""
        return self.pooler(hidden)  # (B, C)

    def drop_pretraining_heads(self, keep_pooler: bool) -> None:
        """Remove the MLM and NSP heads (and the pooler unless ``keep_pooler``): a fine-tuned model never
        calls them, DDP refuses parameters without gradients, and the HF classes a fine-tuned BERT exports
        to lack them. The tied decoder matrix stays: it is the embedding."""
        self.mlm_head = None
        self.nsp_head = None
        if not keep_pooler:
            self.pooler = None

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one: the transformer blocks."""
        return list(self.blocks)
