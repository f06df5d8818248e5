#!/usr/bin/env python3
"""Train the lm2 demo model: multi-turn chat episodes, one turn = one memory segment,
backpropagation through all segments of an episode (and so through the memory bank).

    PYTHONPATH=tools python3 tools/train_demo.py --words TOKDIR/words.json --out DIR \
        [--vanilla] [--minutes 9] [--steps N] [--resume DIR/ckpt.pt] [--device cuda]
        [--init-from MODEL_DIR --start-step N] [--decay cosine --decay-steps N|0]
        [--family-weights list=2,latest=1.5]

Data: half scripted episodes (lm2data.episodes.eval_episode: one question, random family,
distance 1..D), half simulated worlds with many questions (world_episode, 2..D+2 turns),
freshly generated for every step from the seed (random.Random(f"train-{seed}-{step}")).
Curriculum: D starts at --start-distance and grows by one (up to --max-distance) whenever
the held-out check at distance D reaches --advance-at answer accuracy.
Context: a batch resets the self-attention context at every turn (memory alone carries
facts) with probability --p-reset, else keeps it across turns.
Loss: next-token cross-entropy inside each turn, weight --answer-weight on the reply
tokens of question turns, 1 elsewhere. Logs loss and accuracy; writes DIR/ckpt.pt (model,
optimizer, step, D) every check and at the end; DIR/log.txt.
Continuing from a shipped model: --init-from MODEL_DIR loads its weights (bfloat16 or
float32 on disk) into a float32 model of that directory's config with a fresh AdamW,
distance --start-distance, step counter --start-step (so the data streams are new ones).
Learning rate: linear warm-up over --warmup steps to --lr, then constant (--decay none)
or cosine down to --min-lr at --decay-steps steps after the start (--decay-steps 0 with
--minutes: the number of steps that fit the wall time, from the speed of the first steps;
the run then stops there, and the log says the number, so --steps repeats it).
--family-weights: relative weights of the families in the scripted half of each batch
(default: uniform, as rng.choice).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lm2data.encode import WordTable, encode_episode, make_batch  # noqa: E402
from lm2data.episodes import FAMILIES, eval_episode, world_episode  # noqa: E402
from lm2data.runner import run_batch  # noqa: E402
from lm2ref.config import LM2Config  # noqa: E402
from lm2ref.model import LM2ForCausalLM  # noqa: E402


def model_config(args, vocab: int) -> LM2Config:
    return LM2Config(
        vocab_size=vocab, hidden_size=args.d, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=1024,
        memory_slots=0 if args.vanilla else args.slots, memory_heads=args.memory_heads,
        memory_segment_tokens=0)


def init_model(model: LM2ForCausalLM, forget_bias: float) -> None:
    """PyTorch's default initialisation, plus the contract's gate biases: b_ig = 0 and
    b_fg = forget_bias (memory is kept at the start of training)."""
    for block in model.model.layers:
        if block.memory is not None:
            torch.nn.init.zeros_(block.memory.in_gate.bias)
            torch.nn.init.constant_(block.memory.forget_gate.bias, forget_bias)


def parse_family_weights(text: str):
    """"list=2,latest=1.5" -> weights in FAMILIES order (1 for families not named)."""
    if not text:
        return None
    w = {f: 1.0 for f in FAMILIES}
    for item in text.split(","):
        name, val = item.split("=")
        if name not in w:
            raise SystemExit(f"--family-weights: unknown family {name!r}")
        w[name] = float(val)
    return [w[f] for f in FAMILIES]


def lr_at(args, step: int, start: int, total: int) -> float:
    """Warm-up, then constant or cosine decay; step counts from `start`."""
    k = step - start
    lr = args.lr * min(1.0, (k + 1) / args.warmup)
    if args.decay == "cosine" and total > 0 and k >= args.warmup:
        frac = min(1.0, (k - args.warmup) / max(1, total - args.warmup))
        lr = args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
    return lr


def train_batch(wt, rng: random.Random, batch_size: int, dist: int, fam_weights=None):
    eps = []
    for i in range(batch_size):
        if i % 2 == 0:
            fam = (rng.choice(FAMILIES) if fam_weights is None
                   else rng.choices(FAMILIES, weights=fam_weights)[0])
            ep = eval_episode(rng, fam, rng.randint(1, dist))
        else:
            ep = world_episode(rng, rng.randint(2, dist + 2))
        eps.append(encode_episode(wt, ep))
    return eps


def check_set(wt, seed: int, distances, per_family: int):
    """Held-out check episodes (seed stream "check-..."), grouped by distance."""
    out = {}
    for d in distances:
        rng = random.Random(f"check-{seed}-{d}")
        eps = [encode_episode(wt, eval_episode(rng, f, d))
               for f in FAMILIES for _ in range(per_family)]
        out[d] = eps
    return out


def accuracy(model, eps, device, context="reset", clear=False, amp=False):
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                         enabled=amp):
        b = make_batch(eps, device)
        _, ok, hq = run_batch(model, b, context=context, clear_before_question=clear,
                              want_loss=False)
    return float(ok.sum()) / max(1, int(hq.sum()))


def export(model: LM2ForCausalLM, args) -> None:
    """The model directory: config.json, safetensors (--export-dtype) in shards of at most
    --shard-mib MiB, tokenizer.model."""
    from lm2ref.model_dir import save_model_dir
    save_model_dir(model.float().cpu(), args.export_dir, dtype=getattr(torch, args.export_dtype),
                   tokenizer=args.tokenizer or None,
                   max_shard_bytes=int(args.shard_mib * 1024 * 1024))
    print(f"exported to {args.export_dir}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--words", required=True, help="words.json from lm2data.build_tokenizer")
    ap.add_argument("--vocab", type=int, default=640)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vanilla", action="store_true", help="same model without memory")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--memory-heads", type=int, default=4)
    ap.add_argument("--forget-bias", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--answer-weight", type=float, default=5.0)
    ap.add_argument("--p-reset", type=float, default=0.8)
    ap.add_argument("--start-distance", type=int, default=1)
    ap.add_argument("--max-distance", type=int, default=10)
    ap.add_argument("--advance-at", type=float, default=0.8)
    ap.add_argument("--check-every", type=int, default=250)
    ap.add_argument("--force-advance", type=int, default=0,
                    help="also advance D after this many checks without an advance (0: never)")
    ap.add_argument("--check-per-family", type=int, default=16)
    ap.add_argument("--steps", type=int, default=0, help="stop after this step (0: no limit)")
    ap.add_argument("--minutes", type=float, default=0, help="stop after this wall time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--tf32", action="store_true", help="TF32 matrix products (CUDA)")
    ap.add_argument("--resume", default="")
    ap.add_argument("--init-from", default="",
                    help="start from the weights of this model directory (fresh optimizer)")
    ap.add_argument("--start-step", type=int, default=0,
                    help="with --init-from: the first step number (data stream train-SEED-STEP)")
    ap.add_argument("--decay", choices=["none", "cosine"], default="none")
    ap.add_argument("--decay-steps", type=int, default=0,
                    help="steps from the start to the end of the decay (0: --steps, else fit --minutes)")
    ap.add_argument("--min-lr", type=float, default=0.0)
    ap.add_argument("--family-weights", default="",
                    help="scripted-half family weights, e.g. list=2,latest=1.5,two=1.5")
    ap.add_argument("--export-dir", default="", help="write a model directory at the end")
    ap.add_argument("--export-from", default="", help="only export this checkpoint")
    ap.add_argument("--tokenizer", default="", help="tokenizer.model for the model directory")
    ap.add_argument("--shard-mib", type=float, default=15.0)
    ap.add_argument("--export-dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args(argv)
    if args.export_from:
        ck = torch.load(args.export_from, map_location="cpu")
        model = LM2ForCausalLM(LM2Config.from_dict(ck["config"]))
        model.load_state_dict(ck["model"])
        export(model, args)
        return 0

    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "log.txt"), "a", encoding="utf-8")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda" and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    wt = WordTable.load(args.words)
    if args.init_from:
        from lm2ref.model_dir import load_model_dir
        model = load_model_dir(args.init_from, dtype=torch.float32)
        cfg = model.config
    else:
        cfg = model_config(args, args.vocab)
        model = LM2ForCausalLM(cfg)
        init_model(model, args.forget_bias)
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    step, dist = (args.start_step if args.init_from else 0), args.start_distance
    if args.init_from:
        log(f"initialised from {args.init_from} (weights as stored, now float32), "
            f"step {step}, distance {dist}")
    if args.resume:
        ck = torch.load(args.resume, map_location=device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, dist = ck["step"], ck["dist"]
        log(f"resumed from {args.resume} at step {step}, distance {dist}")
    nparam = sum(p.numel() for p in model.parameters())
    log(f"args {json.dumps(vars(args))}")
    log(f"params {nparam / 1e6:.2f} M, memory layers {cfg.memory_layers}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    checks = check_set(wt, args.seed, sorted({1, 2, 4, 8}), args.check_per_family)

    def save():
        tmp = os.path.join(args.out, "ckpt.pt.tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "dist": dist, "config": cfg.to_dict(), "args": vars(args)}, tmp)
        os.replace(tmp, os.path.join(args.out, "ckpt.pt"))

    t0 = time.time()
    first = step
    lr_base = first if args.init_from else 0  # --resume keeps the original warm-up count
    fam_weights = parse_family_weights(args.family_weights)
    total = args.decay_steps or (args.steps - first if args.steps else 0)
    auto = args.decay == "cosine" and total == 0
    if args.decay == "cosine" and not (total or args.minutes):
        raise SystemExit("--decay cosine needs --decay-steps, --steps or --minutes")
    stop_at = args.steps or 0
    t_probe = None
    amp = args.bf16 and device.type == "cuda"
    run_loss = run_acc = None
    since_advance = 0
    while True:
        if stop_at and step >= stop_at:
            break
        if auto and step - first == 10:
            t_probe = time.time()
        if auto and step - first == 60:
            # steps that fit the wall time at this speed, less 8% for checks and export
            per = (time.time() - t_probe) / 50
            total = 60 + int((args.minutes * 60 * 0.92 - (time.time() - t0)) / per)
            stop_at = first + total
            log(f"schedule: {per * 1000:.0f} ms/step -> cosine decay over {total} steps, "
                f"stop at step {stop_at} (repeat with --steps {stop_at})")
        if args.minutes and time.time() - t0 > args.minutes * 60:
            break
        rng = random.Random(f"train-{args.seed}-{step}")
        eps = train_batch(wt, rng, args.batch, dist, fam_weights)
        context = "reset" if rng.random() < args.p_reset else "keep"
        b = make_batch(eps, device)
        lr = lr_at(args, step, lr_base, total)
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss, ok, hq = run_batch(model, b, context=context, answer_weight=args.answer_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        acc = float(ok.sum()) / max(1, int(hq.sum()))
        run_loss = float(loss) if run_loss is None else 0.95 * run_loss + 0.05 * float(loss)
        run_acc = acc if run_acc is None else 0.95 * run_acc + 0.05 * acc
        if step % 50 == 0:
            log(f"step {step} t={time.time() - t0:.0f}s D={dist} loss {run_loss:.4f} "
                f"train_acc {run_acc:.3f} ({context})" + (f" lr {lr:.2e}" if args.decay != "none" else ""))
        if step % args.check_every == 0:
            model.eval()
            res = {d: accuracy(model, e, device, amp=amp) for d, e in checks.items()}
            clr = accuracy(model, checks[1], device, clear=True, amp=amp)
            log(f"check step {step} D={dist} memory " +
                " ".join(f"d{d}={a:.3f}" for d, a in res.items()) + f" cleared d1={clr:.3f}")
            probe = min(dist, 8)
            at = res.get(probe)
            if at is None:
                at = accuracy(model, check_set(wt, args.seed, [probe], args.check_per_family)[probe],
                              device, amp=amp)
            since_advance += 1
            forced = args.force_advance and since_advance >= args.force_advance
            if (at >= args.advance_at or forced) and dist < args.max_distance:
                dist += 1
                since_advance = 0
                log(f"curriculum: distance -> {dist}" + (" (forced)" if at < args.advance_at else ""))
            save()
    save()
    log(f"done: step {step}, distance {dist}, {time.time() - t0:.0f}s")
    if args.export_dir:
        export(model, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
