"""A Llama-style decoder-only language model in one file: its config and the model.

What sets it apart from lmexp's GPT: rotary position embeddings (RoPE) instead of learned ones, RMSNorm
instead of LayerNorm, a SwiGLU MLP, grouped-query attention (``n_kv_head`` key/value heads shared by
``n_head`` query heads), no biases, and untied embeddings allowed. The interface is GPT's (``hidden_states``,
``forward`` with ``labels`` and ``document_ids``, ``new_kv_caches``, ``num_parameters``, ``blocks``), so
tasks, generation, FLOP counting and FSDP can treat both models the same way.

Parameter names follow Hugging Face's ``LlamaForCausalLM`` closely, so an adapter only renames
(lmexp/models/llama_hf.py)::

    tok_emb                   -> model.embed_tokens
    blocks.{i}.attn_norm      -> model.layers.{i}.input_layernorm
    blocks.{i}.attn.{q,k,v,o}_proj -> model.layers.{i}.self_attn.{q,k,v,o}_proj
    blocks.{i}.mlp_norm       -> model.layers.{i}.post_attention_layernorm
    blocks.{i}.mlp.{gate,up,down}_proj -> model.layers.{i}.mlp.{gate,up,down}_proj
    norm                      -> model.norm
    lm_head                   -> lm_head

RoPE rotates the two halves of each head (Hugging Face's ``rotate_half`` layout, not interleaved pairs), so
q/k weights need no permutation either way.

Shape legend: B = batch, T = sequence length, C = n_embd, H = n_head, K = n_kv_head, D = C // H (head
size), I = intermediate_size, V = padded vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lmexp.config.schema import between, listed, positive
from lmexp.errors import ConfigError
from lmexp.models.config import ModelConfig, heads_problem
from lmexp.models.document_mask import block_causal_mask, document_positions
from lmexp.models.head_loss import HeadLoss, linear_cross_entropy
from lmexp.models.layers import (
    CausalDecoder,
    KVCache,
    init_weights,
    mark_residual_projection,
    scale_residual_projections,
)
from lmexp.models.lora import LoRAOptions

INIT_STD = 0.02  # as GPT-2 and Llama (initializer_range)


def swiglu_hidden_size(n_embd: int, multiple_of: int) -> int:
    """Llama's SwiGLU width: 2/3 of a 4 * C MLP (same parameters as one with 2 matrices), rounded up.

    Three C x I matrices at I = 8C/3 hold as many parameters as GPT's two C x 4C ones.
    """
    hidden = int(2 * 4 * n_embd / 3)
    return -(-hidden // multiple_of) * multiple_of


@dataclass
class LlamaConfig(ModelConfig):
    """Architecture of a :class:`Llama` (``conf/model/llama*.yaml``). Validated on construction; all
    problems are reported together.

    The sizes shipped in conf/model/: ``llama`` (nano, 4 x 128, a CPU model), ``llama-124m`` and
    ``llama-350m``, which keep GPT-2 small's and medium's depth, width and head size; grouped-query
    attention saves key/value parameters, which go into a 3 * C wide MLP instead (Llama 3 uses 3.5 * C), so
    the totals stay near GPT-2's at the same vocabulary.
    """

    n_layer: int = positive(4)
    """Number of decoder blocks."""
    n_head: int = positive(4)
    """Query heads per block; must divide ``n_embd``, and the head size ``n_embd // n_head`` must be even
    (RoPE rotates pairs of dimensions)."""
    n_kv_head: int | None = positive(None)
    """Key/value heads per block (grouped-query attention); must divide ``n_head``. None = ``n_head``
    (plain multi-head attention); 1 = multi-query attention."""
    n_embd: int = positive(128)
    """Model width (embedding and residual-stream size)."""
    intermediate_size: int | None = positive(None)
    """Hidden width of the SwiGLU MLP. None = Llama's rule: 8/3 * ``n_embd`` rounded up to a multiple of
    ``mlp_multiple_of``."""
    mlp_multiple_of: int = positive(64)
    """Multiple that a derived ``intermediate_size`` is rounded up to (Llama uses 256; 64 keeps tiny
    models near 8/3 * C)."""
    max_seq_len: int = positive(256)
    """Longest sequence (prompt + generated tokens) the model accepts; ``data.block_size`` must not exceed
    it. RoPE has no table of this size; the limit keeps the contract of lmexp's GPT."""
    vocab_size: int | None = positive(None)
    """Tokenizer vocabulary size. None means "the tokenizer's": the caller fills it in before ``build()``."""
    pad_vocab_to_multiple: int = positive(64)
    """Embedding rows are padded up to a multiple of this for matmul efficiency (1 = no padding)."""
    rope_theta: float = positive(10000.0)
    """RoPE base: dimension pair i of a head turns by ``position * rope_theta ** (-2i / D)`` radians
    (10000 in Llama 1 and 2, 500000 in Llama 3 for long contexts)."""
    norm_eps: float = positive(1e-5)
    """Epsilon of every RMSNorm."""
    tie_embeddings: bool = True
    """Share one matrix between the token embedding and the output layer (small models gain most from
    it; Llama 2 and 3 do not tie, Llama 3.2 1B/3B do)."""
    dropout: float = between(0.0, 0.0, 1.0, high_open=True)
    """Dropout on embeddings, attention probabilities and residual branches, in [0, 1)."""
    name: str = "llama"
    """Informational label for logs and run names."""
    lora: LoRAOptions = listed(LoRAOptions)
    """LoRA adapters (``model.lora.r=8 model.lora.target=[...]``, lmexp/models/lora.py); null ``r``: off."""

    def problems(self) -> list[str]:
        problems = heads_problem(self.n_embd, self.n_head)
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            problems.append(f"model.n_kv_head={self.n_kv_head} does not divide model.n_head={self.n_head}")
        if not problems and (self.n_embd // self.n_head) % 2:
            problems.append(
                f"model.n_embd={self.n_embd} / model.n_head={self.n_head} = {self.n_embd // self.n_head}: "
                "expected an even head size (RoPE rotates pairs of dimensions)"
            )
        return problems

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads K (``n_kv_head``, or ``n_head`` when it is None)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_size(self) -> int:
        """Size D of one attention head."""
        return self.n_embd // self.n_head

    @property
    def mlp_hidden_size(self) -> int:
        """SwiGLU hidden width I: ``intermediate_size``, or the Llama rule when it is None."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        return swiglu_hidden_size(self.n_embd, self.mlp_multiple_of)

    def build(self) -> Llama:
        """Construct the model (on the current default device, e.g. inside ``with torch.device("meta")``)."""
        self.require_vocab_size()
        return Llama(self)

    def num_parameters(self) -> int:
        """Number of distinct parameters of the built model, computed without building it."""
        C, V, D = self.n_embd, self.padded_vocab_size, self.head_size
        H, K = self.n_head, self.kv_heads
        attn = C * H * D + 2 * C * K * D + H * D * C  # q, k and v, o
        mlp = 3 * C * self.mlp_hidden_size  # gate, up, down
        block = attn + mlp + 2 * C  # + two RMSNorm weights
        lm_head = 0 if self.tie_embeddings else V * C
        return V * C + self.n_layer * block + C + lm_head


# ------------------------------------------------------------------------------------------------- RoPE
def rope_cos_sin(positions: torch.Tensor, head_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the RoPE angles at ``positions`` (T,) or (B, T): two (1 or B, 1, T, D/2).

    Computed anew each forward (T * D/2 values, shared by all blocks) in float32, so there is no buffer to
    place on a device, shard, cast or initialise after a meta-device build.
    """
    exponents = torch.arange(0, head_size, 2, dtype=torch.float32, device=positions.device) / head_size
    inv_freq = 1.0 / (theta**exponents)  # (D/2,)
    angles = positions.float()[..., None] * inv_freq  # (T, D/2) or (B, T, D/2)
    if angles.dim() == 2:
        angles = angles[None]  # (1, T, D/2)
    angles = angles[:, None]  # (1 or B, 1, T, D/2): broadcasts over heads
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys (B, heads, T, D): pair dimension i with i + D/2 and turn it by its angle."""
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, heads, T, D/2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # (B, heads, T, D)


# ----------------------------------------------------------------------------------------------- layers
class GroupedQueryAttention(nn.Module):
    """Causal self-attention with RoPE and ``n_kv_head`` key/value heads shared by groups of query heads.

    The KV cache keeps only the K key/value heads (the memory grouped-query attention saves); SDPA's
    ``enable_gqa`` lets each group of H / K query heads read its shared head without copying it.
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = n_head, n_kv_head, n_embd // n_head
        D = self.head_size
        self.q_proj = nn.Linear(n_embd, n_head * D, bias=False)
        self.k_proj = nn.Linear(n_embd, n_kv_head * D, bias=False)
        self.v_proj = nn.Linear(n_embd, n_kv_head * D, bias=False)
        self.o_proj = mark_residual_projection(nn.Linear(n_head * D, n_embd, bias=False))
        self.attn_dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache | None = None,
        causal_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend over ``x`` (B, T, C); returns (B, T, C).

        Args:
            x: Input activations.
            rope: ``(cos, sin)`` of the positions of ``x``, from :func:`rope_cos_sin`.
            kv_cache: Keys and values of the earlier positions; those of ``x`` are appended to it.
            causal_mask: Boolean (B, 1, T, T) mask used instead of plain causality (document masking);
                not with ``kv_cache``.
        """
        B, T, C = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_size
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # rotated before caching: positions are absolute
        attn_mask, is_causal = causal_mask, causal_mask is None
        if kv_cache is not None:
            attn_mask, is_causal = kv_cache.causal_mask(T, x.device), kv_cache.length == 0
            k, v = kv_cache.append(k, v)  # 2 x (B, K, L, D), L = cached + T positions
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,  # SDPA drops out in any mode
            is_causal=is_causal,
            enable_gqa=K != H,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.o_proj(y))  # (B, T, C)


class SwiGLU(nn.Module):
    """Gated MLP: ``down(silu(gate(x)) * up(x))`` (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, n_embd: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(n_embd, hidden, bias=False)
        self.down_proj = mark_residual_projection(nn.Linear(hidden, n_embd, bias=False))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, T, C) to (B, T, C)."""
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, I)
        return self.dropout(self.down_proj(h))  # (B, T, C)


class LlamaBlock(nn.Module):
    """One pre-norm decoder layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``, with RMSNorms."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        C = config.n_embd
        self.attn_norm = nn.RMSNorm(C, eps=config.norm_eps)
        self.attn = GroupedQueryAttention(C, config.n_head, config.kv_heads, config.dropout)
        self.mlp_norm = nn.RMSNorm(C, eps=config.norm_eps)
        self.mlp = SwiGLU(C, config.mlp_hidden_size, config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache | None = None,
        causal_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Map (B, T, C) to (B, T, C); the other arguments go to :class:`GroupedQueryAttention`."""
        x = x + self.attn(self.attn_norm(x), rope, kv_cache, causal_mask)  # (B, T, C)
        return x + self.mlp(self.mlp_norm(x))  # (B, T, C)


# ------------------------------------------------------------------------------------------------ model
class Llama(CausalDecoder):
    """Decoder-only transformer LM: token embeddings, RoPE, pre-RMSNorm GQA + SwiGLU blocks, final norm."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        C, V = config.n_embd, config.padded_vocab_size  # padded_vocab_size fails if vocab_size is unset
        self.tok_emb = nn.Embedding(V, C)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(C, eps=config.norm_eps)
        self.lm_head = nn.Linear(C, V, bias=False)
        if config.tie_embeddings:
            # Same Parameter object: one matrix, one gradient, counted once by parameters().
            self.lm_head.weight = self.tok_emb.weight

        # N(0, 0.02) weights (RMSNorms start at 1 by construction); residual projections scaled with depth.
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
                positions; ``input_ids`` are the positions that follow them (RoPE positions continue
                from the cache length). None = no earlier positions.
            document_ids: Optional (B, T) document of every token of packed blocks (see
                lmexp/models/document_mask.py): a token then attends only to its own document, and RoPE
                positions restart at each document start. Not with ``kv_caches``.

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
        rope = rope_cos_sin(positions, self.config.head_size, self.config.rope_theta)  # 2 x (., 1, T, D/2)
        x = self.drop(self.tok_emb(input_ids))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, kv_caches[i] if kv_caches else None, mask)  # (B, T, C)
        return self.norm(x)  # (B, T, C)

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
            labels: (B, T) next-token ids, -100 where no loss is due; the loss is then computed straight
                from the hidden states (lmexp/models/head_loss.py), without the (B, T, V) logits.
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
