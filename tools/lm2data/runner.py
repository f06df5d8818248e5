"""Run a padded episode batch through the reference model, turn by turn.

One turn = one memory segment: forward_tokens over the turn, then end_segment (the memory
write). context "reset" empties the self-attention context before every turn, so only the
memory bank carries anything from one turn to the next; "keep" lets attention span turns.
clear_before_question puts every memory bank back to its initial value before a turn that
asks a question (the "memory cleared" control).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .encode import Batch


def clear_memory_where(model, state, rows: torch.Tensor) -> None:
    """Reset the bank of the sequences where rows [B] is True to the model's initial bank."""
    d = model.config.hidden_size
    for block, ls in zip(model.model.layers, state.layers):
        if block.memory is None or ls.bank is None:
            continue
        m0 = block.memory.initial_bank(d).to(ls.bank.dtype)[None]
        ls.bank = torch.where(rows[:, None, None], m0, ls.bank)


def run_batch(model, batch: Batch, context: str = "reset", clear_before_question: bool = False,
              answer_weight: float = 5.0, reply_weight: float = 1.0, text_weight: float = 1.0,
              want_loss: bool = True):
    """Returns (loss or None, correct [B, turns] bool, has_q [B, turns] bool). A question
    is correct when every reply token (and the closing <|end|>) is the argmax: exactly
    what greedy decoding would produce."""
    B = batch.ids[0].shape[0]
    state = model.initial_state(B)
    total = 0.0
    wsum = 0.0
    correct, has_q = [], []
    for j in range(len(batch.ids)):
        if context == "reset":
            model.reset_context(state)
        if clear_before_question:
            # the open segment has not begun yet: begin_segment reads the cleared bank
            clear_memory_where(model, state, batch.has_q[j])
        logits = model.forward_tokens(state, batch.ids[j], token_mask=batch.mask[j])
        model.end_segment(state)
        tgt = batch.targets[j]
        valid = tgt >= 0
        pred = logits.argmax(-1)
        ok = ((pred == tgt) | ~batch.answer[j]).all(dim=1) & batch.has_q[j]
        correct.append(ok)
        has_q.append(batch.has_q[j])
        if want_loss:
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                 tgt.clamp(min=0).reshape(-1), reduction="none").view_as(tgt)
            w = torch.where(batch.answer[j], torch.full_like(ce, answer_weight),
                            torch.where(batch.reply[j], torch.full_like(ce, reply_weight),
                                        torch.full_like(ce, text_weight)))
            w = w * valid
            total = total + (ce * w).sum()
            wsum = wsum + w.sum()
    loss = total / wsum if want_loss else None
    return loss, torch.stack(correct, 1), torch.stack(has_q, 1)
