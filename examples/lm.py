"""Train a small decoder-only language model on text, then sample from it.

By default the text is the docstrings of ~130 standard-library modules
(examples/corpus.py: nothing is downloaded, about 0.73 MB of English-and-code text on
Python 3.11); `--data FILE` trains on any UTF-8 text file instead (its last 10% is the
validation text; blank lines separate documents). A byte-level BPE tokenizer
(nn.BPETokenizer) is trained on the training documents, the documents are joined as
<bos> doc <eos> into one token stream, and a GPT-style nn.CausalLM (pre-LN) learns to
predict the next token from random windows of it.

What it prints: progress (loss, lr, tokens/s, ETA), the validation loss per token
next to a unigram baseline (the best model that ignores context: token frequencies of
the training stream), text sampled from a prompt, and where it wrote the tokenizer,
checkpoint (with config.json beside it), JSONL log and (with matplotlib) the loss
curve. `--resume` continues an interrupted run exactly; `--sample` loads a finished
run and only samples.

    python examples/lm.py                              # ~2 minutes on 2 CPU cores
    python examples/lm.py --data my_text.txt --out-dir runs/my_lm
    python examples/lm.py --sample --checkpoint runs/lm/checkpoint.npz --prompt "Return a"
    python examples/lm.py --sample --checkpoint runs/lm/checkpoint.npz --top-k 20 --temperature 1.0
    python examples/lm.py --sample --checkpoint runs/lm/checkpoint.npz --beams 4
    python examples/lm.py --smoke                      # a few steps of a tiny model
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):          # run as a script: make `examples` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine as eg                                                   # noqa: E402
from engine import nn                                                 # noqa: E402
from examples.common import report_files, run_cli, warmup_cosine      # noqa: E402
from examples.corpus import Corpus, load_corpus, load_text_file       # noqa: E402
from nn.tokenizers import BOS_ID, EOS_ID, BPETokenizer, load_tokenizer  # noqa: E402


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
    ap.add_argument("--data", default=None, metavar="FILE",
                    help="train on this UTF-8 text file instead of the docstrings")
    g = ap.add_argument_group("sampling (after training, or alone with --sample)")
    g.add_argument("--sample", action="store_true",
                   help="do not train: load --checkpoint (config.json and tokenizer.json "
                        "beside it) and sample from --prompt")
    g.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="the checkpoint.npz of a finished run (for --sample)")
    g.add_argument("--prompt", default="Return the", help="text the samples continue")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--samples", type=int, default=3, help="texts to sample from the prompt")
    g.add_argument("--temperature", type=float, default=0.8,
                   help="below 1 sharper, above 1 more random")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    g.add_argument("--top-p", type=float, default=0.9,
                   help="sample among the likeliest tokens whose probabilities sum to p")
    g.add_argument("--beams", type=int, default=1,
                   help="beam search with this many beams instead of sampling (one text)")
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


def build_model(config: dict, device: str) -> nn.CausalLM:
    """The CausalLM a run trains, from the hyperparameters saved in its config.json."""
    return nn.CausalLM(config["vocab"], d_model=config["d_model"], nhead=config["heads"],
                       num_layers=config["layers"], dim_feedforward=4 * config["d_model"],
                       dropout=config["dropout"], max_len=config["max_len"], norm_first=True,
                       device=device)


def sample_texts(model: nn.CausalLM, tok: BPETokenizer, args: argparse.Namespace) -> list[str]:
    """Continue --prompt: --samples texts by sampling (temperature, top-k, top-p), or one
    by beam search when --beams > 1."""
    model.eval()
    prompt = [BOS_ID] + tok.encode(args.prompt)
    rng = np.random.default_rng(args.seed)
    beam = args.beams > 1
    texts = []
    for _ in range(1 if beam else args.samples):
        new = nn.generation.generate(model, [prompt], args.max_new_tokens, eos=EOS_ID,
                                     do_sample=not beam, num_beams=args.beams,
                                     top_k=args.top_k, top_p=args.top_p,
                                     temperature=args.temperature, rng=rng)[0]
        texts.append(args.prompt + tok.decode([t for t in new if t != EOS_ID]))
    how = (f"beam search, {args.beams} beams" if beam else
           f"temperature {args.temperature}, top-k {args.top_k or 'off'}, top-p {args.top_p}")
    print(f"samples ({how}):")
    for t in texts:
        print("  | " + t.replace("\n", "\n  | "))
    return texts


def sample_from_checkpoint(args: argparse.Namespace) -> dict:
    """--sample: rebuild the model of a finished run and sample from it."""
    if args.checkpoint is None:
        raise ValueError("--sample needs --checkpoint PATH (the checkpoint.npz of a run)")
    if not os.path.isfile(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint!r}: no such file")
    run_dir = os.path.dirname(os.path.abspath(args.checkpoint))
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"--checkpoint {args.checkpoint!r}: no config.json beside it (was it "
                         f"written by examples/lm.py?)")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    tok = load_tokenizer(os.path.join(run_dir, "tokenizer.json"))
    model = build_model(config, args.device)
    nn.checkpoint.load(args.checkpoint, model)
    print(f"loaded {args.checkpoint} ({config['layers']} layers, d_model {config['d_model']}, "
          f"vocabulary {config['vocab']})")
    room = config["max_len"] - len(tok.encode(args.prompt)) - 1
    if args.max_new_tokens > room:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: the model was trained for "
                         f"{config['max_len']} positions, so this prompt leaves room for {room}")
    return {"samples": sample_texts(model, tok, args)}


def load_text(args: argparse.Namespace) -> tuple[Corpus, str]:
    """The training text and how to name it: --data, or the docstrings."""
    if args.data is not None:
        return load_text_file(args.data), os.path.basename(args.data)
    return load_corpus(max_docs=300 if args.smoke else None), "stdlib docstrings"


def main(argv: list[str] | None = None) -> dict:
    return run_cli(_parser(), argv,
                   lambda args: sample_from_checkpoint(args) if args.sample else train(args))


def train(args: argparse.Namespace) -> dict:
    if args.smoke:
        _smoke(args)
    if args.distributed:
        eg.distributed.init()
        eg.distributed.silence_other_ranks()
    t_start = time.perf_counter()

    corpus, name = load_text(args)
    os.makedirs(args.out_dir, exist_ok=True)
    tok = BPETokenizer.train(corpus.train, args.vocab)
    tok_path = os.path.join(args.out_dir, "tokenizer.json")
    tok.save(tok_path)
    train_ids, val_ids = stream(tok, corpus.train), stream(tok, corpus.val)
    V = tok.vocab_size
    print(f"corpus ({name}): {len(corpus.train)} train / {len(corpus.val)} validation "
          f"documents, {corpus.chars:,} characters; BPE vocabulary {V}; {len(train_ids):,} train "
          f"and {len(val_ids):,} validation tokens "
          f"({corpus.chars / (len(train_ids) + len(val_ids)):.2f} characters/token)")
    for part, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) < args.context + 2:
            raise ValueError(f"--data: the {part} text is {len(ids)} tokens, fewer than one "
                             f"window of --context {args.context} + 2; use more text or a "
                             f"smaller --context")

    config = {"vocab": V, "d_model": args.d_model, "heads": args.heads, "layers": args.layers,
              "dropout": args.dropout, "max_len": args.context + args.max_new_tokens + 8}
    with open(os.path.join(args.out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    eg.manual_seed(args.seed)
    model = build_model(config, args.device)
    n_params = sum(int(np.prod(p.shape)) for p in model.parameters())
    lr = eg.tensor(args.lr, device=args.device) if args.jit else args.lr
    opt = nn.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, capturable=args.jit)
    sched = warmup_cosine(opt, args.warmup, args.steps, min_ratio=0.1)
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
    ckpt = os.path.join(args.out_dir, "checkpoint.npz")
    hist = nn.train(model, opt, batch_fn, loss_fn, steps=args.steps, scheduler=sched,
                    clip_norm=1.0, eval_fn=evaluate, eval_every=args.eval_every,
                    checkpoint=ckpt, checkpoint_every=args.eval_every, resume=args.resume,
                    log=log, print_every=max(1, args.eval_every // 4), seed=args.seed,
                    jit=args.jit, distributed=args.distributed, tokens_fn=lambda b: B * T)
    records = nn.read_log(log)
    val_loss = [r["val_loss"] for r in records if "val_loss" in r][-1]
    print(f"ours: {'pass' if val_loss < baseline else 'MISS'}: validation loss {val_loss:.3f} "
          f"nats/token (perplexity {math.exp(val_loss):.1f}) vs unigram {baseline:.3f} "
          f"({math.exp(baseline):.0f}): the model "
          f"{'uses' if val_loss < baseline else 'does NOT yet use'} the context "
          f"({(baseline - val_loss) / math.log(2):+.2f} bits/token)")
    png = os.path.join(args.out_dir, "loss.png")
    drawn = nn.plot_losses(log, png, title=f"decoder-only LM on {name}",
                           baselines={f"unigram baseline {baseline:.2f}": baseline})

    samples = sample_texts(model, tok, args)
    elapsed = time.perf_counter() - t_start
    print(f"total time {elapsed:.0f}s")
    report_files({"tokenizer": tok_path, "checkpoint": ckpt, "model config": os.path.join(
        args.out_dir, "config.json"), "training log": log, "loss curve": png if drawn else None})
    print(f"sample again: python examples/lm.py --sample --checkpoint {ckpt} --prompt \"...\"")
    return {"val_loss": val_loss, "unigram_loss": baseline, "samples": samples,
            "history": hist, "vocab": V, "params": n_params, "seconds": elapsed}


if __name__ == "__main__":
    main()
