"""The SDK's memory after turns, rollback, fork, clear and forget-turn equals what the
float64 reference (lm2ref) computes for the equivalent segments (rel. 1e-4)."""
import numpy as np
import torch

from sdk_helpers import TINY, import_lm2, open_engine

lm2 = import_lm2()

from lm2ref.model_dir import load_model_dir  # noqa: E402

MESSAGES = ["Mary went to the kitchen.", "John picked up the apple.", "Where is Mary?"]


class Reference:
    def __init__(self):
        self.model = load_model_dir(TINY, dtype=torch.float64)
        self.model.eval()

    def fold(self, turns, start=None, clears=()):
        """Memory after running each turn (token ids) as one segment in an empty context.
        `clears`: {position: (layers, slots)} applied after that many turns."""
        state = self.model.initial_state(1)
        if start is not None:
            for i, ls in enumerate(state.layers):
                if ls.bank is not None:
                    ls.bank = torch.tensor(start[i], dtype=torch.float64)[None]
        with torch.no_grad():
            for k, ids in enumerate(turns):
                self.model.reset_context(state)
                self.model.forward_tokens(state, torch.tensor([ids], dtype=torch.long))
                self.model.end_segment(state)
        return {i: b[0].numpy() for i, b in enumerate(state.memory()) if b is not None}


def close(sdk, ref):
    for layer, want in ref.items():
        got = sdk[layer].astype(np.float64)
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel <= 1e-4, (layer, rel)


def ids(s, v):
    t = s.turn(v)
    return t["prompt_ids"] + t["reply_ids"]


def test_turns_rollback_fork_forget_clear_match_the_reference(tmp_path):
    ref = Reference()
    e = open_engine(lm2, tmp_path)
    s = e.session("t", "s")
    for m in MESSAGES:
        s.chat(m, max_tokens=10)
    t1, t2, t3 = ids(s, 1), ids(s, 2), ids(s, 3)
    close(s.memory(), ref.fold([t1, t2, t3]))

    s.rollback(2)
    close(s.memory(), ref.fold([t1, t2]))
    f = s.fork(1, "branch")
    close(f.memory(), ref.fold([t1]))

    s.rollback(3)
    s.forget(2)  # turns 1 and 3
    close(s.memory(), ref.fold([t1, t3]))
    s.forget(1)  # turn 3 alone, from the initial memory
    close(s.memory(), ref.fold([t3]))

    s.clear(layers=[0, 2], slots=[1, 4])
    want = ref.fold([t3])
    init = ref.fold([])
    for layer in (0, 2):
        want[layer][[1, 4]] = init[layer][[1, 4]]
    close(s.memory(), want)

    # A forget replays a clear that came after the forgotten turn.
    s.chat("The cat sleeps.", max_tokens=10)
    t_last = ids(s, s.head_version)
    s.forget(3)
    want = ref.fold([])
    for layer in (0, 2):
        want[layer][[1, 4]] = init[layer][[1, 4]]
    close(s.memory(), ref.fold([t_last], start=[want.get(i) for i in range(3)]))


def test_next_token_logits_match_the_reference(tmp_path):
    ref = Reference()
    e = open_engine(lm2, tmp_path)
    s = e.session("t", "s")
    s.chat(MESSAGES[0], max_tokens=10)
    t1 = ids(s, 1)
    logits = s.next_token_logits(MESSAGES[2]).astype(np.float64)
    state = ref.model.initial_state(1)
    with torch.no_grad():
        ref.model.forward_tokens(state, torch.tensor([t1], dtype=torch.long))
        ref.model.end_segment(state)
        ref.model.reset_context(state)
        prompt = s.turn(1)["prompt_ids"]  # a second-turn prompt has no BOS: build it from turn 2's
        s.chat(MESSAGES[2], max_tokens=2)
        p2 = s.turn(2)["prompt_ids"]
        out = ref.model.forward_tokens(state, torch.tensor([p2], dtype=torch.long))[0, -1].numpy()
    assert prompt[0] == 1 and p2[0] != 1
    rel = np.abs(logits - out).max() / np.abs(out).max()
    assert rel <= 1e-4, rel
