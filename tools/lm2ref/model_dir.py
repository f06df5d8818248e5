"""The lm2 model directory: config.json, safetensors weights, tokenizer.model.

    DIR/config.json                      LM2Config (HF LlamaConfig keys + memory keys)
    DIR/model.safetensors                every tensor, or when sharded:
    DIR/model-00001-of-0000K.safetensors + DIR/model.safetensors.index.json
                                         {"metadata": {"total_size": bytes},
                                          "weight_map": {tensor name: file name}}
    DIR/tokenizer.model                  sentencepiece model (optional for tests)

Tensor names and shapes are those of LM2ForCausalLM's state_dict (expected_tensors()); a
directory is loaded only if it holds exactly that set, each with the right shape.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional, Tuple

import torch

from . import safetensors_io as st
from .config import LM2Config
from .model import LM2ForCausalLM

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class ModelDirError(ValueError):
    """A model directory that is missing files or holds the wrong tensors."""


def expected_tensors(cfg: LM2Config) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, shape) of every tensor a model of `cfg` has, sorted by name: the one list
    that drives loading, validation and tests (docs/lm2-spec.md, "Weights")."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out = [("model.embed_tokens.weight", (v, d)), ("model.norm.weight", (d,))]
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", (v, d)))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (q_out, d)),
                (p + "self_attn.k_proj.weight", (kv_out, d)),
                (p + "self_attn.v_proj.weight", (kv_out, d)),
                (p + "self_attn.o_proj.weight", (d, q_out)),
                (p + "mlp.gate_proj.weight", (f, d)),
                (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f)),
                (p + "input_layernorm.weight", (d,)),
                (p + "post_attention_layernorm.weight", (d,))]
        if cfg.layer_has_memory(i):
            m = p + "memory."
            out += [(m + n + ".weight", (d, d)) for n in ("read_q", "read_k", "read_v", "write_v")]
            for n in ("out_gate", "in_gate", "forget_gate"):
                out += [(m + n + ".weight", (d, d)), (m + n + ".bias", (d,))]
            if cfg.memory_learned_init:
                out.append((m + "init", (cfg.memory_slots, d)))
    return sorted(out)


def save_model_dir(model: LM2ForCausalLM, out_dir: str, dtype: torch.dtype = torch.float32,
                   tokenizer: Optional[str] = None, max_shard_bytes: int = 0,
                   extra_files: Optional[Dict[str, str]] = None) -> None:
    """Write `model` to `out_dir` with tensors stored as `dtype`. max_shard_bytes > 0
    splits the weights into shards of at most that size (a tensor is never split)."""
    os.makedirs(out_dir, exist_ok=True)
    model.config.save(os.path.join(out_dir, "config.json"))
    tensors = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    names = sorted(tensors)
    if max_shard_bytes <= 0:
        st.save_file(tensors, os.path.join(out_dir, SINGLE_NAME), {"format": "pt"})
    else:
        shards: List[List[str]] = [[]]
        size = 0
        for n in names:
            nbytes = tensors[n].numel() * tensors[n].element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(n)
            size += nbytes
        weight_map = {}
        for i, group in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            st.save_file({n: tensors[n] for n in group}, os.path.join(out_dir, fname),
                         {"format": "pt"})
            weight_map.update({n: fname for n in group})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(out_dir, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            f.write("\n")
    if tokenizer:
        shutil.copyfile(tokenizer, os.path.join(out_dir, "tokenizer.model"))
    for name, text in (extra_files or {}).items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)


def read_tensors(model_dir: str) -> Dict[str, torch.Tensor]:
    """Every tensor of the directory, single-file or sharded, as stored."""
    index = os.path.join(model_dir, INDEX_NAME)
    if os.path.exists(index):
        with open(index, "r", encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelDirError(f"{index}: no weight_map")
        out: Dict[str, torch.Tensor] = {}
        for fname in sorted(set(weight_map.values())):
            if os.path.basename(fname) != fname:
                raise ModelDirError(f"{index}: shard name {fname!r} must be a plain file name")
            tensors, _ = st.load_file(os.path.join(model_dir, fname))
            for name, t in tensors.items():
                if weight_map.get(name) != fname:
                    raise ModelDirError(f"{fname}: tensor {name} is not mapped to this shard")
                if name in out:
                    raise ModelDirError(f"tensor {name} appears in two shards")
                out[name] = t
        missing = set(weight_map) - set(out)
        if missing:
            raise ModelDirError(f"index names tensors no shard holds: {sorted(missing)[:5]}")
        return out
    single = os.path.join(model_dir, SINGLE_NAME)
    if not os.path.exists(single):
        raise ModelDirError(f"{model_dir}: neither {SINGLE_NAME} nor {INDEX_NAME}")
    return st.load_file(single)[0]


def load_model_dir(model_dir: str, dtype: torch.dtype = torch.float64) -> LM2ForCausalLM:
    """Load a model directory into a reference model computing in `dtype`."""
    cfg = LM2Config.load(os.path.join(model_dir, "config.json"))
    tensors = read_tensors(model_dir)
    expected = dict(expected_tensors(cfg))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelDirError(f"{model_dir}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelDirError(f"{name}: shape {tuple(tensors[name].shape)}, expected {shape}")
        if not tensors[name].is_floating_point():
            raise ModelDirError(f"{name}: weights must be floating point")
    model = LM2ForCausalLM(cfg).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True)
    model.eval()
    return model
