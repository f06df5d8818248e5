"""The LM2 reference model: docs/lm2-spec.md written as PyTorch.

This file is the source of truth for the project's numerics. It favours plain, readable
tensor code over speed; every backend is tested against what it computes (in float64).
It is also the training model: everything is differentiable, nothing is updated in place,
so autograd flows through segments (backpropagation through the memory bank).

Shapes: B batch, T tokens of this call, S cached positions, d hidden, H / Hkv attention /
key-value heads of size Dh, N memory slots, Hm memory heads of size dh = d / Hm.

Usage (one sequence, three segments, the self-attention context kept throughout):
    model = LM2ForCausalLM(cfg).double()
    state = model.initial_state()
    for seg in segments:                      # seg: LongTensor [1, T]
        logits = model.forward_tokens(state, seg)
        model.end_segment(state)              # the memory write (eq. 4-6)
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LM2Config


# ---- backbone pieces --------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [..., head_dim] for positions [...] in the rotate-half convention: pair
    (i, i + D/2) rotates by angle pos * theta^(-2i/D)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64,
                                       device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # [..., D/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos/sin [B, 1, T, D] or [T, D]."""
    return x * cos + rotate_half(x) * sin


class SelfAttention(nn.Module):
    """Causal grouped-query attention with rotary embeddings and a KV cache."""

    def __init__(self, cfg: LM2Config):
        super().__init__()
        self.h, self.hkv, self.dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.theta = cfg.rope_theta
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.h * self.dh, bias=False)
        self.k_proj = nn.Linear(d, self.hkv * self.dh, bias=False)
        self.v_proj = nn.Linear(d, self.hkv * self.dh, bias=False)
        self.o_proj = nn.Linear(self.h * self.dh, d, bias=False)

    def forward(self, x: torch.Tensor, cache: "LayerState", positions: torch.Tensor,
                key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """positions [B, T]: rotary positions of the new tokens. key_valid [B, S] (cached +
        new), False at padding: a padding position is a key for no token but itself."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.dh).transpose(1, 2)    # [B, H, T, Dh]
        k = self.k_proj(x).view(B, T, self.hkv, self.dh).transpose(1, 2)  # [B, Hkv, T, Dh]
        v = self.v_proj(x).view(B, T, self.hkv, self.dh).transpose(1, 2)
        cos, sin = rope_cos_sin(positions[:, None, :], self.dh, self.theta, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache.k is not None:  # append to the context of earlier calls
            k = torch.cat([cache.k, k], dim=2)
            v = torch.cat([cache.v, v], dim=2)
        cache.k, cache.v = k, v
        S = k.shape[2]  # cached + new positions; query t sits at S - T + t
        rep = self.h // self.hkv  # query head h uses key-value head h // rep
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dh)  # [B, H, T, S]
        causal = (torch.arange(S, device=x.device)[None, :]
                  <= torch.arange(S - T, S, device=x.device)[:, None])
        allowed = causal[None, None]
        if key_valid is not None:  # padding is hidden from every other query
            own = torch.eye(T, dtype=torch.bool, device=x.device)
            own = torch.cat([torch.zeros(T, S - T, dtype=torch.bool, device=x.device), own], 1)
            allowed = allowed & (key_valid[:, None, None, :] | own[None, None])
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v  # [B, H, T, Dh]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.h * self.dh))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LM2Config):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---- the memory module (spec: "One block with memory", "Write at the end of a segment") --

class Memory(nn.Module):
    """One layer's memory: read by cross-attention, written through input/forget gates,
    output gate on the read. All seven projections are d x d (y = x W^T + b)."""

    def __init__(self, cfg: LM2Config):
        super().__init__()
        d = cfg.hidden_size
        self.n, self.hm, self.dh = cfg.memory_slots, cfg.memory_heads, cfg.memory_head_dim
        self.read_q = nn.Linear(d, d, bias=False)
        self.read_k = nn.Linear(d, d, bias=False)
        self.read_v = nn.Linear(d, d, bias=False)
        self.write_v = nn.Linear(d, d, bias=False)
        self.out_gate = nn.Linear(d, d, bias=True)
        self.in_gate = nn.Linear(d, d, bias=True)
        self.forget_gate = nn.Linear(d, d, bias=True)
        if cfg.memory_learned_init:
            self.init = nn.Parameter(identity_memory(self.n, d))
        else:
            self.register_parameter("init", None)

    def initial_bank(self, d: int) -> torch.Tensor:
        """M^0 [N, d]: the learned init tensor, or row i = e_{i mod d}."""
        if self.init is not None:
            return self.init
        w = self.read_k.weight
        return identity_memory(self.n, d).to(dtype=w.dtype, device=w.device)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, L, d] -> [B, Hm, L, dh]"""
        B, L, _ = t.shape
        return t.view(B, L, self.hm, self.dh).transpose(1, 2)

    def merge(self, t: torch.Tensor) -> torch.Tensor:
        """[B, Hm, L, dh] -> [B, L, d] (concat over heads)"""
        B, _, L, _ = t.shape
        return t.transpose(1, 2).reshape(B, L, self.hm * self.dh)

    def memory_kv(self, bank: torch.Tensor):
        """The per-segment memory K, V [B, Hm, N, dh] from the bank at the segment's start."""
        return self.heads(self.read_k(bank)), self.heads(self.read_v(bank))

    def read(self, x: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor):
        """Eq. 1-3 and the output gate. Returns (g_out * E_mem [B, T, d], A [B, Hm, T, N])."""
        q = self.heads(self.read_q(x))                                   # [B, Hm, T, dh]
        attn = torch.softmax(q @ mem_k.transpose(-1, -2) / math.sqrt(self.dh), dim=-1)
        e_mem = self.merge(attn @ mem_v)                                 # [B, T, d]
        return torch.sigmoid(self.out_gate(e_mem)) * e_mem, attn

    def offer(self, x: torch.Tensor) -> torch.Tensor:
        """C = x W_wv, split into heads [B, Hm, T, dh]: what each token offers to write."""
        return self.heads(self.write_v(x))

    def update(self, bank: torch.Tensor, mass: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        """Eq. 4-6 from the running sums mass = sum_t A [B, Hm, N] and acc = sum_t A^T C
        [B, Hm, N, dh]: U = acc / (mass + 1), M' = g_in * tanh(U) + g_fgt * M."""
        u = self.merge(acc / (mass[..., None] + 1.0))                    # [B, N, d]
        g_in = torch.sigmoid(self.in_gate(u))
        g_fgt = torch.sigmoid(self.forget_gate(u))
        return g_in * torch.tanh(u) + g_fgt * bank


def identity_memory(n: int, d: int) -> torch.Tensor:
    """M^0[i] = e_{i mod d}: [N, d] float32."""
    m = torch.zeros(n, d)
    m[torch.arange(n), torch.arange(n) % d] = 1.0
    return m


def write_update_batch(attn: torch.Tensor, offer: torch.Tensor,
                       mask: Optional[torch.Tensor] = None):
    """The batch formula of the write for one whole segment: attn A [B, Hm, T, N], offer C
    [B, Hm, T, dh], mask [B, T] (1 = token writes). Returns (mass [B, Hm, N],
    acc [B, Hm, N, dh]) = (sum_t A, A^T C), to be compared with the streamed sums."""
    if mask is not None:
        attn = attn * mask[:, None, :, None].to(attn.dtype)
    return attn.sum(dim=2), attn.transpose(-1, -2) @ offer


# ---- blocks and the whole model ---------------------------------------------------------

@dataclasses.dataclass
class LayerState:
    """Per-layer session state. Memory fields are None in layers without memory."""
    k: Optional[torch.Tensor] = None        # KV cache [B, Hkv, S, Dh]
    v: Optional[torch.Tensor] = None
    bank: Optional[torch.Tensor] = None     # M [B, N, d], fixed during a segment
    mem_k: Optional[torch.Tensor] = None    # memory K, V of the open segment [B, Hm, N, dh]
    mem_v: Optional[torch.Tensor] = None
    mass: Optional[torch.Tensor] = None     # running sum_t A       [B, Hm, N]
    acc: Optional[torch.Tensor] = None      # running sum_t A^T C   [B, Hm, N, dh]


@dataclasses.dataclass
class State:
    """Everything a session owns: per-layer KV cache and memory, the next position, the
    open segment's token count per sequence. The model's weights are not part of it."""
    layers: List[LayerState]
    pos: int = 0                                   # positions in the KV cache (padding included)
    segment_open: bool = False
    segment_tokens: Optional[torch.Tensor] = None  # [B] writing tokens in the open segment
    key_valid: Optional[torch.Tensor] = None       # [B, pos] False at padding; None: no padding
    next_position: Optional[torch.Tensor] = None   # [B] rotary position of the next real token

    def memory(self) -> List[Optional[torch.Tensor]]:
        """The bank of every layer ([B, N, d], None where the layer has no memory)."""
        return [ls.bank for ls in self.layers]


class Block(nn.Module):
    def __init__(self, cfg: LM2Config, layer: int):
        super().__init__()
        self.index = layer
        self.self_attn = SelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.memory = Memory(cfg) if cfg.layer_has_memory(layer) else None

    def forward(self, h: torch.Tensor, ls: LayerState, positions: torch.Tensor,
                token_mask: Optional[torch.Tensor], key_valid: Optional[torch.Tensor],
                trace: Optional[dict]) -> torch.Tensor:
        x = self.input_layernorm(h)
        a = self.self_attn(x, ls, positions, key_valid)
        if self.memory is None:
            h = h + a
        else:
            gated, attn = self.memory.read(x, ls.mem_k, ls.mem_v)
            h = h + a + gated                       # E_next = E_attn + E_gated
            c = self.memory.offer(x)
            w = attn if token_mask is None else attn * token_mask[:, None, :, None].to(attn.dtype)
            ls.mass = ls.mass + w.sum(dim=2)        # streamed: plain running sums
            ls.acc = ls.acc + w.transpose(-1, -2) @ c
            if trace is not None:
                trace.setdefault(self.index, []).append((attn, c))
        return h + self.mlp(self.post_attention_layernorm(h))


class LM2Backbone(nn.Module):
    def __init__(self, cfg: LM2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LM2ForCausalLM(nn.Module):
    """Parameter names are exactly the safetensors names of docs/lm2-spec.md."""

    def __init__(self, cfg: LM2Config):
        super().__init__()
        self.config = cfg
        self.model = LM2Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # ---- state ------------------------------------------------------------------------
    def initial_state(self, batch: int = 1) -> State:
        """Empty context, every memory bank at M^0."""
        d = self.config.hidden_size
        layers = []
        for block in self.model.layers:
            ls = LayerState()
            if block.memory is not None:
                m0 = block.memory.initial_bank(d)
                ls.bank = m0[None].expand(batch, -1, -1)
            layers.append(ls)
        return State(layers=layers)

    def reset_context(self, state: State) -> None:
        """Drop the KV cache and restart positions at 0; memory is untouched."""
        for ls in state.layers:
            ls.k = ls.v = None
        state.pos = 0
        state.key_valid = None
        state.next_position = None

    def begin_segment(self, state: State, batch: int) -> None:
        """Cache the memory K/V of the bank as it is now and zero the write sums."""
        for block, ls in zip(self.model.layers, state.layers):
            if block.memory is None:
                continue
            ls.mem_k, ls.mem_v = block.memory.memory_kv(ls.bank)
            ls.mass = ls.bank.new_zeros(batch, block.memory.hm, block.memory.n)
            ls.acc = ls.bank.new_zeros(batch, block.memory.hm, block.memory.n, block.memory.dh)
        state.segment_tokens = torch.zeros(batch, dtype=torch.long, device=self.device)
        state.segment_open = True

    def end_segment(self, state: State) -> None:
        """Apply the write (eq. 4-6) to every memory layer and close the segment. A sequence
        that had no writing tokens in this segment keeps its memory unchanged."""
        if not state.segment_open:
            return
        wrote = state.segment_tokens > 0  # [B]
        for block, ls in zip(self.model.layers, state.layers):
            if block.memory is None:
                continue
            if bool(wrote.any()):
                new = block.memory.update(ls.bank, ls.mass, ls.acc)
                ls.bank = torch.where(wrote[:, None, None], new, ls.bank)
            ls.mem_k = ls.mem_v = ls.mass = ls.acc = None
        state.segment_open = False
        state.segment_tokens = None

    # ---- forward ----------------------------------------------------------------------
    def forward_tokens(self, state: State, input_ids: torch.Tensor,
                       token_mask: Optional[torch.Tensor] = None,
                       trace: Optional[dict] = None) -> torch.Tensor:
        """Run `input_ids` [B, T] as the next tokens of the open segment (one is opened if
        none is) and return logits [B, T, V]. token_mask [B, T] (1 = real token, 0 = padding)
        marks padding, which must come after a sequence's real tokens in this call (right
        padding): padding writes nothing to memory and no later or earlier token attends to
        it, in this call or any later one (its outputs are meaningless). With a
        `trace` dict, each memory layer i appends (A [B, Hm, T, N], C [B, Hm, T, dh]) to
        trace[i], for tests of the write."""
        if input_ids.dim() != 2:
            raise ValueError("input_ids must be [batch, tokens]")
        B, T = input_ids.shape
        if not state.segment_open:
            self.begin_segment(state, B)
        if T == 0:
            return torch.zeros(B, 0, self.config.vocab_size, dtype=self.dtype, device=self.device)
        if state.pos + T > self.config.max_position_embeddings:
            raise ValueError(f"context of {state.pos + T} positions exceeds "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        if token_mask is not None or state.key_valid is not None:
            new = (torch.ones(B, T, dtype=torch.bool, device=self.device) if token_mask is None
                   else token_mask > 0)
            old = state.key_valid
            if old is None:
                old = torch.ones(B, state.pos, dtype=torch.bool, device=self.device)
            state.key_valid = torch.cat([old, new], dim=1)
        # Rotary positions count real tokens only, so padding leaves no gap in a sequence.
        start = (state.next_position if state.next_position is not None
                 else torch.full((B,), state.pos, dtype=torch.long, device=self.device))
        if token_mask is None:
            positions = start[:, None] + torch.arange(T, device=self.device)[None]
            state.next_position = start + T
        else:
            real = (token_mask > 0).long()
            positions = start[:, None] + torch.cumsum(real, dim=1) - real
            state.next_position = start + real.sum(dim=1)
        h = self.model.embed_tokens(input_ids)
        for block, ls in zip(self.model.layers, state.layers):
            h = block(h, ls, positions, token_mask, state.key_valid, trace)
        state.pos += T
        n_writing = (torch.full((B,), T, device=self.device) if token_mask is None
                     else (token_mask > 0).sum(dim=1))
        state.segment_tokens = state.segment_tokens + n_writing.long()
        h = self.model.norm(h)
        if self.lm_head is None:
            return h @ self.model.embed_tokens.weight.t()
        return self.lm_head(h)

    def run_segments(self, segments: Sequence[torch.Tensor], context: str = "keep",
                     state: Optional[State] = None):
        """Run whole segments ([B, T_k] each), writing memory at the end of each.
        context: "keep" (self-attention spans segments) or "reset" (empty KV cache and
        positions from 0 at every segment start). Returns (logits per segment,
        memory banks after each segment, the final state)."""
        if context not in ("keep", "reset"):
            raise ValueError("context must be 'keep' or 'reset'")
        state = state or self.initial_state(segments[0].shape[0] if segments else 1)
        logits, banks = [], []
        for seg in segments:
            if context == "reset":
                self.reset_context(state)
            logits.append(self.forward_tokens(state, seg))
            self.end_segment(state)
            banks.append(state.memory())
        return logits, banks, state

    def split_segments(self, input_ids: torch.Tensor) -> List[torch.Tensor]:
        """Split a long input [B, T] every memory_segment_tokens tokens (whole input as one
        segment when that is 0)."""
        s = self.config.memory_segment_tokens
        if s <= 0:
            return [input_ids]
        return list(input_ids.split(s, dim=1))
