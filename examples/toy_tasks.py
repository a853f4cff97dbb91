"""The classic toy tasks, set up as in their published demos so a run can be compared.

    python examples/toy_tasks.py --task copy      # Annotated Transformer's copy task
    python examples/toy_tasks.py --task reverse   # the same setup, target reversed
    python examples/toy_tasks.py --task sort      # minGPT's demo.ipynb
    python examples/toy_tasks.py --task add       # minGPT's projects/adder
    python examples/toy_tasks.py --task copy --smoke

copy / reverse (encoder-decoder, "The Annotated Transformer", 2022 edition): vocabulary
11, sequences of 10 random symbols 1..10 whose first symbol is the start symbol 1; the
model is the paper's (N=2 layers, d_model=512, 8 heads, d_ff=2048, dropout 0.1), Adam
betas (0.9, 0.98), eps 1e-9, with the Noam schedule at half scale (the post's lr 0.5
times rate(factor 1, 400 warmup steps)) and no label smoothing (the post's
smoothing=0.0), batches of 80; 10 epochs of 20 batches (the 2018 edition's count; the
2022 post runs 20, and the Noam rate does not depend on the total, so these are its
first 10); after each epoch the per-token loss on 5 held-out batches. Then greedy
decoding of 1..10 and of the held-out sequences. (The 2018 edition trained on batches
of 30 at full scale; at some seeds that run decodes wrongly or its loss climbs back, as
the post's own log does at epoch 9.)

sort (decoder-only, minGPT demo.ipynb): sort 6 symbols from {0, 1, 2}; "gpt-nano"
(3 layers, 3 heads, 48 dims, ~0.09M parameters, pre-LN, learned positions, GELU),
AdamW betas (0.9, 0.95), weight decay 0.1, clip 1.0, batch 64, 2000 steps; 25% of the
729 inputs are held out. Two changes from minGPT's setup, each because a seed lost a
held-out input without it: the rate (minGPT: 5e-4, constant) warms up over 100 steps
to 1e-3 and decays by a cosine to a tenth; and half of the training draws come from
inputs where one symbol fills at least 4 of the 6 places (minGPT means to favour
repeats, but its test, at most 3 distinct symbols, holds for every input of 3
symbols). The one input whose sorted form starts with a 2 is [2, 2, 2, 2, 2, 2]; when
it is held out, nothing in training starts its answer with a 2, and with the old rate
one seed sorted it as [1, 2, 2, 2, 2, 2]. Score: exact match of the greedy continuation.

add (decoder-only, minGPT projects/adder): a + b for 2-digit a, b written as
digits "a b reversed(a+b)" ("8550531" is 85 + 50 = 135); gpt-nano; 500 of the 10,000
problems held out. Score: exact sums by greedy decoding on the held-out problems.

Every task ends with a summary that says whether the run met the published figure
("pass") or not ("MISS"); --out-dir gets the checkpoint, the JSONL log and, with
matplotlib, the loss curve.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import Any, Callable

import numpy as np

if __package__ in (None, ""):          # run as a script: make `engine`/`nn` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine as eg                                            # noqa: E402
from engine import nn                                          # noqa: E402
from examples.common import report_files, warmup_cosine        # noqa: E402

F = nn.functional

PUBLISHED = {
    "copy": ("The Annotated Transformer: greedy decoding of 1..10 gives 1 2 3 4 5 6 7 8 9 10; "
             "its 2018 log has the eval loss below 0.35 from epoch 7 (then 0.43 at epoch 9)"),
    "reverse": ("no published figure for reversal; held to the copy task's: exact greedy "
                "decoding, eval loss below 0.35 and staying there"),
    "sort": "minGPT demo.ipynb (gpt-nano, 2000 steps): 5000/5000 = 100.00% correct",
    "add": ("minGPT play_math.ipynb (2-layer GPT): 1000/1000 = 100.00% of held-out sums; "
            "projects/adder (gpt-nano, reversed sums) prints its score as it trains"),
}
# What a run must reach to count as meeting the published figure.
TARGET_EXACT = {"sort": 0.995, "add": 0.998}
LOSS_BAR = 0.35


# -- copy / reverse: the encoder-decoder -----------------------------------------------------

def seq2seq_batch(rng: np.random.Generator, batch: int, vocab: int, length: int,
                  reverse: bool) -> tuple[np.ndarray, np.ndarray]:
    """The Annotated Transformer's data_gen: random symbols 1..V-1, the first set to the
    start symbol 1; the target is the source (copy) or 1 + the rest reversed."""
    src = rng.integers(1, vocab, (batch, length))
    src[:, 0] = 1
    tgt = src.copy()
    if reverse:
        tgt[:, 1:] = src[:, :0:-1]
    return src, tgt


def run_seq2seq(args: argparse.Namespace) -> dict:
    V, L = args.vocab, args.length
    reverse = args.task == "reverse"
    eg.manual_seed(args.seed)
    model = nn.Seq2SeqTransformer(V, d_model=args.d_model, nhead=args.heads,
                                  num_encoder_layers=args.layers, num_decoder_layers=args.layers,
                                  dim_feedforward=args.ff, dropout=args.dropout,
                                  share_embeddings=False, tie_output=False, max_len=64,
                                  device=args.device)
    jit = args.jit
    opt = nn.optim.Adam(model.parameters(), lr=eg.tensor(1.0, device=args.device) if jit else 1.0,
                        betas=(0.9, 0.98), eps=1e-9, capturable=jit)
    sched = nn.optim.NoamLR(opt, args.d_model, args.warmup, scale=args.noam_factor)
    steps = args.epochs * args.batches
    dev = args.device
    print(f"{args.task}: Seq2SeqTransformer N={args.layers}, d_model={args.d_model}, "
          f"{args.heads} heads, d_ff={args.ff}, {model.num_parameters():,} parameters; "
          f"{args.epochs} epochs x {args.batches} batches of {args.batch}")

    def batch_fn(step: int) -> tuple:
        src, tgt = seq2seq_batch(np.random.default_rng([args.seed, 1, step]), args.batch, V, L,
                                 reverse)
        return (eg.tensor(src, device=dev), eg.tensor(tgt[:, :-1], device=dev),
                eg.tensor(tgt[:, 1:], device=dev))

    def loss_fn(m: nn.Module, b: tuple) -> eg.Tensor:
        return F.cross_entropy(m(b[0], b[1]), b[2], label_smoothing=args.label_smoothing)

    eval_batches = [seq2seq_batch(np.random.default_rng([args.seed, 2, i]), args.batch, V, L,
                                  reverse) for i in range(args.eval_batches)]
    held_src = np.concatenate([s for s, _ in eval_batches])
    held_tgt = np.concatenate([t for _, t in eval_batches])

    def evaluate(m: nn.Module) -> dict:
        """Per-token loss on the held-out batches (teacher forcing), as the Annotated
        Transformer prints after each epoch, and greedy-decoding token accuracy."""
        m.eval()
        with eg.no_grad():
            total = sum(float(F.cross_entropy(m(eg.tensor(s, device=dev),
                                                eg.tensor(t[:, :-1], device=dev)),
                                              eg.tensor(t[:, 1:], device=dev),
                                              reduction="sum").item())
                        for s, t in eval_batches)
        out = np.array(nn.generation.greedy(m, held_src, L - 1, bos=1))
        return {"eval_loss": total / held_tgt[:, 1:].size,
                "token_acc": float((out == held_tgt[:, 1:]).mean()),
                "exact": float((out == held_tgt[:, 1:]).all(axis=1).mean())}

    hist = _train(args, model, opt, sched, batch_fn, loss_fn, evaluate, steps,
                  eval_every=args.batches, tokens=args.batch * (2 * L - 1))
    losses = [h["eval_loss"] for h in hist if "eval_loss" in h]
    demo_src = (np.arange(L)[None] % (V - 1)) + 1          # 1 2 ... 10, as in the post
    demo = [1] + nn.generation.greedy(model, demo_src, L - 1, bos=1)[0]
    expect = demo_src[0].tolist() if not reverse else [1] + demo_src[0, :0:-1].tolist()
    final = hist[-1]
    settled = settled_epoch(losses, LOSS_BAR)
    ok = demo == expect and settled is not None
    print(f"\nper-token eval loss by epoch: {' '.join(f'{x:.2f}' for x in losses)}")
    print(f"greedy decoding of {demo_src[0].tolist()}: {demo} "
          f"({'exact' if demo == expect else 'WRONG, want ' + str(expect)})")
    print(f"held-out greedy decoding: token accuracy {final['token_acc']:.2%}, exact sequences "
          f"{final['exact']:.2%} of {len(held_src)}")
    loss_claim = (f"below {LOSS_BAR} from epoch {settled} on and stays below" if settled
                  else f"not below {LOSS_BAR} at the end")
    print(f"ours:      {'pass' if ok else 'MISS'}: eval loss {losses[-1]:.3f} after "
          f"{len(losses)} epochs, {loss_claim}; 1..10 decoded "
          f"{'exactly' if demo == expect else 'WRONGLY'} (a pass needs both); {final['exact']:.2%} "
          f"of held-out sequences exact")
    print(f"published: {PUBLISHED[args.task]}")
    return {"eval_losses": losses, "token_acc": final["token_acc"], "exact": final["exact"],
            "demo": demo, "demo_ok": demo == expect, "settled_epoch": settled, "passed": ok,
            "history": hist}


def settled_epoch(losses: list[float], bar: float) -> int | None:
    """The first epoch (1-based) from which every eval loss is below `bar`, or None when
    the last one is not."""
    settled = None
    for epoch, loss in enumerate(losses, 1):
        if loss >= bar:
            settled = None
        elif settled is None:
            settled = epoch
    return settled


# -- sort / add: the decoder-only model --------------------------------------------------------

def sort_data(seed: int, length: int = 6, symbols: int = 3) -> dict:
    """All symbols**length inputs, a seeded 25% held out; prompt = input, answer = sorted."""
    inputs = np.array(list(itertools.product(range(symbols), repeat=length)), dtype=np.int64)
    perm = np.random.default_rng([seed, 7]).permutation(len(inputs))
    n_test = len(inputs) // 4
    test, train = inputs[np.sort(perm[:n_test])], inputs[perm[n_test:]]
    few = np.array([np.bincount(r, minlength=symbols).max() >= length - 2 for r in train])
    return {"train": train, "train_few": train[few], "test": test, "vocab": symbols,
            "prompt": length, "answer": length,
            "solve": lambda x: np.sort(x, axis=1)}


def add_data(seed: int, ndigit: int = 2) -> dict:
    """All (10**n)**2 problems a + b as digits of a, b and reversed(a + b); 500 held out."""
    num = (10 ** ndigit) ** 2
    perm = np.random.default_rng([seed, 8]).permutation(num)
    n_test = min(num // 5, 500)

    def render(ix: np.ndarray) -> np.ndarray:
        a, b = ix // 10 ** ndigit, ix % 10 ** ndigit
        c = a + b
        cols = [(a // 10 ** k) % 10 for k in range(ndigit - 1, -1, -1)]
        cols += [(b // 10 ** k) % 10 for k in range(ndigit - 1, -1, -1)]
        cols += [(c // 10 ** k) % 10 for k in range(ndigit + 1)]        # reversed sum
        return np.stack(cols, axis=1).astype(np.int64)

    return {"train": render(perm[n_test:]), "test": render(np.sort(perm[:n_test])), "vocab": 10,
            "prompt": 2 * ndigit, "answer": ndigit + 1, "solve": None}


def run_causal(args: argparse.Namespace) -> dict:
    data = sort_data(args.seed) if args.task == "sort" else add_data(args.seed)
    P, A, V = data["prompt"], data["answer"], data["vocab"]
    if args.task == "sort":
        full_train = np.concatenate([data["train"], data["solve"](data["train"])], axis=1)
        full_few = np.concatenate([data["train_few"], data["solve"](data["train_few"])], axis=1)
        full_test = np.concatenate([data["test"], data["solve"](data["test"])], axis=1)
    else:
        full_train, full_few, full_test = data["train"], None, data["test"]
    eg.manual_seed(args.seed)
    model = nn.CausalLM(V, d_model=args.d_model, nhead=args.heads, num_layers=args.layers,
                        dim_feedforward=args.ff, dropout=args.dropout, activation="gelu_tanh",
                        max_len=P + A, positional="learned", scale_embedding=False,
                        norm_first=True, tie_weights=False, emb_init_std=0.02, device=args.device)
    jit = args.jit
    lr: Any = eg.tensor(args.lr, device=args.device) if jit else args.lr
    opt = nn.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                         capturable=jit)
    sched = warmup_cosine(opt, args.warmup, args.steps, min_ratio=0.1) \
        if args.cosine else None
    dev = args.device
    print(f"{args.task}: CausalLM (gpt-nano style) {args.layers} layers, {args.heads} heads, "
          f"d_model={args.d_model}, {model.num_parameters():,} parameters; {args.steps} steps "
          f"of {args.batch}; {len(full_train)} training and {len(full_test)} held-out problems")

    def batch_fn(step: int) -> tuple:
        r = np.random.default_rng([args.seed, 1, step])
        rows = full_train[r.integers(0, len(full_train), args.batch)]
        if full_few is not None:              # half the draws favour runs of one symbol
            boost = r.random(args.batch) < 0.5
            rows[boost] = full_few[r.integers(0, len(full_few), int(boost.sum()))]
        x, y = rows[:, :-1].copy(), rows[:, 1:].copy()
        y[:, :P - 1] = -100                   # loss only where the answer is predicted
        return eg.tensor(x, device=dev), eg.tensor(y, device=dev)

    def loss_fn(m: nn.Module, b: tuple) -> eg.Tensor:
        return F.cross_entropy(m(b[0]), b[1], ignore_index=-100)

    def score(m: nn.Module, rows: np.ndarray) -> tuple[float, np.ndarray]:
        out = np.array(nn.generation.greedy(m, rows[:, :P], A))
        ok = (out == rows[:, P:]).all(axis=1)
        return float(ok.mean()), out

    probe = np.random.default_rng([args.seed, 3]).permutation(len(full_train))[:1000]
    train_probe = full_train[probe]

    def evaluate(m: nn.Module) -> dict:
        m.eval()
        return {"test_exact": score(m, full_test)[0], "train_exact": score(m, train_probe)[0]}

    hist = _train(args, model, opt, sched, batch_fn, loss_fn, evaluate, args.steps,
                  eval_every=args.eval_every, tokens=args.batch * (P + A - 1))
    acc, out = score(model, full_test)
    wrong = np.flatnonzero(~(out == full_test[:, P:]).all(axis=1))
    print(f"\nheld-out exact: {acc:.2%} ({len(full_test) - len(wrong)}/{len(full_test)}); "
          f"training probe {hist[-1]['train_exact']:.2%}")
    for i in wrong[:3]:
        print(f"  miss: {_show(args.task, full_test[i, :P], out[i])} "
              f"(want {_show(args.task, full_test[i, :P], full_test[i, P:])})")
    for i in range(2):
        print(f"  e.g. {_show(args.task, full_test[i, :P], out[i])}")
    ok = acc >= TARGET_EXACT[args.task]
    print(f"ours:      {'pass' if ok else 'MISS'}: {acc:.2%} exact on {len(full_test)} held-out "
          f"problems after {args.steps} steps (a pass needs >= {TARGET_EXACT[args.task]:.1%})")
    print(f"published: {PUBLISHED[args.task]}")
    return {"test_exact": acc, "passed": ok, "history": hist, "params": model.num_parameters()}


def _show(task: str, prompt: np.ndarray, answer: np.ndarray) -> str:
    if task == "sort":
        return f"sort {prompt.tolist()} -> {answer.tolist()}"
    a, b = prompt[0] * 10 + prompt[1], prompt[2] * 10 + prompt[3]
    return f"{a} + {b} = {int(''.join(map(str, answer[::-1])))}"


# -- shared ------------------------------------------------------------------------------------

def _train(args: argparse.Namespace, model: nn.Module, opt: Any, sched: Any,
           batch_fn: Callable, loss_fn: Callable, evaluate: Callable, steps: int,
           eval_every: int, tokens: int) -> list[dict]:
    os.makedirs(args.out_dir, exist_ok=True)
    log = os.path.join(args.out_dir, "log.jsonl")
    ckpt = os.path.join(args.out_dir, "checkpoint.npz")
    t0 = time.perf_counter()
    hist = nn.train(model, opt, batch_fn, loss_fn, steps=steps, scheduler=sched,
                    clip_norm=args.clip, eval_fn=evaluate, eval_every=eval_every, log=log,
                    checkpoint=ckpt, print_every=max(1, eval_every // 2), seed=args.seed,
                    jit=args.jit, tokens_fn=lambda b: tokens)
    print(f"training took {time.perf_counter() - t0:.0f}s")
    png = os.path.join(args.out_dir, "loss.png")
    drawn = nn.plot_losses(log, png, title=f"toy task: {args.task}")
    report_files({"checkpoint": ckpt, "training log": log, "loss curve": png if drawn else None})
    return hist


DEFAULTS = {
    # published setups (see the module docstring)
    "copy": dict(d_model=512, heads=8, layers=2, ff=2048, dropout=0.1, batch=80, epochs=10,
                 batches=20, warmup=400, noam_factor=0.5, clip=None),
    "reverse": dict(d_model=512, heads=8, layers=2, ff=2048, dropout=0.1, batch=80, epochs=10,
                    batches=20, warmup=400, noam_factor=0.5, clip=None),
    "sort": dict(d_model=48, heads=3, layers=3, ff=192, dropout=0.1, batch=64, steps=2000,
                 lr=1e-3, warmup=100, clip=1.0, eval_every=500, cosine=True),
    "add": dict(d_model=48, heads=3, layers=3, ff=192, dropout=0.1, batch=64, steps=2500,
                lr=1e-3, warmup=100, clip=1.0, eval_every=500, cosine=True),
}
SMOKE = {
    "copy": dict(d_model=16, heads=2, layers=1, ff=32, batch=8, epochs=2, batches=3,
                 eval_batches=1, warmup=4),
    "reverse": dict(d_model=16, heads=2, layers=1, ff=32, batch=8, epochs=2, batches=3,
                    eval_batches=1, warmup=4),
    "sort": dict(d_model=12, heads=2, layers=1, ff=24, batch=8, steps=6, eval_every=3, warmup=2),
    "add": dict(d_model=12, heads=2, layers=1, ff=24, batch=8, steps=6, eval_every=3, warmup=2),
}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["copy", "reverse", "sort", "add"], default="copy",
                    help="which task to train (default copy)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps (the tests)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the initial weights, the data and dropout (default 0)")
    ap.add_argument("--out-dir", default=None,
                    help="checkpoint, log and loss curve (default runs/toy_TASK)")
    ap.add_argument("--jit", action="store_true", help="compile the training step (eg.jit)")
    g = ap.add_argument_group("model and training (defaults: the published setup of the task)")
    for name, kind, text in [
            ("d-model", int, "model width"),
            ("heads", int, "attention heads"),
            ("layers", int, "layers (copy/reverse: each of encoder and decoder)"),
            ("ff", int, "feed-forward width"),
            ("dropout", float, "dropout probability"),
            ("batch", int, "sequences per training step"),
            ("epochs", int, "copy/reverse: epochs, each followed by an evaluation"),
            ("batches", int, "copy/reverse: training batches per epoch"),
            ("eval-batches", int, "copy/reverse: held-out batches scored after each epoch"),
            ("steps", int, "sort/add: training steps"),
            ("lr", float, "sort/add: peak learning rate (AdamW)"),
            ("warmup", int, "warmup steps of the learning-rate schedule"),
            ("clip", float, "clip the gradient norm to this (sort/add: 1.0; copy: none)"),
            ("eval-every", int, "sort/add: evaluate every this many steps"),
            ("noam-factor", float, "copy/reverse: scale of the Noam schedule"),
            ("label-smoothing", float, "copy/reverse: label smoothing of the loss")]:
        g.add_argument(f"--{name}", type=kind, default=None, help=text)
    g.add_argument("--cosine", action=argparse.BooleanOptionalAction, default=None,
                   help="warmup-cosine schedule for sort/add (default on; --no-cosine: constant lr)")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    cfg = dict(vocab=11, length=10, eval_batches=5, noam_factor=1.0, label_smoothing=0.0,
               cosine=False, lr=5e-4, eval_every=500, steps=2000)
    cfg.update(DEFAULTS[args.task])
    if args.smoke:
        cfg.update(SMOKE[args.task])
    for k, v in cfg.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.out_dir is None:
        args.out_dir = os.path.join("runs", f"toy_{args.task}")
    t0 = time.perf_counter()
    result = run_seq2seq(args) if args.task in ("copy", "reverse") else run_causal(args)
    result["seconds"] = time.perf_counter() - t0
    print(f"total time {result['seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()
