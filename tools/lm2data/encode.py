"""Token ids for episodes, and padded per-turn batches for the reference model.

Chat format (token level), one turn = one memory segment:
    [BOS]  (first turn of an episode only)
    <|user|>  sp(user message)  <|end|>  <|assistant|>  sp(reply)  <|end|>
with ids BOS 1, <|user|> 4, <|assistant|> 5, <|end|> 6, and sp(text) sentencepiece's
encoding of the text alone (it starts with the dummy-prefix piece, "▁Mary" ...). As
text that is "<|user|> {message}<|end|><|assistant|> {reply}<|end|>" encoded with the
control symbols as single ids and no dummy prefix before the first <|user|>.

Sentencepiece splits at whitespace first, so the encoding of a message is the
concatenation of the encodings of its words: `WordTable` stores word -> ids for the
closed vocabulary of the generator (built here with the sentencepiece library, then a
JSON file), so the training machine needs no sentencepiece at all.
"""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Dict, List, Optional

from .episodes import FAMILIES, Turn, corpus

BOS, PAD, USER, ASSISTANT, END = 1, 3, 4, 5, 6


class WordTable:
    def __init__(self, table: Dict[str, List[int]]):
        self.table = table

    @classmethod
    def build(cls, tokenizer_path: str, lines: int = 40000, check: int = 4000) -> "WordTable":
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor()
        sp.Load(tokenizer_path)
        text = corpus(lines, seed=7)
        words = sorted({w for line in text for w in line.split()})
        table = {w: list(sp.EncodeAsIds(w)) for w in words}
        wt = cls(table)
        for line in text[:check]:  # the per-word encoding is the encoding of the line
            if wt.encode(line) != list(sp.EncodeAsIds(line)):
                raise RuntimeError(f"word-wise encoding differs for {line!r}")
        return wt

    @classmethod
    def load(cls, path: str) -> "WordTable":
        with open(path, "r", encoding="utf-8") as f:
            return cls(json.load(f))

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.table, f, indent=0, sort_keys=True)

    def encode(self, text: str) -> List[int]:
        out: List[int] = []
        for w in text.split():
            out += self.table[w]
        return out


@dataclasses.dataclass
class EncodedTurn:
    ids: List[int]
    reply_start: int           # index of <|assistant|>: it predicts the first reply token
    family: Optional[str]
    distance: Optional[int]


def encode_turn(wt: WordTable, turn: Turn, first: bool) -> EncodedTurn:
    head = ([BOS] if first else []) + [USER] + wt.encode(turn.user) + [END, ASSISTANT]
    ids = head + wt.encode(turn.reply) + [END]
    return EncodedTurn(ids, len(head) - 1, turn.family, turn.distance)


def encode_episode(wt: WordTable, turns: List[Turn]) -> List[EncodedTurn]:
    return [encode_turn(wt, t, i == 0) for i, t in enumerate(turns)]


@dataclasses.dataclass
class Batch:
    """Per turn j: ids[j], mask[j] [B, L_j]; targets[j] [B, L_j] (next token in the turn,
    -100 where none); answer[j] [B, L_j] bool (positions that predict a reply token of a
    question turn); has_q[j] [B] bool. meta[b][j] = (family, distance) or None."""
    ids: list
    mask: list
    targets: list
    reply: list
    answer: list
    has_q: list
    meta: List[List[Optional[tuple]]]


def make_batch(episodes: List[List[EncodedTurn]], device="cpu") -> Batch:
    import torch
    B = len(episodes)
    n_turns = max(len(e) for e in episodes)
    b = Batch([], [], [], [], [], [], [[None] * n_turns for _ in range(B)])
    for j in range(n_turns):
        L = max((len(e[j].ids) for e in episodes if j < len(e)), default=1)
        ids = torch.full((B, L), PAD, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        tgt = torch.full((B, L), -100, dtype=torch.long)
        reply = torch.zeros(B, L, dtype=torch.bool)
        ans = torch.zeros(B, L, dtype=torch.bool)
        has_q = torch.zeros(B, dtype=torch.bool)
        for i, e in enumerate(episodes):
            if j >= len(e):
                continue
            t = e[j]
            n = len(t.ids)
            ids[i, :n] = torch.tensor(t.ids)
            mask[i, :n] = 1
            tgt[i, :n - 1] = ids[i, 1:n]
            reply[i, t.reply_start:n - 1] = True
            if t.family is not None:
                ans[i, t.reply_start:n - 1] = True
                has_q[i] = True
                b.meta[i][j] = (t.family, t.distance)
        for lst, x in ((b.ids, ids), (b.mask, mask), (b.targets, tgt), (b.reply, reply),
                       (b.answer, ans), (b.has_q, has_q)):
            lst.append(x.to(device))
    return b
