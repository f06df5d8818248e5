"""LM2 model configuration: Hugging Face LlamaConfig keys plus the memory keys.

config.json of an LM2 model:
    "architectures": ["LM2ForCausalLM"], "model_type": "lm2",
    vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim (optional, default hidden_size / num_attention_heads),
    rms_norm_eps, rope_theta, max_position_embeddings, tie_word_embeddings,
    bos_token_id, eos_token_id,
    memory_slots N, memory_heads H_m, memory_layers [..] (default: every layer),
    memory_segment_tokens S, memory_learned_init (default false: identity init).
A config without memory keys (architectures LlamaForCausalLM) is a vanilla Llama model.
"""

from __future__ import annotations

import dataclasses
import json
from typing import List, Optional

LM2_ARCH = "LM2ForCausalLM"
LLAMA_ARCH = "LlamaForCausalLM"


class ConfigError(ValueError):
    """An impossible or unsupported configuration."""


@dataclasses.dataclass
class LM2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    # Memory (memory_slots == 0: a vanilla Llama model).
    memory_slots: int = 0
    memory_heads: int = 1
    memory_layers: Optional[List[int]] = None  # None: every layer (when memory_slots > 0)
    memory_segment_tokens: int = 0  # 0: segments end only where the caller says
    memory_learned_init: bool = False

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
                raise ConfigError("hidden_size must be divisible by num_attention_heads")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.memory_slots and self.memory_layers is None:
            self.memory_layers = list(range(self.num_hidden_layers))
        if not self.memory_slots:
            self.memory_layers = []
        self.validate()

    # ---- derived -----------------------------------------------------------------------
    @property
    def has_memory(self) -> bool:
        return bool(self.memory_layers)

    @property
    def memory_head_dim(self) -> int:
        return self.hidden_size // self.memory_heads

    def layer_has_memory(self, i: int) -> bool:
        return i in (self.memory_layers or [])

    def validate(self) -> None:
        positive = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim",
                    "max_position_embeddings"]
        for k in positive:
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{k} must be a positive integer (got {v!r})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ConfigError("head_dim must be even (rotary embeddings pair dimensions)")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ConfigError("rms_norm_eps and rope_theta must be positive")
        if self.memory_slots < 0 or self.memory_segment_tokens < 0:
            raise ConfigError("memory_slots and memory_segment_tokens must be >= 0")
        if self.memory_slots:
            if self.memory_heads <= 0 or self.hidden_size % self.memory_heads:
                raise ConfigError("hidden_size must be divisible by memory_heads")
            layers = self.memory_layers or []
            if not layers:
                raise ConfigError("memory_layers is empty but memory_slots > 0")
            if sorted(set(layers)) != list(layers) or not all(
                    0 <= i < self.num_hidden_layers for i in layers):
                raise ConfigError("memory_layers must be sorted, unique layer indices in range")

    # ---- JSON --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {
            "architectures": [LM2_ARCH if self.has_memory else LLAMA_ARCH],
            "model_type": "lm2" if self.has_memory else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }
        if self.has_memory:
            d.update({
                "memory_slots": self.memory_slots,
                "memory_heads": self.memory_heads,
                "memory_layers": list(self.memory_layers),
                "memory_segment_tokens": self.memory_segment_tokens,
                "memory_learned_init": self.memory_learned_init,
            })
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LM2Config":
        archs = d.get("architectures") or [LLAMA_ARCH]
        if archs[0] not in (LM2_ARCH, LLAMA_ARCH):
            raise ConfigError(f"unsupported architecture {archs[0]!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {d['hidden_act']!r} (only silu)")
        if d.get("rope_scaling"):
            raise ConfigError("rope_scaling is not supported")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ConfigError("attention_bias / mlp_bias are not supported")
        if archs[0] == LM2_ARCH and not d.get("memory_slots"):
            raise ConfigError("LM2ForCausalLM config needs memory_slots > 0")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs.setdefault("num_key_value_heads", d.get("num_attention_heads"))
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, list):  # HF allows a list; the first is the canonical one
            kwargs["eos_token_id"] = eos[0]
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"config.json: {e}") from None

    @classmethod
    def load(cls, path: str) -> "LM2Config":
        with open(path, "r", encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
