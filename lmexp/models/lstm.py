"""The recurrent baseline in one file: config and an LSTM language model.

Embedding -> dropout -> multi-layer ``torch.nn.LSTM`` (dropout between layers) -> dropout -> [projection
hidden -> n_embd when the head is tied and the sizes differ] -> linear head with a bias. It is causal by
construction: the hidden state at position t has seen tokens 0..t only, so it needs no mask and has no
position limit.

Shape legend: B = batch, T = sequence length, E = n_embd, H = hidden_size, V = padded vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from lmexp.config.schema import between, listed, positive
from lmexp.models.config import ModelConfig
from lmexp.models.head_loss import HeadLoss, linear_cross_entropy
from lmexp.models.layers import Step, init_weights, last_token
from lmexp.models.lora import LoRAOptions

LSTMState = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (n_layer, B, H)
INIT_STD = 0.02  # Linear layers (projection, untied head), as in the transformers
# The tied embedding is both the LSTM's input and the output layer, which pull its scale apart: the LSTM's
# default U(-1/sqrt(H), 1/sqrt(H)) weights want O(1) inputs (at 0.02 the gates barely see the tokens and a
# tiny model hardly learns), while the output side learns unigram statistics fastest when small (at 1.0,
# Adam's ~lr-sized steps barely move it, and real-text loss falls ~3x slower in a 40-step run). 0.1 does well
# on both, and keeps the initial predictions near-uniform.
EMBEDDING_INIT_STD = 0.1
FORGET_GATE_BIAS = 1.0  # start by remembering (Jozefowicz et al., 2015); other LSTM biases start at 0


@dataclass
class LSTMConfig(ModelConfig):
    """Architecture of an :class:`LSTMLM` (``conf/model/lstm.yaml``). Validated on construction; all problems
    are reported together."""

    n_layer: int = positive(2)
    """Number of stacked LSTM layers."""
    n_embd: int = positive(128)
    """Token embedding size (the first LSTM layer's input size)."""
    hidden_size: int = positive(256)
    """Hidden (and cell) state size of every LSTM layer."""
    vocab_size: int | None = positive(None)
    """Tokenizer vocabulary size. None means "the tokenizer's": the caller fills it in before ``build()``."""
    pad_vocab_to_multiple: int = positive(64)
    """Embedding rows are padded up to a multiple of this for matmul efficiency (1 = no padding)."""
    dropout: float = between(0.1, 0.0, 1.0, high_open=True)
    """Dropout on the embeddings, between LSTM layers and before the head, in [0, 1)."""
    tie_embeddings: bool = True
    """Share one matrix between the token embedding and the output layer. When ``hidden_size != n_embd``
    a Linear projection hidden -> n_embd (no bias) precedes the tied head."""
    max_seq_len: int | None = positive(None)
    """Accepted for symmetry with the transformer configs (the run checks ``data.block_size`` against it);
    an LSTM has no position limit, so None means unlimited and the model never enforces it."""
    name: str = "lstm"
    """Informational label for logs and run names."""
    lora: LoRAOptions = listed(LoRAOptions)
    """LoRA adapters (``model.lora.r=8 model.lora.target=[...]``, lmexp/models/lora.py); null ``r``: off."""

    @property
    def hidden_width(self) -> int:
        """Width of the states the heads read: the LSTM's hidden size."""
        return self.hidden_size

    @property
    def projects_hidden(self) -> bool:
        """Whether a hidden -> n_embd projection sits before the (tied) head."""
        return self.tie_embeddings and self.hidden_size != self.n_embd

    def build(self) -> LSTMLM:
        """Construct the model (on the current default device, e.g. inside ``with torch.device("meta")``)."""
        self.require_vocab_size()
        return LSTMLM(self)

    def num_parameters(self) -> int:
        """Number of distinct parameters of the built model, computed without building it."""
        E, H, V = self.n_embd, self.hidden_size, self.padded_vocab_size
        embedding = V * E
        # Per layer: input-to-hidden and hidden-to-hidden weights for 4 gates, and two bias vectors.
        lstm = sum(4 * H * (E if layer == 0 else H) + 4 * H * H + 2 * 4 * H for layer in range(self.n_layer))
        projection = H * E if self.projects_hidden else 0
        head_in = E if self.tie_embeddings else H
        head = (0 if self.tie_embeddings else V * head_in) + V  # weight (unless tied) + bias
        return embedding + lstm + projection + head


class LSTMLM(nn.Module):
    """Multi-layer LSTM language model with an (optionally tied) output layer."""

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        E, H, V = config.n_embd, config.hidden_size, config.padded_vocab_size  # fails if vocab_size unset
        self.tok_emb = nn.Embedding(V, E)
        self.drop = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(
            input_size=E,
            hidden_size=H,
            num_layers=config.n_layer,
            batch_first=True,
            # nn.LSTM drops out between layers only, and warns when there is no "between".
            dropout=config.dropout if config.n_layer > 1 else 0.0,
        )
        self.proj = nn.Linear(H, E, bias=False) if config.projects_hidden else None
        self.lm_head = nn.Linear(E if config.tie_embeddings else H, V)
        if config.tie_embeddings:
            # Same Parameter object: one matrix, one gradient, counted once by parameters().
            self.lm_head.weight = self.tok_emb.weight

        self.apply(partial(init_weights, std=INIT_STD))  # Embedding and Linear layers; nn.LSTM is skipped
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=EMBEDDING_INIT_STD)
        self._init_lstm_biases()

    @torch.no_grad()
    def _init_lstm_biases(self) -> None:
        """Zero the LSTM biases except the forget gate's (gate order: input, forget, cell, output)."""
        H = self.config.hidden_size
        for layer in range(self.config.n_layer):
            bias_ih = getattr(self.lstm, f"bias_ih_l{layer}")  # (4H,)
            bias_hh = getattr(self.lstm, f"bias_hh_l{layer}")  # (4H,)
            bias_ih.zero_()
            bias_hh.zero_()
            bias_ih[H : 2 * H].fill_(FORGET_GATE_BIAS)  # the two biases are summed, so set one of them

    def hidden_states(
        self, input_ids: torch.Tensor, state: LSTMState | None = None
    ) -> tuple[torch.Tensor, LSTMState]:
        """The last LSTM layer's output at every position, and the recurrent state after the last one.

        Args:
            input_ids: Token ids of shape (B, T).
            state: ``(h, c)``, each (n_layer, B, H), after earlier positions; None = zero state.

        Returns:
            ``(hidden (B, T, H), (h, c))``; the head reads ``hidden``, generation carries ``(h, c)``.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        x = self.drop(self.tok_emb(input_ids))  # (B, T, E)
        hidden, state = self.lstm(x, state)  # (B, T, H), 2 x (n_layer, B, H)
        return hidden, state

    def _head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.drop(hidden)  # (B, T, H)
        return h if self.proj is None else self.proj(h)  # (B, T, E) when projected

    def forward_with_state(
        self, input_ids: torch.Tensor, state: LSTMState | None = None
    ) -> tuple[torch.Tensor, LSTMState]:
        """Logits (B, T, V) and the recurrent state; feed the state back to continue the sequence."""
        hidden, state = self.hidden_states(input_ids, state)  # (B, T, H)
        return self.lm_head(self._head_input(hidden)), state  # (B, T, V)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | HeadLoss:
        """Next-token logits for every position, or, given ``labels``, the loss without the logits.

        Args:
            input_ids: Token ids of shape (B, T); any T (``config.max_seq_len`` is not enforced here).
            labels: (B, T) next-token ids, -100 where no loss is due (see ``GPT.forward``).

        Returns:
            Logits of shape (B, T, V) with V = ``config.padded_vocab_size`` (position t predicts token
            t+1), zero initial state; with ``labels``, a :class:`HeadLoss`.
        """
        hidden, _ = self.hidden_states(input_ids)  # (B, T, H); zero initial state
        h = self._head_input(hidden)  # (B, T, E or H)
        if labels is None:
            return self.lm_head(h)  # (B, T, V)
        head = self.lm_head
        return linear_cross_entropy(
            h.flatten(0, 1), head.weight, head.bias, labels.flatten(), n_classes=self.config.vocab_size
        )

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of distinct parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------- the backbone contract (models/registry.py)
    def token_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The last LSTM layer's output (B, T, H); recurrent, so right padding never reaches a real
        position."""
        return self.hidden_states(input_ids)[0]

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence vectors (B, H): the output at the last real token."""
        return last_token(hidden, attention_mask)

    def drop_pretraining_heads(self, keep_pooler: bool) -> None:
        """Remove the projection and the LM head, which a fine-tuned model never calls."""
        self.proj = None
        self.lm_head = None

    def shard_units(self) -> list[nn.Module]:
        """No sub-module is sharded on its own: FSDP treats the whole (small) model as one unit."""
        return []

    def start_generation(self, prompt: torch.Tensor) -> tuple[torch.Tensor, Step]:
        """Logits (N, V) after ``prompt`` (N, P), and a step that feeds new tokens (N, 1), carrying the
        recurrent state, and returns their logits."""
        logits, state = self.forward_with_state(prompt)
        carried = [state]

        def step(new: torch.Tensor) -> torch.Tensor:
            logits, carried[0] = self.forward_with_state(new, carried[0])
            return logits[:, -1]  # (N, V)

        return logits[:, -1], step
