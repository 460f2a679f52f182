"""Transformer layers shared by the models: attention, MLP, block, weight init.

The layers are written once for both decoder (GPT: causal, pre-LN) and encoder (BERT: bidirectional with a
padding mask, post-LN) models. Parameter names (``qkv``, ``proj``, ``fc``, ``ln1``, ``ln2``) are kept short
and stable because checkpoint exporters map them onto Hugging Face names.

Shape legend: B = batch, T = sequence length, C = n_embd, H = n_head, D = C // H (head size).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Attribute set on the Linear layers whose output is added straight into the residual stream. Their init
# is scaled down with depth (GPT-2 paper, section 2.3) so the residual stream's variance does not grow
# with the number of layers; see :func:`scale_residual_projections`.
RESIDUAL_PROJECTION_ATTR = "is_residual_projection"
Step = Callable[[torch.Tensor], torch.Tensor]  # generation: new tokens (N, 1) -> their logits (N, V)


def mark_residual_projection(linear: nn.Linear) -> nn.Linear:
    """Flag ``linear`` as a residual projection for :func:`scale_residual_projections`; returns it."""
    setattr(linear, RESIDUAL_PROJECTION_ATTR, True)
    return linear


class KVCache:
    """Keys and values of the positions seen so far by one causal attention layer (incremental decoding).

    Each decoding step appends the new positions' keys and values, so a step costs attention over the
    cached positions instead of recomputing the whole prefix.
    """

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # (B, H, L, D)
        self.values: torch.Tensor | None = None  # (B, H, L, D)

    @property
    def length(self) -> int:
        """Number of cached positions L."""
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the keys and values (B, H, T, D) of T new positions; return all of them (B, H, L + T, D)."""
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=2)  # (B, H, L + T, D)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=2)  # (B, H, L + T, D)
        return self.keys, self.values

    def causal_mask(self, T: int, device: torch.device) -> torch.Tensor | None:
        """Boolean mask (T, L + T) letting new query i see cached keys and new keys up to i.

        None when SDPA's own ``is_causal`` (an empty cache) or no mask at all (one new position, which
        may see everything) already does it.
        """
        past = self.length
        if past == 0 or T == 1:
            return None
        query_pos = past + torch.arange(T, device=device)  # (T,) absolute positions of the queries
        key_pos = torch.arange(past + T, device=device)  # (L + T,)
        return key_pos[None, :] <= query_pos[:, None]  # (T, L + T)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, using PyTorch's fused SDPA kernels.

    Args:
        n_embd: Model width C.
        n_head: Number of heads H; must divide ``n_embd``.
        dropout: Dropout on the attention probabilities (training only) and on the output.
        bias: Whether the two Linear layers have biases.
        causal: If True each position attends only to itself and earlier positions (decoder); if False
            attention is bidirectional and an optional ``attn_mask`` may hide positions (encoder padding).
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, causal: bool) -> None:
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        self.n_embd = n_embd
        self.n_head = n_head
        self.causal = causal
        self.attn_dropout = dropout
        # One matmul for q, k and v instead of three; the output is split along the last dim.
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = mark_residual_projection(nn.Linear(n_embd, n_embd, bias=bias))
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        causal_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend over ``x`` of shape (B, T, C); returns (B, T, C).

        Args:
            x: Input activations.
            attn_mask: Only for non-causal attention. Boolean (True = may attend) or additive float mask
                broadcastable to (B, H, T, T), e.g. a padding mask of shape (B, 1, 1, T).
            kv_cache: Only for causal attention: keys and values of the earlier positions. ``x`` holds the
                positions that follow them; their keys and values are appended to the cache.
            causal_mask: Only for causal attention without a cache: a boolean mask (True = may attend)
                broadcastable to (B, H, T, T) used instead of plain causality, so it must be causal itself,
                e.g. the block-causal mask of packed documents (lmexp/models/document_mask.py).
        """
        if self.causal and attn_mask is not None:
            # SDPA cannot combine is_causal with an explicit mask; a decoder never needs both here.
            raise ValueError("attn_mask is only supported for non-causal attention")
        if causal_mask is not None and (not self.causal or kv_cache is not None):
            raise ValueError("causal_mask is only supported for causal attention without a kv_cache")
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        is_causal = self.causal
        if causal_mask is not None:
            attn_mask, is_causal = causal_mask, False  # the mask carries the causality
        if kv_cache is not None:
            attn_mask, is_causal = kv_cache.causal_mask(T, x.device), kv_cache.length == 0
            k, v = kv_cache.append(k, v)  # 2 x (B, H, L, D), L = cached + T positions
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            # SDPA's dropout_p applies regardless of mode, so switch it off outside training.
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=is_causal,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.proj(y))  # (B, T, C)


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear -> GELU -> Linear -> dropout.

    Args:
        n_embd: Model width C.
        hidden: Hidden width (usually 4 * C).
        dropout: Dropout on the output.
        bias: Whether the Linear layers have biases.
        gelu_approximate: ``"tanh"`` matches GPT-2's ``gelu_new`` (HF); ``"none"`` is the exact erf GELU
            that BERT checkpoints use.
    """

    def __init__(
        self, n_embd: int, hidden: int, dropout: float, bias: bool, gelu_approximate: str = "tanh"
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.act = nn.GELU(approximate=gelu_approximate)
        self.proj = mark_residual_projection(nn.Linear(hidden, n_embd, bias=bias))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, T, C) to (B, T, C)."""
        h = self.act(self.fc(x))  # (B, T, hidden)
        return self.dropout(self.proj(h))  # (B, T, C)


class Block(nn.Module):
    """One transformer layer: self-attention and MLP, each with a residual connection and a LayerNorm.

    Args:
        n_embd: Model width C.
        n_head: Number of attention heads.
        dropout: Dropout used inside attention and after each sub-layer.
        bias: Biases in the Linear layers and LayerNorms.
        causal: Causal (decoder) or bidirectional (encoder) attention.
        norm_first: Pre-LN ``x + f(ln(x))`` as in GPT-2 (stable without warm-up tricks) if True;
            post-LN ``ln(x + f(x))`` as in the original Transformer and BERT if False.
        mlp_ratio: MLP hidden width as a multiple of ``n_embd``.
        layer_norm_eps: Epsilon of both LayerNorms.
        gelu_approximate: GELU variant of the MLP, see :class:`MLP`.
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        dropout: float,
        bias: bool,
        causal: bool,
        norm_first: bool = True,
        mlp_ratio: int = 4,
        layer_norm_eps: float = 1e-5,
        gelu_approximate: str = "tanh",
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.ln1 = nn.LayerNorm(n_embd, eps=layer_norm_eps, bias=bias)
        self.attn = SelfAttention(n_embd, n_head, dropout, bias, causal)
        self.ln2 = nn.LayerNorm(n_embd, eps=layer_norm_eps, bias=bias)
        self.mlp = MLP(n_embd, mlp_ratio * n_embd, dropout, bias, gelu_approximate)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        causal_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Map (B, T, C) to (B, T, C); the masks and ``kv_cache`` go to :class:`SelfAttention`."""
        if self.norm_first:
            x = x + self.attn(self.ln1(x), attn_mask, kv_cache, causal_mask)  # (B, T, C)
            x = x + self.mlp(self.ln2(x))  # (B, T, C)
        else:
            x = self.ln1(x + self.attn(x, attn_mask, kv_cache, causal_mask))  # (B, T, C)
            x = self.ln2(x + self.mlp(x))  # (B, T, C)
        return x


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2/BERT-style init of one module; use as ``model.apply(partial(init_weights, std=std))``.

    Linear and Embedding weights ~ N(0, std), biases zero, norm layers at identity (weight 1, bias 0).
    Other modules are left alone.
    """
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def residual_init_std(std: float, n_layer: int) -> float:
    """Init std for residual projections: ``std / sqrt(2 * n_layer)`` (two residual adds per layer)."""
    return std / math.sqrt(2 * n_layer)


def scale_residual_projections(model: nn.Module, n_layer: int, std: float = 0.02) -> int:
    """Re-initialise every Linear flagged by :func:`mark_residual_projection` with the scaled std.

    Call after :func:`init_weights`. Returns the number of layers re-initialised.
    """
    scaled_std = residual_init_std(std, n_layer)
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and getattr(module, RESIDUAL_PROJECTION_ATTR, False):
            nn.init.normal_(module.weight, mean=0.0, std=scaled_std)
            count += 1
    return count


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The state (B, C) of each row's last real token, from ``hidden`` (B, T, C) and a right-padded
    ``attention_mask`` (B, T)."""
    last = attention_mask.sum(dim=1) - 1  # (B,) index of the last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, C)


class CausalDecoder(nn.Module):
    """The backbone contract (lmexp/models/registry.py) of a transformer decoder whose blocks are
    ``self.blocks``, with ``hidden_states(input_ids, kv_caches)``, ``new_kv_caches()`` and an ``lm_head``
    (tied to the embedding when ``config.tie_embeddings``); lmexp's GPT and Llama share it."""

    config: Any
    blocks: nn.ModuleList

    def token_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final hidden states (B, T, C); causal, so padding on the right never reaches a real position."""
        return self.hidden_states(input_ids)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence vectors (B, C): the last real token's state, which has seen the whole text."""
        return last_token(hidden, attention_mask)

    def drop_pretraining_heads(self, keep_pooler: bool) -> None:
        """Remove the LM head a fine-tuned model never calls (a tied head is the embedding and stays)."""
        if not self.config.tie_embeddings:
            self.lm_head = None

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one: the blocks."""
        return list(self.blocks)

    def start_generation(
        self, prompt: torch.Tensor
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Logits (N, V) after ``prompt`` (N, P), and a step that feeds new tokens (N, 1) through the KV
        cache and returns their logits."""
        caches = self.new_kv_caches()
        return self(prompt, caches)[:, -1], lambda new: self(new, caches)[:, -1]

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of distinct parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
