"""Sentencepiece tokenizers for lm2 model directories, trained with Debian's `spm_train`.

The test models' tokenizer is trained on a small corpus generated here (deterministic
template sentences about people, places and things, plus chat-style lines), so nothing is
downloaded. Training runs single-threaded over the whole corpus in a fixed order, which
makes the resulting tokenizer.model byte-identical across runs.

Piece ids fixed by every lm2 tokenizer: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3 <pad>, then
the chat control symbols <|user|>, <|assistant|>, <|end|>; byte fallback covers any input.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
from typing import Iterable, List

CHAT_SYMBOLS = ["<|user|>", "<|assistant|>", "<|end|>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

# DIR/chat_template.json (docs/runtime.md, "Chat template"): a user turn is rendered as the
# one string user_prefix + message + user_suffix + assistant_prefix and encoded in one pass
# (BOS first on a conversation's first turn when add_bos); a reply ends at a stop piece or
# EOS. These strings match the chat lines of generate_corpus().
CHAT_TEMPLATE_FORMAT = "lm2-chat-template-1"
CHAT_TEMPLATE = {
    "format": CHAT_TEMPLATE_FORMAT,
    "add_bos": True,
    "user_prefix": "<|user|> ",
    "user_suffix": "<|end|>",
    "assistant_prefix": "<|assistant|>",
    "assistant_suffix": "<|end|>",
    "stop": ["<|end|>"],
}


def chat_template_json(template: dict = CHAT_TEMPLATE) -> str:
    """The text of a chat_template.json file."""
    return json.dumps(template, indent=2) + "\n"


def render_user_turn(sp, message: str, first_turn: bool, template: dict = CHAT_TEMPLATE):
    """Token ids of one user turn plus the assistant prefix (what the runtime renders)."""
    ids = [sp.bos_id()] if first_turn and template.get("add_bos", True) else []
    text = template["user_prefix"] + message + template["user_suffix"] + template["assistant_prefix"]
    body = list(sp.EncodeAsIds(text))
    # Text that starts with a control symbol gets a lone dummy-prefix piece first; the
    # chat format has none (models/lm2-demo/README.md), so it is dropped.
    chat_ids = {sp.PieceToId(s) for s in CHAT_SYMBOLS}
    if len(body) > 1 and body[1] in chat_ids and body[0] == sp.PieceToId("\u2581"):
        body = body[1:]
    return ids + body

_PEOPLE = ["Mary", "John", "Sandra", "Daniel", "Alice", "Bob", "Fred", "Julie", "Bill", "Emma",
           "Omar", "Priya", "Lena", "Kofi", "Yuki", "Mateo"]
_PLACES = ["kitchen", "garden", "office", "hallway", "bedroom", "bathroom", "park", "school",
           "library", "station", "market", "cinema", "beach", "museum"]
_THINGS = ["apple", "football", "milk", "book", "key", "umbrella", "phone", "letter", "hat",
           "guitar", "camera", "ticket", "lamp", "map"]
_VERBS_MOVE = ["went to", "moved to", "travelled to", "journeyed to", "ran to", "walked to"]
_VERBS_TAKE = ["picked up", "took", "grabbed", "got", "dropped", "left", "put down"]
_SMALL_TALK = ["How are you today?", "I am fine, thank you.", "What a lovely day.",
               "Tell me more.", "That sounds interesting.", "I do not know.", "Yes.", "No.",
               "Please remember that.", "Thanks for telling me.", "Good morning!",
               "See you later.", "What time is it?", "It is 7 o'clock."]


def generate_corpus(lines: int = 4000, seed: int = 1234) -> List[str]:
    """Deterministic template text: facts, questions, answers, chat turns."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        p, q = rng.sample(_PEOPLE, 2)
        kind = rng.randrange(6)
        if kind == 0:
            out.append(f"{p} {rng.choice(_VERBS_MOVE)} the {rng.choice(_PLACES)}.")
        elif kind == 1:
            out.append(f"{p} {rng.choice(_VERBS_TAKE)} the {rng.choice(_THINGS)}.")
        elif kind == 2:
            out.append(f"Where is {p}? {p} is in the {rng.choice(_PLACES)}.")
        elif kind == 3:
            out.append(f"{p} gave the {rng.choice(_THINGS)} to {q}.")
        elif kind == 4:
            out.append(f"<|user|> {rng.choice(_SMALL_TALK)} <|end|> "
                       f"<|assistant|> {rng.choice(_SMALL_TALK)} <|end|>")
        else:
            n = rng.randrange(0, 100)
            out.append(f"{p} has {n} {rng.choice(_THINGS)}s and is {rng.randrange(5, 90)} years old.")
    return out


def train_tokenizer(corpus: Iterable[str], out_path: str, vocab_size: int = 512,
                    model_type: str = "bpe") -> None:
    """Train a sentencepiece model on `corpus` with spm_train and write it to `out_path`."""
    spm_train = shutil.which("spm_train")
    if spm_train is None:
        raise RuntimeError("spm_train not found: install Debian's 'sentencepiece' (scripts/setup)")
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "corpus.txt")
        with open(text, "w", encoding="utf-8") as f:
            for line in corpus:
                f.write(line + "\n")
        # Relative paths: the model stores its trainer arguments, and a temporary directory's
        # name in them would make every training run's file differ.
        args = [
            spm_train, "--input=corpus.txt", "--model_prefix=tok",
            f"--vocab_size={vocab_size}", f"--model_type={model_type}",
            "--character_coverage=1.0", "--byte_fallback=true",
            f"--unk_id={UNK_ID}", f"--bos_id={BOS_ID}", f"--eos_id={EOS_ID}", f"--pad_id={PAD_ID}",
            f"--user_defined_symbols={','.join(CHAT_SYMBOLS)}",
            "--num_threads=1", "--shuffle_input_sentence=false", "--input_sentence_size=0",
            "--minloglevel=2",
        ]
        res = subprocess.run(args, capture_output=True, text=True, cwd=tmp)
        if res.returncode != 0:
            raise RuntimeError(f"spm_train failed ({res.returncode}): {res.stderr[-2000:]}")
        shutil.copyfile(os.path.join(tmp, "tok.model"), out_path)


def load_processor(path: str):
    """A sentencepiece processor for `path` (Debian's python3-sentencepiece)."""
    import sentencepiece as spm  # imported lazily: only generation needs it
    sp = spm.SentencePieceProcessor()
    if not sp.Load(path):
        raise RuntimeError(f"cannot load tokenizer {path}")
    return sp
