"""A GPT-2-style decoder-only language model in one file: its config and the model.

Layout and parameter names follow Hugging Face's ``GPT2LMHeadModel`` one to one, so an exporter only has
to rename (and transpose the Conv1D weights)::

    tok_emb            -> transformer.wte        blocks.{i}.attn.qkv  -> transformer.h.{i}.attn.c_attn
    pos_emb            -> transformer.wpe        blocks.{i}.attn.proj -> transformer.h.{i}.attn.c_proj
    blocks.{i}.ln1     -> transformer.h.{i}.ln_1 blocks.{i}.mlp.fc    -> transformer.h.{i}.mlp.c_fc
    blocks.{i}.ln2     -> transformer.h.{i}.ln_2 blocks.{i}.mlp.proj  -> transformer.h.{i}.mlp.c_proj
    ln_f               -> transformer.ln_f       lm_head              -> lm_head

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
from lmexp.models.document_mask import block_causal_mask, document_positions
from lmexp.models.head_loss import HeadLoss, linear_cross_entropy
from lmexp.models.layers import Block, CausalDecoder, KVCache, init_weights, scale_residual_projections
from lmexp.models.lora import LoRAOptions

INIT_STD = 0.02  # GPT-2's initializer_range
MLP_RATIO = 4  # GPT-2's MLP width is 4 * n_embd; fixed so exported checkpoints load in HF


@dataclass
class GPTConfig(ModelConfig):
    """Architecture of a :class:`GPT` (``conf/model/gpt.yaml``). Validated on construction; all problems are
    reported together."""

    n_layer: int = positive(4)
    """Number of transformer blocks."""
    n_head: int = positive(4)
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int = positive(128)
    """Model width (embedding and residual-stream size)."""
    max_seq_len: int = positive(256)
    """Number of learned position embeddings; ``data.block_size`` must not exceed it."""
    vocab_size: int | None = positive(None)
    """Tokenizer vocabulary size. None means "the tokenizer's": the caller fills it in before ``build()``."""
    pad_vocab_to_multiple: int = positive(64)
    """Embedding rows are padded up to a multiple of this for matmul efficiency (1 = no padding)."""
    dropout: float = between(0.0, 0.0, 1.0, high_open=True)
    """Dropout on embeddings, attention probabilities and residual branches, in [0, 1)."""
    bias: bool = True
    """Biases in Linear layers and LayerNorms (GPT-2 has them)."""
    tie_embeddings: bool = True
    """Share one matrix between the token embedding and the output layer (GPT-2 does)."""
    layer_norm_eps: float = positive(1e-5)
    """Epsilon of every LayerNorm."""
    name: str = "gpt"
    """Informational label for logs and run names."""
    lora: LoRAOptions = listed(LoRAOptions)
    """LoRA adapters (``model.lora.r=8 model.lora.target=[...]``, lmexp/models/lora.py); null ``r``: off."""

    def problems(self) -> list[str]:
        return heads_problem(self.n_embd, self.n_head)

    def build(self) -> GPT:
        """Construct the model (on the current default device, e.g. inside ``with torch.device("meta")``)."""
        self.require_vocab_size()
        return GPT(self)

    def num_parameters(self) -> int:
        """Number of distinct parameters of the built model, computed without building it."""
        C, V = self.n_embd, self.padded_vocab_size
        bias = int(self.bias)
        layer_norm = C + bias * C
        attn = (C * 3 * C + bias * 3 * C) + (C * C + bias * C)
        hidden = MLP_RATIO * C
        mlp = (C * hidden + bias * hidden) + (hidden * C + bias * C)
        block = 2 * layer_norm + attn + mlp
        embeddings = V * C + self.max_seq_len * C
        lm_head = 0 if self.tie_embeddings else V * C  # lm_head never has a bias
        return embeddings + self.n_layer * block + layer_norm + lm_head


class GPT(CausalDecoder):
    """Decoder-only transformer LM: token + learned position embeddings, pre-LN causal blocks, tied head.

    The backbone methods the tasks call (token_states, pool, start_generation, ...) are CausalDecoder's.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        C, V = config.n_embd, config.padded_vocab_size  # padded_vocab_size fails if vocab_size is unset
        self.tok_emb = nn.Embedding(V, C)
        self.pos_emb = nn.Embedding(config.max_seq_len, C)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(
                n_embd=C,
                n_head=config.n_head,
                dropout=config.dropout,
                bias=config.bias,
                causal=True,
                norm_first=True,
                mlp_ratio=MLP_RATIO,
                layer_norm_eps=config.layer_norm_eps,
                gelu_approximate="tanh",  # GPT-2's gelu_new
            )
            for _ in range(config.n_layer)
        )
        self.ln_f = nn.LayerNorm(C, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(C, V, bias=False)
        if config.tie_embeddings:
            # Same Parameter object: one matrix, one gradient, counted once by parameters().
            self.lm_head.weight = self.tok_emb.weight

        self.apply(partial(init_weights, std=INIT_STD))
        scale_residual_projections(self, config.n_layer, std=INIT_STD)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        kv_caches: list[KVCache] | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states of every position (what the LM head and classification heads read).

        Args:
            input_ids: Token ids of shape (B, T).
            kv_caches: One :class:`KVCache` per block (from :meth:`new_kv_caches`) holding the earlier
                positions; ``input_ids`` are the positions that follow them. None = no earlier positions.
            document_ids: Optional (B, T) document of every token of packed blocks (see
                lmexp/models/document_mask.py): a token then attends only to its own document, and
                position embeddings restart at each document start. Not with ``kv_caches``.

        Returns:
            Hidden states of shape (B, T, C).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        past = kv_caches[0].length if kv_caches else 0
        if past + T > self.config.max_seq_len:
            raise ConfigError(
                f"sequence length {past + T} exceeds model.max_seq_len={self.config.max_seq_len}: expected "
                "data.block_size (or the generation context) <= model.max_seq_len"
            )
        mask = None
        if document_ids is None:
            positions = torch.arange(past, past + T, device=input_ids.device)  # (T,)
        else:
            if kv_caches is not None or document_ids.shape != input_ids.shape:
                raise ValueError("document_ids must have the shape of input_ids and come without kv_caches")
            positions = document_positions(document_ids)  # (B, T): restart at every document
            mask = block_causal_mask(document_ids)  # (B, 1, T, T)
        x = self.tok_emb(input_ids) + self.pos_emb(positions)  # (B, T, C): (T, C) broadcasts over B
        x = self.drop(x)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache=kv_caches[i] if kv_caches else None, causal_mask=mask)  # (B, T, C)
        return self.ln_f(x)  # (B, T, C)

    def forward(
        self,
        input_ids: torch.Tensor,
        kv_caches: list[KVCache] | None = None,
        labels: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | HeadLoss:
        """Next-token logits for every position, or, given ``labels``, the loss without the logits.

        Args:
            input_ids: Token ids of shape (B, T) with T <= ``config.max_seq_len``.
            kv_caches: See :meth:`hidden_states`; with caches, generation feeds only the new tokens.
            labels: (B, T) next-token ids, -100 where no loss is due. The loss is then computed straight
                from the hidden states (lmexp/models/head_loss.py), which is how training and evaluation
                call the model: the (B, T, V) logits never exist at once.
            document_ids: See :meth:`hidden_states` (document masking of packed blocks).

        Returns:
            Logits of shape (B, T, V) with V = ``config.padded_vocab_size`` (position t predicts token
            t+1); with ``labels``, a :class:`HeadLoss` (summed NLL, greedy predictions of shape (B*T,)).
        """
        h = self.hidden_states(input_ids, kv_caches, document_ids)  # (B, T, C)
        if labels is None:
            return self.lm_head(h)  # (B, T, V)
        return linear_cross_entropy(
            h.flatten(0, 1), self.lm_head.weight, None, labels.flatten(), n_classes=self.config.vocab_size
        )

    def new_kv_caches(self) -> list[KVCache]:
        """Empty key/value caches, one per block, for incremental decoding."""
        return [KVCache() for _ in self.blocks]
