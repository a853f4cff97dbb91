"""Train a small decoder-only language model on the standard library's docstrings.

The corpus is the docstrings of ~130 standard-library modules (examples/corpus.py:
nothing is downloaded, about 0.7 MB of English-and-code text). A byte-level BPE
tokenizer (nn.BPETokenizer) is trained on the training documents, the documents are
joined as <bos> doc <eos> into one token stream, and a GPT-style nn.CausalLM (pre-LN)
learns to predict the next token from random windows of it.

What it prints: progress (loss, lr, tokens/s, ETA), the validation loss per token
next to a unigram baseline (the best model that ignores context: token frequencies of
the training stream), and text sampled with top-p (nucleus) sampling from a prompt.
Writes the tokenizer, checkpoint, JSONL log and (with matplotlib) the loss curve
into --out-dir. `--resume` continues an interrupted run exactly.

    python examples/lm.py                              # ~2 minutes on 2 CPU cores
    python examples/lm.py --prompt "Return a list of" --top-p 0.9
    python examples/lm.py --smoke                      # a few steps of a tiny model
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

if __name__ == "__main__":
    # The matrices here are small: one BLAS thread is as fast as two, and OpenBLAS threads
    # on a busy machine spin (measured: 391 s instead of 181 s for the default lm run).
    # Must be set before NumPy loads; an explicit OPENBLAS_NUM_THREADS wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np                                                    # noqa: E402

if __package__ in (None, ""):          # run as a script: make `examples` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine as eg                                                   # noqa: E402
from engine import nn                                                 # noqa: E402
from examples.corpus import load_corpus                               # noqa: E402
from nn.tokenizers import BOS_ID, EOS_ID, BPETokenizer                # noqa: E402


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch", type=int, default=32, help="sequences per step")
    ap.add_argument("--context", type=int, default=64, help="tokens per training sequence")
    ap.add_argument("--vocab", type=int, default=1536, help="BPE vocabulary size")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--prompt", default="Return the")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--samples", type=int, default=3, help="texts to sample from the prompt")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--out-dir", default="runs/lm", help="tokenizer, checkpoint, log, plot")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    ap.add_argument("--jit", action="store_true", help="compile the training step (eg.jit)")
    ap.add_argument("--distributed", action="store_true",
                    help="train data-parallel over the processes mpiexec starts, e.g. "
                         "`mpiexec -n 2 python examples/lm.py --distributed` (needs mpi4py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, few documents and steps (what the tests run)")
    return ap


def _smoke(args: argparse.Namespace) -> None:
    args.steps, args.batch, args.context, args.vocab = 6, 4, 16, 300
    args.d_model, args.layers, args.heads, args.eval_every = 16, 1, 2, 3
    args.warmup, args.max_new_tokens, args.samples = 2, 8, 1


def stream(tok: BPETokenizer, docs: list[str]) -> np.ndarray:
    """<bos> doc <eos> <bos> doc <eos> ... as one int64 token array."""
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d, add_bos=True, add_eos=True)
    return np.array(ids, dtype=np.int64)


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab: int) -> float:
    """Cross-entropy (nats/token) on the validation targets of the add-one-smoothed
    token frequencies of the training stream: the context-free baseline."""
    counts = np.bincount(train[1:], minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val[1:]].mean())


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.smoke:
        _smoke(args)
    if args.distributed:
        eg.distributed.init()
        eg.distributed.silence_other_ranks()
    os.makedirs(args.out_dir, exist_ok=True)
    t_start = time.perf_counter()

    corpus = load_corpus(max_docs=300 if args.smoke else None)
    tok = BPETokenizer.train(corpus.train, args.vocab)
    tok.save(os.path.join(args.out_dir, "tokenizer.json"))
    train_ids, val_ids = stream(tok, corpus.train), stream(tok, corpus.val)
    V = tok.vocab_size
    print(f"corpus: {len(corpus.train)} train / {len(corpus.val)} validation docstrings, "
          f"{corpus.chars:,} characters; BPE vocabulary {V}; {len(train_ids):,} train and "
          f"{len(val_ids):,} validation tokens ({corpus.chars / (len(train_ids) + len(val_ids)):.2f} "
          f"characters/token)")

    eg.manual_seed(args.seed)
    model = nn.CausalLM(V, d_model=args.d_model, nhead=args.heads, num_layers=args.layers,
                        dim_feedforward=4 * args.d_model, dropout=args.dropout,
                        max_len=args.context + args.max_new_tokens + 8, norm_first=True,
                        device=args.device)
    n_params = sum(int(np.prod(p.shape)) for p in model.parameters())
    lr = eg.tensor(args.lr, device=args.device) if args.jit else args.lr
    opt = nn.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, capturable=args.jit)
    sched = nn.optim.WarmupCosineLR(opt, args.warmup, args.steps, min_ratio=0.1)
    print(f"model: CausalLM d_model={args.d_model} layers={args.layers} heads={args.heads}, "
          f"{n_params:,} parameters; {args.steps} steps of {args.batch}x{args.context} tokens")

    B, T = args.batch, args.context

    def batch_fn(step: int) -> tuple:
        """Random windows of the training stream, a function of (seed, step) only."""
        r = np.random.default_rng([args.seed, step])
        starts = r.integers(0, len(train_ids) - T - 1, B)
        w = train_ids[starts[:, None] + np.arange(T + 1)]
        return (eg.tensor(w[:, :-1], device=args.device), eg.tensor(w[:, 1:], device=args.device))

    def loss_fn(m: nn.Module, batch: tuple) -> eg.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(m(x).reshape(-1, V), y.reshape(-1))

    n_val = (len(val_ids) - 1) // T
    vx = val_ids[:n_val * T].reshape(n_val, T)
    vy = val_ids[1:n_val * T + 1].reshape(n_val, T)

    def evaluate(m: nn.Module) -> dict:
        """Mean next-token loss over the whole validation stream, in windows of T."""
        m.eval()
        total = 0.0
        with eg.no_grad():
            for i in range(0, n_val, 64):
                x = eg.tensor(vx[i:i + 64], device=args.device)
                y = eg.tensor(vy[i:i + 64], device=args.device)
                loss = nn.functional.cross_entropy(m(x).reshape(-1, V), y.reshape(-1),
                                                   reduction="sum")
                total += float(loss.item())
        return {"val_loss": total / (n_val * T)}

    baseline = unigram_loss(train_ids, val_ids, V)
    print(f"unigram baseline: validation loss {baseline:.3f} nats/token "
          f"(perplexity {math.exp(baseline):.0f}); uniform over the vocabulary: {math.log(V):.3f}")
    log = os.path.join(args.out_dir, "log.jsonl")
    hist = nn.train(model, opt, batch_fn, loss_fn, steps=args.steps, scheduler=sched,
                    clip_norm=1.0, eval_fn=evaluate, eval_every=args.eval_every,
                    checkpoint=os.path.join(args.out_dir, "checkpoint.npz"),
                    checkpoint_every=args.eval_every, resume=args.resume, log=log,
                    print_every=max(1, args.eval_every // 4), seed=args.seed, jit=args.jit,
                    distributed=args.distributed,
                    tokens_fn=lambda b: B * T)
    records = nn.read_log(log)
    val_loss = [r["val_loss"] for r in records if "val_loss" in r][-1]
    print(f"validation loss {val_loss:.3f} nats/token (perplexity {math.exp(val_loss):.1f}) vs "
          f"unigram {baseline:.3f} ({math.exp(baseline):.0f}): the model "
          f"{'uses' if val_loss < baseline else 'does NOT yet use'} the context "
          f"({(baseline - val_loss) / math.log(2):+.2f} bits/token)")
    png = os.path.join(args.out_dir, "loss.png")
    if nn.plot_losses(log, png, title="decoder-only LM on stdlib docstrings",
                      baselines={f"unigram baseline {baseline:.2f}": baseline}):
        print(f"loss curve: {png}")

    model.eval()
    prompt = [BOS_ID] + tok.encode(args.prompt)
    rng = np.random.default_rng(args.seed)
    samples = []
    for _ in range(args.samples):
        new = nn.generation.generate(model, [prompt], args.max_new_tokens, eos=EOS_ID,
                                     do_sample=True, top_p=args.top_p,
                                     temperature=args.temperature, rng=rng)[0]
        samples.append(args.prompt + tok.decode(new))
    print(f"samples (top-p {args.top_p}, temperature {args.temperature}):")
    for s in samples:
        print("  | " + s.replace("\n", "\n  | "))
    elapsed = time.perf_counter() - t_start
    print(f"total time {elapsed:.0f}s")
    return {"val_loss": val_loss, "unigram_loss": baseline, "samples": samples,
            "history": hist, "vocab": V, "params": n_params, "seconds": elapsed}


if __name__ == "__main__":
    main()
