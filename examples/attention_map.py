"""Where does a trained Transformer look? Attention weights of a small encoder-decoder.

    python examples/attention_map.py                                  # train (~30 s) and show
    python examples/attention_map.py --sentence "a small dog slept under the red car"
    python examples/attention_map.py --checkpoint runs/attention_map/model.npz   # reuse

The model learns a toy translation of simple English sentences (generated here, from
a small grammar) into pseudo-French with two reorderings that make the alignment
visible: the adjective follows its noun and the verb moves to the end:

    the cat sat on the mat   ->   le chat sur le tapis assis
    a big dog slept under the old tree   ->   un chien grand sous le arbre vieux dormi

After training (or loading --checkpoint; it is written after training), the sentence
is translated greedily and the attention weights are recorded: the decoder's
cross-attention (each target word against the source words: the alignment) and the
encoder's self-attention, for every layer and head. With matplotlib they are saved as
one PNG heatmap per head in --out-dir; without it (or with --text) they are printed as
tables. The weights come from nn.MultiheadAttention(need_weights=True,
average_attn_weights=False), switched on here by wrapping each attention's forward.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np

if __package__ in (None, ""):          # run as a script: make `engine`/`nn` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine as eg                                            # noqa: E402
from engine import nn                                          # noqa: E402
from examples.common import report_files, warmup_cosine        # noqa: E402

PAD, BOS, EOS, UNK = 0, 1, 2, 3
DET = {"the": "le", "a": "un"}
ADJ = {"big": "grand", "small": "petit", "red": "rouge", "old": "vieux", "black": "noir"}
NOUN = {"cat": "chat", "dog": "chien", "bird": "oiseau", "man": "homme", "mat": "tapis",
        "tree": "arbre", "house": "maison", "box": "boite", "car": "voiture", "bed": "lit"}
VERB = {"sat": "assis", "slept": "dormi", "stood": "debout", "jumped": "saute",
        "waited": "attendu", "played": "joue"}
PREP = {"on": "sur", "under": "sous", "near": "pres", "behind": "derriere", "in": "dans"}
LEXICON = {**DET, **ADJ, **NOUN, **VERB, **PREP}


def translate_words(words: list[str]) -> list[str]:
    """The reference translation: word by word, adjective after its noun, verb last."""
    out, verb, i = [], None, 0
    while i < len(words):
        w = words[i]
        if w in ADJ and i + 1 < len(words) and words[i + 1] in NOUN:
            out += [NOUN[words[i + 1]], ADJ[w]]
            i += 2
            continue
        if w in VERB:
            verb = VERB[w]
        else:
            out.append(LEXICON[w])
        i += 1
    return out + ([verb] if verb else [])


def random_sentence(rng: np.random.Generator) -> list[str]:
    """DET [ADJ] NOUN VERB PREP DET [ADJ] NOUN."""
    def pick(d: dict) -> str:
        return list(d)[int(rng.integers(len(d)))]

    def noun_phrase() -> list[str]:
        return [pick(DET)] + ([pick(ADJ)] if rng.random() < 0.5 else []) + [pick(NOUN)]
    return noun_phrase() + [pick(VERB), pick(PREP)] + noun_phrase()


class Vocab:
    def __init__(self) -> None:
        words = sorted(set(LEXICON) | set(LEXICON.values()))
        self.itos = ["<pad>", "<bos>", "<eos>", "<unk>"] + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def encode(self, words: list[str]) -> list[int]:
        return [self.stoi.get(w, UNK) for w in words]

    def decode(self, ids: list[int]) -> list[str]:
        return [self.itos[i] for i in ids if i not in (PAD, BOS, EOS)]


def pad(rows: list[list[int]]) -> np.ndarray:
    out = np.full((len(rows), max(map(len, rows))), PAD, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def build_model(vocab_size: int, args: argparse.Namespace) -> nn.Seq2SeqTransformer:
    eg.manual_seed(args.seed)
    return nn.Seq2SeqTransformer(vocab_size, d_model=args.d_model, nhead=args.heads,
                                 num_encoder_layers=args.layers, num_decoder_layers=args.layers,
                                 dim_feedforward=4 * args.d_model, dropout=0.0, max_len=32,
                                 pad_idx=PAD, device=args.device)


def train(model: nn.Seq2SeqTransformer, vocab: Vocab, args: argparse.Namespace) -> float:
    """Trains on fresh sentences every step; returns the held-out exact-match rate."""
    opt = nn.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = warmup_cosine(opt, max(1, args.steps // 10), args.steps, min_ratio=0.05)
    dev = args.device

    def batch_fn(step: int) -> tuple:
        r = np.random.default_rng([args.seed, 1, step])
        pairs = [(s, translate_words(s)) for s in (random_sentence(r) for _ in range(args.batch))]
        src = pad([vocab.encode(s) for s, _ in pairs])
        tgt = pad([[BOS] + vocab.encode(t) + [EOS] for _, t in pairs])
        return (eg.tensor(src, device=dev), eg.tensor(tgt[:, :-1], device=dev),
                eg.tensor(tgt[:, 1:], device=dev))

    def loss_fn(m: nn.Module, b: tuple) -> eg.Tensor:
        return nn.functional.cross_entropy(m(b[0], b[1]), b[2], ignore_index=PAD)

    os.makedirs(args.out_dir, exist_ok=True)
    log = os.path.join(args.out_dir, "log.jsonl")
    nn.train(model, opt, batch_fn, loss_fn, steps=args.steps, scheduler=sched, clip_norm=1.0,
             log=log, print_every=max(1, args.steps // 5), seed=args.seed)
    nn.plot_losses(log, os.path.join(args.out_dir, "loss.png"), title="attention_map training")
    r = np.random.default_rng([args.seed, 2])
    held = [random_sentence(r) for _ in range(200)]
    out = nn.generation.greedy(model, pad([vocab.encode(s) for s in held]), 12, bos=BOS, eos=EOS)
    return float(np.mean([vocab.decode(o) == translate_words(s) for o, s in zip(out, held)]))


def record_attention(model: nn.Seq2SeqTransformer) -> dict[str, list]:
    """Make every attention module keep its per-head weights (B, h, T, S) of each call."""
    store: dict[str, list] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            def forward(*a: Any, _orig: Any = mod.forward, _name: str = name, **k: Any) -> Any:
                k.update(need_weights=True, average_attn_weights=False)
                out, w = _orig(*a, **k)
                store.setdefault(_name, []).append(w.numpy())
                return out, w
            mod.forward = forward
    return store


def text_table(weights: np.ndarray, rows: list[str], cols: list[str], title: str) -> str:
    """Weights (T, S) as a table of percentages; the row maximum is starred."""
    width = max(5, *(len(c) for c in cols)) + 1
    lead = max(len(r) for r in rows) + 1
    lines = [title, " " * lead + "".join(f"{c:>{width}}" for c in cols)]
    for r, row in zip(rows, weights):
        top = int(np.argmax(row))
        cells = "".join(f"{100 * v:>{width - 1}.0f}{'*' if j == top else ' '}"
                        for j, v in enumerate(row))
        lines.append(f"{r:<{lead}}{cells}")
    return "\n".join(lines)


def save_heatmap(weights: np.ndarray, rows: list[str], cols: list[str], title: str,
                 path: str) -> bool:
    """One attention map as a PNG: queries down, keys across, each labelled with its token,
    a colour bar for the weight and each cell's percentage written in it. False (nothing
    written) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(2.2 + 0.6 * len(cols), 1.2 + 0.5 * len(rows)))
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0)
    for (i, j), v in np.ndenumerate(weights):
        ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                color="black" if v > 0.6 else "white")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("attends to (keys)")
    ax.set_ylabel("query (the word being produced)" if "cross" in title else "query")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentence", default="The cat sat on the mat")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--checkpoint", default=None,
                    help="load the model from here if it exists, else train and save it here "
                         "(default: OUT_DIR/model.npz, always retrained)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--text", action="store_true", help="print tables even with matplotlib")
    ap.add_argument("--out-dir", default="runs/attention_map", help="PNGs, log, checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps (the tests)")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.d_model, args.heads, args.layers = 6, 8, 16, 2, 1
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    vocab = Vocab()
    model = build_model(len(vocab.itos), args)
    ckpt = args.checkpoint or os.path.join(args.out_dir, "model.npz")
    heldout = None
    if args.checkpoint and os.path.exists(args.checkpoint):
        nn.load(args.checkpoint, model)
        print(f"loaded {args.checkpoint}")
    else:
        heldout = train(model, vocab, args)
        nn.save(ckpt, model)
        print(f"held-out exact translations: {heldout:.1%}; model saved to {ckpt}")

    words = args.sentence.lower().replace(".", "").split()
    unknown = [w for w in words if w not in LEXICON]
    if unknown:
        print(f"note: {unknown} are not in the toy vocabulary ({sorted(LEXICON)})")
    model.eval()
    store = record_attention(model)
    src = np.array([vocab.encode(words)])
    out = nn.generation.greedy(model, src, 12, bos=BOS, eos=EOS, use_cache=False)[0]
    target = vocab.decode(out)
    print(f"\n{' '.join(words)}  ->  {' '.join(target)}"
          + (f"   (reference: {' '.join(translate_words(words))})" if not unknown else ""))
    # One more teacher-forced pass over the produced target records clean (T, S) maps.
    for v in store.values():
        v.clear()
    # Row i of a decoder map is the position whose output is out[i]: label rows by it.
    with eg.no_grad():
        tgt_in = np.array([[BOS] + out[:-1]])
        model(eg.tensor(src, device=args.device), eg.tensor(tgt_in, device=args.device))
    rows_tgt = [vocab.itos[t] for t in out]
    maps = []
    for name, calls in store.items():
        w = calls[-1][0]                                    # (h, T, S) of the batch row
        if "multihead_attn" in name:
            kind, rows, cols = "cross", rows_tgt, words
        elif name.startswith("transformer.encoder"):
            kind, rows, cols = "encoder-self", words, words
        else:
            kind, rows, cols = "decoder-self", rows_tgt, rows_tgt
        layer = int(name.split("layers.")[1].split(".")[0])
        for h in range(w.shape[0]):
            maps.append((kind, layer, h, w[h], rows, cols))
    saved = []
    use_png = not args.text
    for kind, layer, h, w, rows, cols in maps:
        if kind == "decoder-self":
            continue
        title = f"{kind} attention, layer {layer}, head {h}"
        path = os.path.join(args.out_dir, f"{kind}_layer{layer}_head{h}.png")
        if use_png and save_heatmap(w, rows, cols, title, path):
            saved.append(path)
        elif args.text:
            print("\n" + text_table(w, rows, cols, title + " (% of the row; * = row maximum)"))
        else:
            use_png = False                                 # no matplotlib: one table below
    last = max(m[1] for m in maps if m[0] == "cross")
    mean_cross = np.mean([m[3] for m in maps if m[0] == "cross" and m[1] == last], axis=0)
    mean_title = f"cross-attention of the last decoder layer, mean over heads"
    mean_png = os.path.join(args.out_dir, "cross_mean_last_layer.png")
    if saved and save_heatmap(mean_cross, rows_tgt, words, mean_title, mean_png):
        saved.append(mean_png)
    print("\n" + text_table(mean_cross, rows_tgt, words,
                            mean_title + " (% of the row; * = row maximum)"))
    print(f"total time {time.perf_counter() - t0:.0f}s")
    files = {"checkpoint": ckpt}
    if heldout is not None:                             # trained in this run
        loss_png = os.path.join(args.out_dir, "loss.png")
        files.update({"training log": os.path.join(args.out_dir, "log.jsonl"),
                      "loss curve": loss_png if os.path.exists(loss_png) else None})
    files[f"heatmaps ({len(saved)} PNGs)" if saved else "heatmaps"] = args.out_dir if saved else None
    report_files(files)
    if not saved and not args.text:
        print("(--text prints the table of every head of every layer)")
    return {"translation": target, "heldout_exact": heldout, "maps": maps, "pngs": saved,
            "reference": translate_words(words) if not unknown else None}


if __name__ == "__main__":
    main()
