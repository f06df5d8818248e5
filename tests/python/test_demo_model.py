"""The shipped demo model (models/lm2-demo) remembers through its memory bank.

A fact is told in turn 1, the question asked in turn 2 with the self-attention context
emptied in between, so only the memory bank can carry the fact. With memory kept the
model must answer most questions right; with the bank reset to its initial value before
turn 2 it must fall to about guessing. If the memory read or write stops working (in the
reference, the weights or the loader), the first check fails; if answers leaked through
anything but memory, the second one would.
"""

import os

import pytest
import torch

from lm2ref.model_dir import load_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "lm2-demo")
BOS, USER, ASSISTANT, END = 1, 4, 5, 6

# (fact told in turn 1, question in turn 2, expected reply): 24 facts of three kinds,
# names, places, objects and times spread over the domain.
FACTS = [
    ("Mary went to the kitchen.", "Where is Mary?", "In the kitchen."),
    ("John moved to the garden.", "Where is John?", "In the garden."),
    ("Sandra travelled to the office.", "Where is Sandra?", "In the office."),
    ("Daniel journeyed to the hallway.", "Where is Daniel?", "In the hallway."),
    ("Alice walked to the bedroom.", "Where is Alice?", "In the bedroom."),
    ("Bob ran to the bathroom.", "Where is Bob?", "In the bathroom."),
    ("Fred went to the park.", "Where is Fred?", "In the park."),
    ("Julie moved to the school.", "Where is Julie?", "In the school."),
    ("Bill went to the library.", "Where is Bill?", "In the library."),
    ("Emma travelled to the station.", "Where is Emma?", "In the station."),
    ("Mary picked up the apple.", "Who has the apple?", "Mary."),
    ("John took the football.", "Who has the football?", "John."),
    ("Sandra grabbed the milk.", "Who has the milk?", "Sandra."),
    ("Daniel got the book.", "Who has the book?", "Daniel."),
    ("Alice picked up the key.", "Who has the key?", "Alice."),
    ("Bob took the umbrella.", "Who has the umbrella?", "Bob."),
    ("Fred grabbed the phone.", "Who has the phone?", "Fred."),
    ("Julie got the camera.", "Who has the camera?", "Julie."),
    ("Mary's meeting is at 3 o'clock.", "When is Mary's meeting?", "At 3 o'clock."),
    ("John's party is at 8 o'clock.", "When is John's party?", "At 8 o'clock."),
    ("Emma's lesson is at 11 o'clock.", "When is Emma's lesson?", "At 11 o'clock."),
    ("Bill's dinner is at 7 o'clock.", "When is Bill's dinner?", "At 7 o'clock."),
    ("Alice's meeting is at 5 o'clock.", "When is Alice's meeting?", "At 5 o'clock."),
    ("Fred's party is at 10 o'clock.", "When is Fred's party?", "At 10 o'clock."),
]


@pytest.fixture(scope="module")
def demo():
    if not os.path.exists(os.path.join(MODEL, "config.json")):
        pytest.skip("models/lm2-demo is not present")
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor()
    assert sp.Load(os.path.join(MODEL, "tokenizer.model"))
    torch.manual_seed(0)
    return load_model_dir(MODEL, dtype=torch.float32), sp


def turn_ids(sp, user, reply, first):
    """The chat format of models/lm2-demo/README.md: [BOS] <|user|> message <|end|>
    <|assistant|> reply <|end|>; returns (ids, index of <|assistant|>)."""
    head = ([BOS] if first else []) + [USER] + sp.EncodeAsIds(user) + [END, ASSISTANT]
    return head + sp.EncodeAsIds(reply) + [END], len(head) - 1


def answers_right(model, sp, clear_memory):
    """Per fact: does the model produce exactly the expected reply (argmax at every reply
    position, the closing <|end|> included) in turn 2, context reset between turns?"""
    hits = []
    with torch.no_grad():
        for fact, question, reply in FACTS:
            state = model.initial_state(1)
            ids1, _ = turn_ids(sp, fact, "OK.", first=True)
            model.forward_tokens(state, torch.tensor([ids1]))
            model.end_segment(state)                      # turn 1 written to memory
            model.reset_context(state)                    # turn 2 cannot attend to turn 1
            if clear_memory:
                fresh = model.initial_state(1)
                for ls, ls0 in zip(state.layers, fresh.layers):
                    ls.bank = ls0.bank
            ids2, a = turn_ids(sp, question, reply, first=False)
            logits = model.forward_tokens(state, torch.tensor([ids2]))[0]
            pred = logits[a:len(ids2) - 1].argmax(-1).tolist()
            hits.append(pred == ids2[a + 1:])
    return hits


def test_memory_carries_a_fact_to_the_next_turn(demo):
    model, sp = demo
    hits = answers_right(model, sp, clear_memory=False)
    missed = [f[0] for f, h in zip(FACTS, hits) if not h]
    assert sum(hits) >= 20, f"{sum(hits)}/{len(FACTS)} recalled; missed: {missed}"


def test_cleared_memory_forgets(demo):
    model, sp = demo
    hits = answers_right(model, sp, clear_memory=True)
    # guessing a place, a person or a time gets about 1 in 8 to 1 in 12 right
    assert sum(hits) <= 4, f"{sum(hits)}/{len(FACTS)} answered without memory"


def test_vocabulary_covers_the_chat_format(demo):
    _, sp = demo
    assert [sp.IdToPiece(i) for i in (USER, ASSISTANT, END)] == ["<|user|>", "<|assistant|>", "<|end|>"]
    # the text form encodes to the token-level format (no dummy prefix before <|user|>)
    text = "<|user|> Mary went to the kitchen.<|end|><|assistant|> OK.<|end|>"
    ids, _ = turn_ids(sp, "Mary went to the kitchen.", "OK.", first=False)
    enc = sp.EncodeAsIds(text)
    assert enc[1:] == ids and sp.IdToPiece(enc[0]) == "\u2581"
