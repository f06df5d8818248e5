"""The Python binding: chat (string, stream, callback), history and control, errors."""
import os
import stat

import pytest

from sdk_helpers import ROOT, import_lm2, open_engine

lm2 = import_lm2()


def test_chat_returns_the_reply_and_commits_a_version(tmp_path):
    e = open_engine(lm2, tmp_path)
    s = e.session("alice", "main")
    assert s.head_version == 0
    pieces = []
    text = s.chat("Mary went to the kitchen.", max_tokens=8, on_token=pieces.append)
    assert isinstance(text, str)
    assert "".join(pieces) == text
    assert s.head_version == 1 and s.turn_count == 1
    r = s.last_result
    assert r["version"] == 1 and r["reply_tokens"] >= 1
    assert sorted(r["slot_writes"]) == [0, 1, 2] and len(r["slot_writes"][0]) == 16
    h = s.history()
    assert [v["kind"] for v in h] == ["turn"] and h[0]["preview"] == "Mary went to the kitchen."
    assert s.turn(1)["user_text"] == "Mary went to the kitchen."
    assert e.list_sessions("alice") == ["main"]
    assert oct(stat.S_IMODE(os.stat(tmp_path / "master.key").st_mode)) == "0o600"


def test_streaming_yields_the_same_text_as_a_plain_chat(tmp_path):
    e = open_engine(lm2, tmp_path)
    a, b = e.session("t", "a"), e.session("t", "b")
    plain = a.chat("Mary went to the kitchen.", max_tokens=12)
    pieces = list(b.chat("Mary went to the kitchen.", max_tokens=12, stream=True))
    assert "".join(pieces) == plain
    assert b.head_version == 1
    assert b.last_result["text"] == plain


def test_closing_a_stream_early_cancels_the_turn(tmp_path):
    e = open_engine(lm2, tmp_path)
    s = e.session("t", "s")
    s.chat("Mary went to the kitchen.", max_tokens=4)
    before = s.memory()
    it = s.chat("Where is Mary?", max_tokens=64, stream=True)
    next(it, None)
    it.close()
    assert s.head_version == 1
    after = s.memory()
    assert all((before[k] == after[k]).all() for k in before)
    assert s.chat("Where is Mary?", max_tokens=4) is not None  # usable again
    assert s.head_version == 2


def test_a_callback_exception_cancels_and_propagates(tmp_path):
    e = open_engine(lm2, tmp_path)
    s = e.session("t", "s")

    def boom(_):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        s.chat("Mary went to the kitchen.", max_tokens=32, on_token=boom)
    assert s.head_version == 0


def test_history_rollback_fork_clear_forget_erase(tmp_path):
    e = open_engine(lm2, tmp_path)
    s = e.session("t", "s")
    for m in ["Mary went to the kitchen.", "John picked up the apple.", "Where is Mary?"]:
        s.chat(m, max_tokens=6)
    m1 = None
    s.rollback(1)
    assert s.head_version == 1 and s.turn_count == 1
    m1 = s.memory()
    f = s.fork(1, "branch")
    assert f.head_version == 1 and f.id == "branch"
    assert all((f.memory()[k] == m1[k]).all() for k in m1)
    s.chat("The cat sleeps.", max_tokens=6)  # v4, parent 1
    s.clear(layers=[1], slots=[2, 5])
    s.forget(1)
    kinds = [v["kind"] for v in s.history()]
    assert kinds == ["turn", "turn", "turn", "turn", "clear", "forget"]
    norms = s.slot_norms()
    assert sorted(norms) == [0, 1, 2]
    assert len(s.slot_writes(4)[0]) == 16
    s.clear()
    assert all(abs(x - 1.0) < 1e-6 for layer in s.slot_norms().values() for x in layer)
    s.erase()
    with pytest.raises(lm2.Error) as err:
        s.history()
    assert err.value.code == lm2.NOT_FOUND
    e.erase_tenant("t")
    assert e.list_sessions("t") == []


def test_errors_carry_the_status_code(tmp_path):
    e = open_engine(lm2, tmp_path)
    with pytest.raises(lm2.Error) as err:
        e.session("t", "unknown", create=False)
    assert err.value.code == lm2.NOT_FOUND and err.value.name == "NotFound"
    s = e.session("t", "s")
    s.chat("Mary went to the kitchen.", max_tokens=4)
    for bad, code in [("", lm2.INVALID_ARGUMENT), ("x" * 70000, lm2.INVALID_ARGUMENT),
                      ("kitchen " * 150, lm2.OUT_OF_RANGE)]:
        with pytest.raises(lm2.Error) as err:
            s.chat(bad, max_tokens=4)
        assert err.value.code == code, str(err.value)
    assert s.head_version == 1 and len(s.history()) == 1
    with pytest.raises(lm2.Error) as err:
        s.rollback(42)
    assert err.value.code == lm2.NOT_FOUND
    with pytest.raises(lm2.Error) as err:
        s.forget(42)
    assert err.value.code == lm2.NOT_FOUND
    with pytest.raises(lm2.Error) as err:
        lm2.Engine(os.path.join(ROOT, "tests/data/models/tiny-lm2"), str(tmp_path / "other"),
                   key_file=str(tmp_path / "no-such-key"))
    assert err.value.code == lm2.PERMISSION_DENIED
    # backend="cuda": the GPU when one is usable, else Unavailable (never a silent CPU).
    try:
        gpu = lm2.Engine(os.path.join(ROOT, "tests/data/models/tiny-lm2"), str(tmp_path / "other"),
                         key_file=str(tmp_path / "master.key"), backend="cuda")
    except lm2.Error as e:
        assert e.code == lm2.UNAVAILABLE, str(e)
    else:
        assert gpu.model_info["backend"] == "cuda:0"


def test_two_handles_conflict_then_reload_and_retry(tmp_path):
    e = open_engine(lm2, tmp_path)
    a, b = e.session("t", "s"), e.session("t", "s")
    a.chat("from a", max_tokens=4)
    with pytest.raises(lm2.Error) as err:
        b.chat("from b", max_tokens=4)
    assert err.value.code == lm2.CONFLICT
    b.reload()
    b.chat("from b", max_tokens=4)
    assert [v["parent_version"] for v in b.history()] == [0, 1]


def test_wrong_model_and_wrong_key(tmp_path):
    e = open_engine(lm2, tmp_path)
    s = e.session("t", "s")
    s.chat("Mary went to the kitchen.", max_tokens=4)
    kept = s.memory()
    del s, e
    other = open_engine(lm2, tmp_path, model_dir=os.path.join(ROOT, "tests/data/models/tiny-partial"))
    with pytest.raises(lm2.Error) as err:
        other.session("t", "s")
    assert err.value.code == lm2.FAILED_PRECONDITION
    del other
    wrong_key = tmp_path / "wrong.key"
    lm2.create_key_file(str(wrong_key))
    w = lm2.Engine(os.path.join(ROOT, "tests/data/models/tiny-lm2"), str(tmp_path / "store"),
                   key_file=str(wrong_key), key_env="")
    with pytest.raises(lm2.Error) as err:
        w.session("t", "s")
    assert err.value.code == lm2.PERMISSION_DENIED
    del w
    s = open_engine(lm2, tmp_path).session("t", "s")
    assert all((s.memory()[k] == kept[k]).all() for k in kept)


def test_a_cap_on_resident_sessions_evicts_idle_ones_and_changes_no_reply(tmp_path):
    (tmp_path / "capped").mkdir()
    (tmp_path / "free").mkdir()
    capped = open_engine(lm2, tmp_path / "capped", max_resident_sessions=1)
    free = open_engine(lm2, tmp_path / "free")
    unbatched = {"decode_batches": 0, "decode_steps": 0, "largest_decode_batch": 0}  # the CPU backend
    assert free.stats() == {"resident_sessions": 0, "evictions": 0, **unbatched}
    pairs = [(capped.session("t", n), free.session("t", n)) for n in ("a", "b")]
    assert capped.stats()["resident_sessions"] == 0  # opening builds no state
    for m in ["Mary went to the kitchen.", "Where is Mary?"]:
        for c, f in pairs:
            assert c.chat(m, max_tokens=6) == f.chat(m, max_tokens=6)
            assert capped.stats()["resident_sessions"] <= 1
    assert capped.stats()["evictions"] > 0
    assert free.stats() == {"resident_sessions": 2, "evictions": 0, **unbatched}
    for c, f in pairs:
        mc, mf = c.memory(), f.memory()
        assert all((mc[k] == mf[k]).all() for k in mf)
