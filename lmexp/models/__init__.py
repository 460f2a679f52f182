"""Model definitions: plain ``nn.Module`` s, with no training framework inside."""

from lmexp.models.gpt import GPT, GPT_PRESETS, GPTConfig
from lmexp.models.layers import decay_parameter_groups

__all__ = ["GPT", "GPT_PRESETS", "GPTConfig", "decay_parameter_groups"]
