"""The committed test models and golden files are what tools/regen-test-data produces."""

import filecmp
import os

import pytest
import torch

from lm2ref import safetensors_io as st
from lm2ref import testdata
from lm2ref.model_dir import load_model_dir
from lm2ref.tokenizer import load_processor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "data")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("testdata"))
    testdata.main(["--out", out])
    return out


def test_regenerated_models_equal_committed(regenerated):
    for name in testdata.TEST_MODELS:
        for f in ("config.json", "model.safetensors", "tokenizer.model", "chat_template.json"):
            a = os.path.join(DATA, "models", name, f)
            b = os.path.join(regenerated, "models", name, f)
            assert filecmp.cmp(a, b, shallow=False), f"{name}/{f} differs from a regeneration"


def test_regenerated_goldens_equal_committed(regenerated):
    for name in testdata.TEST_MODELS:
        for case, lengths, context in testdata.GOLDEN_CASES:
            rel = os.path.join("golden", name, case + ".safetensors")
            committed, meta = st.load_file(os.path.join(DATA, rel))
            fresh, meta2 = st.load_file(os.path.join(regenerated, rel))
            assert meta == meta2 == {"format": testdata.GOLDEN_FORMAT, "model": name,
                                     "case": case, "context": context}
            assert set(committed) == set(fresh)
            assert committed["segment_lengths"].tolist() == lengths
            for k, t in committed.items():
                if t.is_floating_point():
                    # float64 on another CPU or BLAS may differ in the last bits only.
                    err = float((fresh[k] - t).norm() / max(float(t.norm()), 1e-300))
                    assert err < 1e-10, f"{rel}:{k} rel err {err}"
                else:
                    assert torch.equal(fresh[k], t), f"{rel}:{k}"


def test_goldens_cover_every_memory_layer_and_segment():
    for name in testdata.TEST_MODELS:
        cfg = testdata.model_config(name)
        for case, lengths, _ in testdata.GOLDEN_CASES:
            g, _ = st.load_file(os.path.join(DATA, "golden", name, case + ".safetensors"))
            assert g["logits"].dtype == torch.float64
            assert g["logits"].shape == (sum(lengths), cfg.vocab_size)
            keys = {k for k in g if k.startswith("memory.")}
            assert keys == {f"memory.{k}.{l}" for k in range(len(lengths))
                            for l in cfg.memory_layers}
            for k, n in enumerate(lengths):
                if n == 0 and k > 0:  # an empty segment leaves every bank as it was
                    for l in cfg.memory_layers:
                        assert torch.equal(g[f"memory.{k}.{l}"], g[f"memory.{k - 1}.{l}"])


def test_goldens_are_float64_results_of_the_committed_models():
    """Recompute one case directly; float32 must be within the CPU tolerance of it."""
    model = load_model_dir(os.path.join(DATA, "models", "tiny-lm2"), dtype=torch.float32)
    case, lengths, context = testdata.GOLDEN_CASES[0]
    g, _ = st.load_file(os.path.join(DATA, "golden", "tiny-lm2", case + ".safetensors"))
    got = testdata.compute_golden(model, lengths, context, seed=77)
    err = float((got["logits"] - g["logits"]).norm() / g["logits"].norm())
    assert 0 < err < 1e-4  # float32 is close to, and not bit-equal to, the float64 goldens


def test_tokenizer_has_the_fixed_control_ids():
    sp = load_processor(os.path.join(DATA, "models", "tiny-lm2", "tokenizer.model"))
    assert sp.GetPieceSize() == testdata.VOCAB
    assert [sp.IdToPiece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert sp.PieceToId("<|user|>") == 4
    text = "Mary went to the kitchen. Zürich ✓"
    assert sp.DecodeIds(sp.EncodeAsIds(text)) == text


def test_chat_template_file_and_rendering():
    """The committed chat_template.json is lm2ref's; the rendered ids are the ones the C++
    tokenizer test (tests/runtime/tokenizer_test.cc) expects."""
    import json
    from lm2ref import tokenizer as tok
    for name in testdata.TEST_MODELS:
        with open(os.path.join(DATA, "models", name, "chat_template.json"), encoding="utf-8") as f:
            assert json.load(f) == tok.CHAT_TEMPLATE
    sp = load_processor(os.path.join(DATA, "models", "tiny-lm2", "tokenizer.model"))
    first = tok.render_user_turn(sp, "How are you today?", first_turn=True)
    assert first == [1, 4, 446, 447, 322, 448, 477, 6, 5]
    assert tok.render_user_turn(sp, "How are you today?", first_turn=False) == first[1:]
