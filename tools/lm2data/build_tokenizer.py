"""Train the demo tokenizer with Debian's spm_train and write the word table.

    PYTHONPATH=tools /usr/bin/python3 -m lm2data.build_tokenizer OUT_DIR [--vocab 640]

Writes OUT_DIR/tokenizer.model (sentencepiece BPE, fixed ids 0 unk, 1 BOS, 2 EOS, 3 pad,
4 <|user|>, 5 <|assistant|>, 6 <|end|>) trained on 20,000 generated lines (seed 0), and
OUT_DIR/words.json (word -> ids, checked against sentencepiece) for the training machine.
"""
import argparse
import os

from lm2ref.tokenizer import train_tokenizer

from .encode import WordTable
from .episodes import corpus


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--vocab", type=int, default=640)
    ap.add_argument("--lines", type=int, default=20000)
    a = ap.parse_args(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    tok = os.path.join(a.out_dir, "tokenizer.model")
    train_tokenizer(corpus(a.lines, seed=0), tok, a.vocab)
    wt = WordTable.build(tok)
    wt.save(os.path.join(a.out_dir, "words.json"))
    print(f"{tok}: vocab {a.vocab}, {len(wt.table)} words")


if __name__ == "__main__":
    main()
