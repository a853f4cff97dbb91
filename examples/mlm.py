"""Masked-language-model pretraining (BERT-style) of an encoder, on docstrings or your text.

The corpus and tokenizer are those of examples/lm.py (stdlib docstrings, collected
offline, or any UTF-8 text file with --data; byte-level BPE). Each step takes random windows of the token stream and
corrupts them with nn.mask_tokens: 15% of the non-special tokens are chosen, of
those 80% become <mask>, 10% a random token, 10% stay; nn.MaskedLM (a bidirectional
encoder with BERT's prediction head, output tied to the embedding) is trained to
recover the original token at the chosen positions only (the vocabulary projection
runs only there, as in BERT's pretraining code).

What it prints: progress, then validation masked-token accuracy (and loss) on a fixed
masking of held-out documents next to the most-frequent-token baseline (always
predict the commonest training token), and a validation sentence with its masks
filled in by the model. Writes the tokenizer, checkpoint, JSONL log and (with
matplotlib) the loss curve into --out-dir; `--resume` continues an interrupted run.

    python examples/mlm.py               # ~2.5 minutes on 2 CPU cores
    python examples/mlm.py --data my_text.txt --out-dir runs/my_mlm
    python examples/mlm.py --smoke       # a few steps of a tiny model

A healthy run: for ~1000 steps the model predicts little beyond token frequencies
(accuracy at <mask> positions stays near the baseline, ~0.04) while it learns to find
a masked position's neighbours; then accuracy climbs, to about 0.35 over all chosen
positions (0.29 at <mask> positions) after the default 3000 steps.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):          # run as a script: make `examples` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine as eg                                                   # noqa: E402
from engine import nn                                                 # noqa: E402
from examples.common import linear_warmup, report_files, run_cli      # noqa: E402
from examples.lm import load_text, stream                             # noqa: E402
from nn.masking import mask_tokens                                    # noqa: E402
from nn.tokenizers import MASK_ID, BPETokenizer                       # noqa: E402

IGNORE = -100


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32, help="sequences per step")
    ap.add_argument("--context", type=int, default=32, help="tokens per sequence")
    ap.add_argument("--vocab", type=int, default=512, help="BPE vocabulary size")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--mask-prob", type=float, default=0.15)
    ap.add_argument("--lr", type=float, default=2e-3, help="learning rate after warmup (AdamW)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--data", default=None, metavar="FILE",
                    help="train on this UTF-8 text file instead of the docstrings")
    ap.add_argument("--out-dir", default="runs/mlm", help="tokenizer, checkpoint, log, plot")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    ap.add_argument("--jit", action="store_true", help="compile the training step (eg.jit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, few documents and steps (what the tests run)")
    return ap


def _smoke(args: argparse.Namespace) -> None:
    args.steps, args.batch, args.context, args.vocab = 6, 4, 16, 300
    args.d_model, args.layers, args.heads, args.eval_every, args.warmup = 16, 1, 2, 3, 2


def gather_targets(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, labels), each (batch * k,): the flat indices into (batch * time) of the
    chosen tokens of each row and their labels, padded per row to k with position
    r * time and IGNORE. Fixed shapes, so a jit-compiled step is traced once."""
    B, T = labels.shape
    order = np.argsort(labels == IGNORE, axis=1, kind="stable")[:, :k]   # chosen ones first
    rows = np.arange(B)[:, None]
    lab = labels[rows, order]
    pos = np.where(lab != IGNORE, rows * T + order, rows * T)
    return pos.reshape(-1).astype(np.int64), lab.reshape(-1).astype(np.int64)


def target_logits(model: nn.MaskedLM, tokens: eg.Tensor, positions: eg.Tensor) -> eg.Tensor:
    """Vocabulary logits at the given flat positions only (N, V), as BERT's pretraining
    code does: the (batch, time, vocab) projection of model(tokens) would spend most of
    its work on positions without a target."""
    h = model.hidden(tokens)
    h = model.head(h.reshape(-1, h.shape[-1])[positions])
    if model.decoder is not None:
        return model.decoder(h)
    return h @ model.embed.weight.T + model.output_bias


def windows(ids: np.ndarray, T: int) -> np.ndarray:
    """Non-overlapping windows of T tokens (the tail that does not fill one is dropped)."""
    n = len(ids) // T
    return ids[:n * T].reshape(n, T)


def main(argv: list[str] | None = None) -> dict:
    return run_cli(_parser(), argv, train)


def train(args: argparse.Namespace) -> dict:
    if args.smoke:
        _smoke(args)
    t_start = time.perf_counter()

    corpus, name = load_text(args)
    os.makedirs(args.out_dir, exist_ok=True)
    tok = BPETokenizer.train(corpus.train, args.vocab)
    tok_path = os.path.join(args.out_dir, "tokenizer.json")
    tok.save(tok_path)
    train_ids, val_ids = stream(tok, corpus.train), stream(tok, corpus.val)
    V, B, T = tok.vocab_size, args.batch, args.context
    print(f"corpus ({name}): {len(corpus.train)} train / {len(corpus.val)} validation "
          f"documents; BPE vocabulary {V}; {len(train_ids):,} train and {len(val_ids):,} "
          f"validation tokens")
    for part, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) < T + 1:
            raise ValueError(f"--data: the {part} text is {len(ids)} tokens, fewer than one "
                             f"window of --context {T}; use more text or a smaller --context")

    eg.manual_seed(args.seed)
    model = nn.MaskedLM(V, d_model=args.d_model, nhead=args.heads, num_layers=args.layers,
                        dim_feedforward=4 * args.d_model, dropout=args.dropout, max_len=T,
                        activation="relu",     # BERT's GELU costs ~5x per step on NumPy here
                        norm_first=True, device=args.device)
    counts = np.bincount(train_ids, minlength=V)
    counts[list(tok.special_ids)] = 0
    with eg.no_grad():        # start at the unigram prior: training then goes for the context
        model.output_bias[...] = eg.tensor(np.log((counts + 1.0) / (counts + 1.0).sum()),
                                           device=args.device)
    # Positions as strong as tokens (BERT's 0.02 is ~4x weaker at d=128): the masked
    # position must find its neighbours by position, and with faint positions training
    # sat on the unigram plateau longer in our runs (~2000 rather than ~1000 steps).
    nn.init.normal_(model.embed.pos.weight, 0.0, args.d_model ** -0.5)
    n_params = sum(int(np.prod(p.shape)) for p in model.parameters())
    lr = eg.tensor(args.lr, device=args.device) if args.jit else args.lr
    opt = nn.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, capturable=args.jit)
    # Linear warmup, then constant: masked-LM training sits on a unigram plateau for the
    # first ~1000 steps here and a decaying rate would slow the climb that follows.
    warmup = max(1, args.warmup)
    sched = linear_warmup(opt, warmup)
    print(f"model: MaskedLM d_model={args.d_model} layers={args.layers} heads={args.heads}, "
          f"{n_params:,} parameters; {args.steps} steps of {B}x{T} tokens")

    k = int(np.rint(args.mask_prob * T)) or 1           # at most this many targets per row

    def batch_fn(step: int) -> tuple:
        """Random windows, masked with a generator seeded by (seed, step): resumable."""
        r = np.random.default_rng([args.seed, step])
        starts = r.integers(0, len(train_ids) - T, B)
        x, y = mask_tokens(train_ids[starts[:, None] + np.arange(T)], V, rng=r,
                           mask_prob=args.mask_prob, ignore_index=IGNORE)
        pos, labels = gather_targets(y, k)
        return tuple(eg.tensor(a, device=args.device) for a in (x, pos, labels))

    def loss_fn(m: nn.Module, batch: tuple) -> eg.Tensor:
        x, pos, labels = batch
        return nn.functional.cross_entropy(target_logits(m, x, pos), labels, ignore_index=IGNORE)

    val_clean = windows(val_ids, T)
    val_x, val_y = mask_tokens(val_clean, V, rng=12345, mask_prob=args.mask_prob,
                               ignore_index=IGNORE)
    chosen = val_y != IGNORE
    was_masked = chosen & (val_x == MASK_ID)
    top = int(np.argmax(counts))
    baseline = float((val_y[chosen] == top).mean())
    val_pos, val_labels = (a.reshape(-1, k) for a in gather_targets(val_y, k))
    val_real = val_labels != IGNORE

    def predict(m: nn.Module) -> tuple[np.ndarray, float]:
        """Predictions at the chosen validation positions (row-major order) and the loss."""
        m.eval()
        preds, total = [], 0.0
        with eg.no_grad():
            for i in range(0, len(val_x), 64):
                x = eg.tensor(val_x[i:i + 64], device=args.device)
                pos = eg.tensor(val_pos[i:i + 64].reshape(-1) - i * T, device=args.device)
                logits = target_logits(m, x, pos)
                total += float(nn.functional.cross_entropy(
                    logits, eg.tensor(val_labels[i:i + 64].reshape(-1), device=args.device),
                    ignore_index=IGNORE, reduction="sum").item())
                preds.append(logits.numpy().argmax(-1).reshape(-1, k))
        return np.concatenate(preds)[val_real], total / chosen.sum()

    masked_among_chosen = was_masked[chosen]          # row-major order, as predict returns

    def evaluate(m: nn.Module) -> dict:
        pred, loss = predict(m)
        truth = val_y[chosen]
        return {"val_loss": loss, "val_acc": float((pred == truth).mean()),
                "val_acc_masked": float((pred[masked_among_chosen]
                                         == truth[masked_among_chosen]).mean())}

    print(f"validation: {int(chosen.sum()):,} chosen positions in {len(val_x)} windows; "
          f"most-frequent-token baseline ({tok.token(top)!r} every time): accuracy {baseline:.3f}")
    log = os.path.join(args.out_dir, "log.jsonl")
    ckpt = os.path.join(args.out_dir, "checkpoint.npz")
    hist = nn.train(model, opt, batch_fn, loss_fn, steps=args.steps, scheduler=sched,
                    clip_norm=1.0, eval_fn=evaluate, eval_every=args.eval_every,
                    checkpoint=ckpt, checkpoint_every=args.eval_every, resume=args.resume,
                    log=log, print_every=max(1, args.eval_every // 4), seed=args.seed,
                    jit=args.jit, tokens_fn=lambda b: B * T)
    final = [r for r in nn.read_log(log) if "val_acc" in r][-1]
    print(f"masked-token accuracy {final['val_acc']:.3f} (on <mask> positions "
          f"{final['val_acc_masked']:.3f}) vs most-frequent-token baseline {baseline:.3f} "
          f"({final['val_acc'] / max(baseline, 1e-9):.1f}x); validation loss "
          f"{final['val_loss']:.3f}")
    ok = final["val_acc_masked"] > baseline
    print(f"ours: {'pass' if ok else 'MISS'}: at <mask> positions, where nothing can be copied, "
          f"the model {'beats' if ok else 'does not beat'} the most-frequent token "
          f"({final['val_acc_masked']:.3f} vs {baseline:.3f})")
    png = os.path.join(args.out_dir, "loss.png")
    drawn = nn.plot_losses(log, png, title=f"masked LM on {name}")

    pred_flat, _ = predict(model)
    pred = np.full(val_y.shape, -1)
    pred[chosen] = pred_flat
    row = int(np.argmax(was_masked.sum(1)))
    shown = [tok.token(int(t)) for t in val_x[row]]
    filled = [f"[{tok.token(int(p))}|{tok.token(int(y))}]" if c else tok.token(int(x))
              for x, p, y, c in zip(val_x[row], pred[row], val_y[row], chosen[row])]
    print("a validation window as the model sees it:\n  " + "".join(shown).replace("\n", " "))
    print("its chosen positions filled in as [prediction|truth]:\n  "
          + "".join(filled).replace("\n", " "))
    elapsed = time.perf_counter() - t_start
    print(f"total time {elapsed:.0f}s")
    report_files({"tokenizer": tok_path, "checkpoint": ckpt, "training log": log,
                  "loss curve": png if drawn else None})
    return {"val_acc": final["val_acc"], "val_acc_masked": final["val_acc_masked"],
            "val_loss": final["val_loss"], "baseline_acc": baseline, "history": hist,
            "seconds": elapsed}


if __name__ == "__main__":
    main()
