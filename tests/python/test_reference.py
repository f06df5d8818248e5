"""Self-checks of the reference model (tools/lm2ref/model.py) against the contract."""

import math

import pytest
import torch
import torch.nn.functional as F

from lm2ref.config import ConfigError, LM2Config
from lm2ref.model import LM2ForCausalLM, write_update_batch
from lm2ref.model_dir import expected_tensors
from lm2ref.testdata import random_weights, model_config


def make_model(name="tiny-lm2", dtype=torch.float64, seed=5, **overrides):
    cfg = model_config(name)
    if overrides:
        cfg = LM2Config(**{**cfg.__dict__, **overrides})
    model = LM2ForCausalLM(cfg)
    model.load_state_dict(random_weights(cfg, seed), strict=True)
    return model.to(dtype).eval()


def tokens(n, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (1, n), generator=g)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_streaming_write_equals_batch_formula():
    model = make_model()
    seg = tokens(13)
    # Token at a time: the write sums are streamed one token per call.
    trace = {}
    state = model.initial_state()
    for t in range(seg.shape[1]):
        model.forward_tokens(state, seg[:, t:t + 1], trace=trace)
    for i, ls in enumerate(state.layers):
        attn = torch.cat([a for a, _ in trace[i]], dim=2)   # [1, Hm, T, N]
        offer = torch.cat([c for _, c in trace[i]], dim=2)  # [1, Hm, T, dh]
        assert attn.shape[2] == 13
        mass, acc = write_update_batch(attn, offer)
        assert rel_err(ls.mass, mass) < 1e-12
        assert rel_err(ls.acc, acc) < 1e-12
        # The sums are not trivial: every slot received some attention.
        assert float(mass.min()) > 0
    model.end_segment(state)
    # The whole segment at once gives the same bank.
    state2 = model.initial_state()
    model.forward_tokens(state2, seg)
    model.end_segment(state2)
    for a, b in zip(state.memory(), state2.memory()):
        assert rel_err(a, b) < 1e-12


@torch.no_grad()
def test_write_changes_memory_and_masked_tokens_do_not_write():
    model = make_model()
    seg = tokens(10)
    state = model.initial_state()
    m0 = [b.clone() for b in state.memory()]
    model.forward_tokens(state, seg)
    model.end_segment(state)
    for a, b in zip(state.memory(), m0):
        assert rel_err(a, b) > 1e-3  # the write moved every bank
    # Right padding: a padded sequence in a batch writes exactly what it writes alone.
    pair = torch.cat([torch.cat([seg[:, :6], torch.full((1, 4), 3)], dim=1), seg], dim=0)
    mask = torch.ones(2, 10)
    mask[0, 6:] = 0
    s_batch = model.initial_state(batch=2)
    logits_b = model.forward_tokens(s_batch, pair, token_mask=mask)
    model.end_segment(s_batch)
    s_alone = model.initial_state()
    logits_a = model.forward_tokens(s_alone, seg[:, :6])
    model.end_segment(s_alone)
    assert rel_err(logits_b[0, :6], logits_a[0]) < 1e-12
    for a, b in zip(s_batch.memory(), s_alone.memory()):
        assert rel_err(a[0], b[0]) < 1e-12


@torch.no_grad()
def test_empty_segment_leaves_memory_unchanged():
    model = make_model()
    state = model.initial_state()
    model.forward_tokens(state, tokens(7))
    model.end_segment(state)
    before = [b.clone() for b in state.memory()]
    # A segment with no tokens at all.
    out = model.forward_tokens(state, tokens(0))
    assert out.shape == (1, 0, model.config.vocab_size)
    model.end_segment(state)
    for a, b in zip(state.memory(), before):
        assert torch.equal(a, b)
    # A batch where one sequence has only padding in this segment: that one keeps its bank
    # (the gates alone would otherwise decay it), the other is written.
    state = model.initial_state(batch=2)
    before = [b.clone() for b in state.memory()]
    mask = torch.tensor([[1.0] * 5, [0.0] * 5])
    model.forward_tokens(state, torch.cat([tokens(5), tokens(5, seed=3)]), token_mask=mask)
    model.end_segment(state)
    for a, b in zip(state.memory(), before):
        assert torch.equal(a[1], b[1])
        assert not torch.equal(a[0], b[0])


@torch.no_grad()
def test_memory_read_has_set_semantics_over_slots():
    """Permuting the slots of the bank and its init permutes the banks and nothing else."""
    model = make_model("tiny-partial")
    segs = [tokens(6, seed=1), tokens(9, seed=2), tokens(4, seed=3)]
    logits, banks, _ = model.run_segments(segs, context="reset")
    perm = torch.randperm(model.config.memory_slots, generator=torch.Generator().manual_seed(4))
    mem = model.model.layers[1].memory
    mem.init.data = mem.init.data[perm]
    logits_p, banks_p, _ = model.run_segments(segs, context="reset")
    for a, b in zip(logits, logits_p):
        assert rel_err(b, a) < 1e-12
    for k in range(len(segs)):
        assert rel_err(banks_p[k][1], banks[k][1][:, perm]) < 1e-12
    # And the memory matters: a different (not permuted) init changes the logits.
    mem.init.data = mem.init.data + 0.5
    logits_x, _, _ = model.run_segments(segs, context="reset")
    assert rel_err(logits_x[0], logits[0]) > 1e-3


def plain_llama_logits(w, cfg, ids):
    """An independent, functional Llama forward from a weight dict (no KV cache, no memory)."""
    d, H, Hkv, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    T = ids.shape[0]

    def norm(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps) * g

    pos = torch.arange(T, dtype=torch.float64)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = pos[:, None] * inv[None]
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rope(x):  # x [heads, T, D]: pairs (i, i + D/2)
        a, b = x[..., :D // 2], x[..., D // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    h = w["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = norm(h, w[p + "input_layernorm.weight"])
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(T, H, D).transpose(0, 1)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(T, Hkv, D).transpose(0, 1)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(T, Hkv, D).transpose(0, 1)
        q, k = rope(q), rope(k)
        heads = []
        for hh in range(H):
            kv = hh // (H // Hkv)
            s = q[hh] @ k[kv].T / math.sqrt(D)
            s = s + torch.triu(torch.full((T, T), float("-inf"), dtype=s.dtype), 1)
            heads.append(torch.softmax(s, -1) @ v[kv])
        h = h + torch.cat(heads, -1) @ w[p + "self_attn.o_proj.weight"].T
        x = norm(h, w[p + "post_attention_layernorm.weight"])
        g = F.silu(x @ w[p + "mlp.gate_proj.weight"].T) * (x @ w[p + "mlp.up_proj.weight"].T)
        h = h + g @ w[p + "mlp.down_proj.weight"].T
    h = norm(h, w["model.norm.weight"])
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return h @ head.T


@torch.no_grad()
def test_vanilla_config_equals_plain_llama():
    model = make_model("tiny-vanilla")
    assert not model.config.has_memory
    w = {k: v for k, v in model.state_dict().items()}
    ids = tokens(21)
    ref = plain_llama_logits(w, model.config, ids[0])
    # Whole sequence at once, and in segments with the context kept: same logits.
    state = model.initial_state()
    out = model.forward_tokens(state, ids)[0]
    assert rel_err(out, ref) < 1e-12
    logits, _, _ = model.run_segments(list(ids.split([8, 5, 8], dim=1)), context="keep")
    assert rel_err(torch.cat(logits, 1)[0], ref) < 1e-12


@torch.no_grad()
def test_token_at_a_time_decode_equals_prefill():
    for name in ("tiny-lm2", "tiny-partial", "tiny-vanilla"):
        model = make_model(name)
        ids = tokens(12, seed=7)
        full = model.forward_tokens(model.initial_state(), ids)
        state = model.initial_state()
        steps = torch.cat([model.forward_tokens(state, ids[:, t:t + 1]) for t in range(12)], 1)
        assert rel_err(steps, full) < 1e-12, name


@torch.no_grad()
def test_memory_carries_information_across_a_reset_context():
    """With the context reset, segment 2's logits depend on segment 1 through memory only."""
    model = make_model()
    seg2 = tokens(6, seed=11)
    a, _, _ = model.run_segments([tokens(8, seed=1), seg2], context="reset")
    b, _, _ = model.run_segments([tokens(8, seed=2), seg2], context="reset")
    assert rel_err(a[1], b[1]) > 1e-4
    vanilla = make_model("tiny-vanilla")
    a, _, _ = vanilla.run_segments([tokens(8, seed=1), seg2], context="reset")
    b, _, _ = vanilla.run_segments([tokens(8, seed=2), seg2], context="reset")
    assert torch.equal(a[1], b[1])


def test_autograd_flows_through_segments():
    """A loss on segment 2 alone (context reset) trains the write of segment 1."""
    model = make_model(dtype=torch.float32)
    model.train()
    logits, _, _ = model.run_segments([tokens(8, seed=1), tokens(6, seed=2)], context="reset")
    loss = F.cross_entropy(logits[1][0], tokens(6, seed=3)[0])
    loss.backward()
    for i in range(model.config.num_hidden_layers):
        mem = model.model.layers[i].memory
        for p in (mem.write_v.weight, mem.in_gate.weight, mem.forget_gate.bias, mem.read_k.weight):
            assert p.grad is not None and float(p.grad.abs().max()) > 0


@torch.no_grad()
def test_float32_tracks_float64():
    m64 = make_model(dtype=torch.float64)
    m32 = make_model(dtype=torch.float32)
    segs = [tokens(9, seed=1), tokens(7, seed=2), tokens(5, seed=3)]
    l64, b64, _ = m64.run_segments(segs)
    l32, b32, _ = m32.run_segments([s.clone() for s in segs])
    for a, b in zip(l32, l64):
        assert rel_err(a.double(), b) < 1e-5
    for a, b in zip(b32[-1], b64[-1]):
        assert rel_err(a.double(), b) < 1e-5


def test_expected_tensors_match_the_module_and_paper_counts():
    for name in ("tiny-lm2", "tiny-partial", "tiny-vanilla"):
        cfg = model_config(name)
        module = sorted((k, tuple(v.shape)) for k, v in LM2ForCausalLM(cfg).state_dict().items())
        assert expected_tensors(cfg) == module
    # The paper configuration: 7d^2 + 3d per memory layer; backbone ~1.2 B, memory ~0.47 B.
    paper = LM2Config(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      tie_word_embeddings=True, memory_slots=2048, memory_heads=32)
    counts = {n: math.prod(s) for n, s in expected_tensors(paper)}
    memory = sum(c for n, c in counts.items() if ".memory." in n)
    backbone = sum(counts.values()) - memory
    assert memory == 16 * (7 * 2048 ** 2 + 3 * 2048)
    assert 0.46e9 < memory < 0.48e9
    assert 1.1e9 < backbone < 1.3e9


@pytest.mark.parametrize("bad", [
    dict(hidden_size=63),                       # not divisible by heads
    dict(num_key_value_heads=3),                # heads not a multiple of kv heads
    dict(memory_heads=5),                       # d not divisible by memory heads
    dict(memory_layers=[0, 7]),                 # layer out of range
    dict(memory_layers=[1, 0]),                 # unsorted
    dict(vocab_size=0),
])
def test_impossible_configs_are_rejected(bad):
    base = dict(model_config("tiny-lm2").__dict__)
    base.pop("head_dim")
    base.update(bad)
    with pytest.raises(ConfigError):
        LM2Config(**base)


def test_config_json_round_trip_and_unknown_architecture():
    for name in ("tiny-lm2", "tiny-partial", "tiny-vanilla"):
        cfg = model_config(name)
        assert LM2Config.from_dict(cfg.to_dict()) == cfg
    d = model_config("tiny-lm2").to_dict()
    d["architectures"] = ["GPT2LMHeadModel"]
    with pytest.raises(ConfigError):
        LM2Config.from_dict(d)
    d = model_config("tiny-lm2").to_dict()
    d["rope_scaling"] = {"rope_type": "llama3"}
    with pytest.raises(ConfigError):
        LM2Config.from_dict(d)


@torch.no_grad()
def test_context_limit_is_enforced():
    model = make_model()
    state = model.initial_state()
    with pytest.raises(ValueError):
        model.forward_tokens(state, tokens(model.config.max_position_embeddings + 1))


@torch.no_grad()
def test_padding_is_invisible_to_later_segments_with_the_context_kept():
    """Right padding inside a segment neither writes nor is attended to later: a padded
    sequence in a batch gives what it gives alone, across segments with the context kept."""
    model = make_model()
    a1, a2 = tokens(5, seed=1), tokens(4, seed=2)
    b1, b2 = tokens(8, seed=3), tokens(6, seed=4)
    pad = lambda t, n: torch.cat([t, torch.full((1, n - t.shape[1]), 3)], dim=1)
    batch = model.initial_state(batch=2)
    m1 = torch.tensor([[1.0] * 5 + [0.0] * 3, [1.0] * 8])
    model.forward_tokens(batch, torch.cat([pad(a1, 8), b1]), token_mask=m1)
    model.end_segment(batch)
    m2 = torch.tensor([[1.0] * 4 + [0.0] * 2, [1.0] * 6])
    out = model.forward_tokens(batch, torch.cat([pad(a2, 6), b2]), token_mask=m2)
    model.end_segment(batch)
    alone, _, s_alone = model.run_segments([a1, a2], context="keep")
    assert rel_err(out[0, :4], alone[1][0]) < 1e-12
    for x, y in zip(batch.memory(), s_alone.memory()):
        assert rel_err(x[0], y[0]) < 1e-12
    other, _, _ = model.run_segments([b1, b2], context="keep")
    assert rel_err(out[1], other[1][0]) < 1e-12
