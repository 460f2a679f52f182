"""Model definitions: plain ``nn.Module`` s, with no training framework inside."""

from lmexp.models.bert import BERT, BERT_PRESETS, BERTConfig
from lmexp.models.gpt import GPT, GPT_PRESETS, GPTConfig
from lmexp.models.layers import decay_parameter_groups
from lmexp.models.lstm import LSTMLM, LSTMConfig

__all__ = [
    "BERT",
    "BERT_PRESETS",
    "BERTConfig",
    "GPT",
    "GPT_PRESETS",
    "GPTConfig",
    "LSTMLM",
    "LSTMConfig",
    "decay_parameter_groups",
]
