"""A clear error for every bad input: constructors, optimizers, schedules, generation,
tensor arguments, and checkpoint / tokenizer files. Each error is an engine error that
is also the built-in a Python user catches (ValueError / TypeError), and its message
names the callee and the argument."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import engine as eg
from engine import nn
from engine.errors import ArgumentError, ArgumentTypeError, EngineError

NAN, INF = float("nan"), float("inf")


def _lm(**kw):
    eg.manual_seed(0)
    return nn.CausalLM(11, d_model=8, nhead=2, num_layers=1, dim_feedforward=16, dropout=0.0,
                       max_len=16, **kw)


def _params():
    return [nn.Parameter(eg.zeros(3))]


def _sgd():
    return nn.optim.SGD(_params(), lr=eg.tensor(0.1))


# (label, call, exception, words the message must contain)
CASES = [
    ("Linear(0, 3)", lambda: nn.Linear(0, 3), ArgumentError, ["Linear", "in_features", "0"]),
    ("Linear(2.5, 3)", lambda: nn.Linear(2.5, 3), ArgumentTypeError, ["Linear", "in_features"]),
    ("Linear(2.0, 3)", lambda: nn.Linear(2.0, 3), ArgumentTypeError, ["in_features"]),
    ("Linear(True, 3)", lambda: nn.Linear(True, 3), ArgumentTypeError, ["in_features"]),
    ("Linear(3, -1)", lambda: nn.Linear(3, -1), ArgumentError, ["out_features"]),
    ("Linear('3', 2)", lambda: nn.Linear("3", 2), ArgumentTypeError, ["in_features", "str"]),
    ("Embedding(0, 4)", lambda: nn.Embedding(0, 4), ArgumentError, ["num_embeddings"]),
    ("Embedding(4, 2.5)", lambda: nn.Embedding(4, 2.5), ArgumentTypeError, ["embedding_dim"]),
    ("Embedding padding 1.5", lambda: nn.Embedding(4, 2, padding_idx=1.5), ArgumentTypeError,
     ["padding_idx"]),
    ("LayerNorm(0)", lambda: nn.LayerNorm(0), ArgumentError, ["LayerNorm"]),
    ("LayerNorm eps nan", lambda: nn.LayerNorm(4, eps=NAN), ArgumentError, ["eps", "nan"]),
    ("Dropout(1.5)", lambda: nn.Dropout(1.5), ArgumentError, ["Dropout", "p"]),
    ("Dropout(-0.1)", lambda: nn.Dropout(-0.1), ArgumentError, ["p"]),
    ("Dropout(nan)", lambda: nn.Dropout(NAN), ArgumentError, ["p"]),
    ("Dropout('0.1')", lambda: nn.Dropout("0.1"), ArgumentTypeError, ["p"]),
    ("MHA heads 0", lambda: nn.MultiheadAttention(8, 0), ArgumentError, ["num_heads"]),
    ("MHA dropout 1", lambda: nn.MultiheadAttention(8, 2, dropout=1.0), ArgumentError,
     ["dropout"]),
    ("FeedForward 0", lambda: nn.FeedForward(8, 0), ArgumentError, ["dim_feedforward"]),
    ("EncoderLayer nhead 2.0", lambda: nn.TransformerEncoderLayer(8, 2.0), ArgumentTypeError,
     ["nhead"]),
    ("CausalLM vocab 0", lambda: nn.CausalLM(0), ArgumentError, ["CausalLM", "vocab_size"]),
    ("CausalLM dropout nan", lambda: _lm_bad(dropout=NAN), ArgumentError, ["dropout"]),
    ("CausalLM layers 1.5", lambda: nn.CausalLM(11, 8, 2, 1.5), ArgumentTypeError,
     ["num_layers"]),
    ("Seq2Seq max_len 0", lambda: nn.Seq2SeqTransformer(11, max_len=0), ArgumentError,
     ["max_len"]),
    ("PositionalEncoding d 0", lambda: nn.PositionalEncoding(0), ArgumentError, ["d_model"]),
    ("Softmax dim 1.0", lambda: nn.Softmax(1.0), ArgumentTypeError, ["Softmax", "dim"]),
    ("MSELoss reduction", lambda: nn.MSELoss(reduction="avg"), ArgumentError, ["reduction"]),
    ("CrossEntropyLoss smoothing 2", lambda: nn.CrossEntropyLoss(label_smoothing=2.0),
     ArgumentError, ["label_smoothing"]),
    # optimizers, schedules, scaler, clipping
    ("AdamW lr nan", lambda: nn.optim.AdamW(_params(), lr=NAN), ArgumentError, ["AdamW", "lr"]),
    ("Adam lr inf", lambda: nn.optim.Adam(_params(), lr=INF), ArgumentError, ["lr"]),
    ("Adam lr -1", lambda: nn.optim.Adam(_params(), lr=-1.0), ArgumentError, ["lr"]),
    ("Adam lr tensor nan", lambda: nn.optim.Adam(_params(), lr=eg.tensor(NAN)), ArgumentError,
     ["lr"]),
    ("Adam lr tensor 1-d", lambda: nn.optim.Adam(_params(), lr=eg.ones(2)), ArgumentTypeError,
     ["lr", "0-d"]),
    ("Adam lr str", lambda: nn.optim.Adam(_params(), lr="0.1"), ArgumentTypeError, ["lr"]),
    ("Adam betas 1", lambda: nn.optim.Adam(_params(), betas=(0.9, 1.0)), ArgumentError,
     ["betas"]),
    ("Adam betas short", lambda: nn.optim.Adam(_params(), betas=(0.9,)), ArgumentTypeError,
     ["betas"]),
    ("Adam eps nan", lambda: nn.optim.Adam(_params(), eps=NAN), ArgumentError, ["eps"]),
    ("AdamW wd -1", lambda: nn.optim.AdamW(_params(), weight_decay=-1.0), ArgumentError,
     ["weight_decay"]),
    ("SGD momentum nan", lambda: nn.optim.SGD(_params(), lr=0.1, momentum=NAN), ArgumentError,
     ["momentum"]),
    ("SGD group lr", lambda: nn.optim.SGD([{"params": _params(), "lr": NAN}], lr=0.1),
     ArgumentError, ["SGD", "lr"]),
    ("WarmupCosine total 0", lambda: nn.optim.WarmupCosineLR(_sgd(), 0, 0), ArgumentError,
     ["total_steps"]),
    ("WarmupCosine warmup 1.5", lambda: nn.optim.WarmupCosineLR(_sgd(), 1.5, 10),
     ArgumentTypeError, ["warmup_steps"]),
    ("Noam d_model 0", lambda: nn.optim.NoamLR(_sgd(), 0), ArgumentError, ["d_model"]),
    ("LambdaLR not callable", lambda: nn.optim.LambdaLR(_sgd(), 3), TypeError, ["lr_lambda"]),
    ("GradScaler scale 0", lambda: nn.amp.GradScaler(init_scale=0.0), ArgumentError,
     ["init_scale"]),
    ("GradScaler growth 1", lambda: nn.amp.GradScaler(growth_factor=1.0), ArgumentError,
     ["growth_factor"]),
    ("GradScaler backoff 1", lambda: nn.amp.GradScaler(backoff_factor=1.0), ArgumentError,
     ["backoff_factor"]),
    ("GradScaler interval 0.5", lambda: nn.amp.GradScaler(growth_interval=0.5),
     ArgumentTypeError, ["growth_interval"]),
    ("clip max_norm nan", lambda: nn.optim.clip_grad_norm_(_params(), NAN), ArgumentError,
     ["max_norm"]),
    ("train steps 2.5", lambda: nn.train(_lm(), _sgd(), None, None, steps=2.5),
     ArgumentTypeError, ["train", "steps"]),
    ("train clip_norm 0", lambda: nn.train(_lm(), _sgd(), None, None, steps=1, clip_norm=0.0),
     ArgumentError, ["clip_norm"]),
    # generation: checked before the model runs
    ("generate num_beams 0", lambda: nn.generate(_lm(), [[1, 2]], 3, num_beams=0), ArgumentError,
     ["generate", "num_beams"]),
    ("generate temperature nan", lambda: nn.generate(_lm(), [[1, 2]], 3, do_sample=True,
                                                     temperature=NAN), ArgumentError,
     ["temperature"]),
    ("generate temperature 0", lambda: nn.generate(_lm(), [[1, 2]], 3, do_sample=True,
                                                   temperature=0.0), ArgumentError,
     ["temperature"]),
    ("generate top_k 2.5", lambda: nn.generate(_lm(), [[1, 2]], 3, do_sample=True, top_k=2.5),
     ArgumentTypeError, ["top_k"]),
    ("generate top_k 0", lambda: nn.generate(_lm(), [[1, 2]], 3, do_sample=True, top_k=0),
     ArgumentError, ["top_k"]),
    ("generate top_p 0", lambda: nn.generate(_lm(), [[1, 2]], 3, do_sample=True, top_p=0.0),
     ArgumentError, ["top_p"]),
    ("generate top_p 1.5", lambda: nn.generate(_lm(), [[1, 2]], 3, do_sample=True, top_p=1.5),
     ArgumentError, ["top_p"]),
    ("generate max_new_tokens -1", lambda: nn.generate(_lm(), [[1, 2]], -1), ArgumentError,
     ["max_new_tokens"]),
    ("generate max_new_tokens 2.0", lambda: nn.generate(_lm(), [[1, 2]], 2.0),
     ArgumentTypeError, ["max_new_tokens"]),
    ("beam_search num_return 0", lambda: nn.beam_search(_lm(), [[1, 2]], 3, num_return=0),
     ArgumentError, ["num_return"]),
    ("generate length_penalty nan", lambda: nn.generate(_lm(), [[1, 2]], 3, num_beams=2,
                                                        length_penalty=NAN), ArgumentError,
     ["length_penalty"]),
    ("BPE vocab_size 0", lambda: nn.BPETokenizer.train(["ab"], 0), ArgumentError,
     ["vocab_size"]),
    ("mask_tokens prob 2", lambda: nn.mask_tokens(np.zeros((1, 3), int), 10, mask_prob=2.0),
     ArgumentError, ["mask_prob"]),
    # tensor arguments of modules and nn.functional (Tensors only, as in PyTorch)
    ("Linear(list)", lambda: nn.Linear(2, 3)([1.0, 2.0]), ArgumentTypeError,
     ["Linear", "x", "list", "eg.tensor"]),
    ("Linear(ndarray)", lambda: nn.Linear(2, 3)(np.ones(2)), ArgumentTypeError,
     ["Linear", "ndarray"]),
    ("Embedding(list)", lambda: nn.Embedding(5, 2)([1, 2]), ArgumentTypeError,
     ["Embedding", "idx"]),
    ("CausalLM(ndarray)", lambda: _lm()(np.ones((1, 3), int)), ArgumentTypeError,
     ["CausalLM", "tokens"]),
    ("LayerNorm(float)", lambda: nn.LayerNorm(1)(1.0), ArgumentTypeError, ["LayerNorm"]),
    ("MHA key list", lambda: nn.MultiheadAttention(4, 2)(eg.ones(1, 2, 4), key=[[0.0]]),
     ArgumentTypeError, ["MultiheadAttention", "key"]),
    ("ReLU(list)", lambda: nn.ReLU()([1.0]), ArgumentTypeError, ["ReLU"]),
    ("CrossEntropyLoss target list", lambda: nn.CrossEntropyLoss()(eg.ones(2, 3), [0, 1]),
     ArgumentTypeError, ["CrossEntropyLoss", "target"]),
    ("F.cross_entropy(list)", lambda: nn.functional.cross_entropy([[1.0, 2.0]], eg.tensor([0])),
     ArgumentTypeError, ["cross_entropy", "logits"]),
    ("F.mse_loss ndarray", lambda: nn.functional.mse_loss(eg.ones(2), np.ones(2)),
     ArgumentTypeError, ["mse_loss", "target"]),
    ("F.softmax list", lambda: nn.functional.softmax([1.0, 2.0]), ArgumentTypeError,
     ["softmax"]),
    ("F.linear weight list", lambda: nn.functional.linear(eg.ones(2), [[1.0], [2.0]]),
     ArgumentTypeError, ["linear", "weight"]),
    ("F.dropout p 1.5", lambda: nn.functional.dropout(eg.ones(2), 1.5), ArgumentError, ["p"]),
    ("init.normal_ std -1", lambda: nn.init.normal_(eg.zeros(2), std=-1.0), ArgumentError,
     ["std"]),
    # engine: sizes, and one spelling per argument
    ("zeros(2.5)", lambda: eg.zeros(2.5, 3), ArgumentTypeError, ["zeros", "shape"]),
    ("ones(-1)", lambda: eg.ones(-1), ArgumentError, ["ones", "shape"]),
    ("randn((2, 1.5))", lambda: eg.randn((2, 1.5)), ArgumentTypeError, ["randn"]),
    ("full(2.5)", lambda: eg.full((2.5,), 1.0), ArgumentTypeError, ["full"]),
    ("sum axis and dim", lambda: eg.ones(2, 3).sum(axis=0, dim=1), ArgumentError,
     ["sum", "axis", "dim"]),
    ("eg.softmax axis and dim", lambda: eg.softmax(eg.ones(2, 3), axis=0, dim=1),
     ArgumentError, ["softmax"]),
    ("eg.cat of a tensor", lambda: eg.cat(eg.ones(2)), TypeError, ["concatenate"]),
    ("tensor of str", lambda: eg.tensor("abc"), TypeError, ["tensor", "str"]),
    ("tensor of None", lambda: eg.tensor(None), TypeError, ["tensor"]),
    ("ragged tensor", lambda: eg.tensor([[1, 2], [3]]), ValueError, ["tensor", "list"]),
    ("reshape(2.5, 2)", lambda: eg.ones(2, 3).reshape(2.5, 2), ArgumentTypeError, ["reshape"]),
    ("reshape(-2, -3)", lambda: eg.ones(2, 3).reshape(-2, -3), ValueError, ["reshape"]),
    ("sum(axis=1.5)", lambda: eg.ones(2, 3).sum(axis=1.5), ValueError, ["sum", "axis"]),
    ("expand_dims(1.5)", lambda: eg.ones(2).expand_dims(1.5), ArgumentTypeError,
     ["expand_dims"]),
    ("arange step 0", lambda: eg.arange(0, 5, 0), ArgumentError, ["arange", "step"]),
    ("eye(2.5)", lambda: eg.eye(2.5), ArgumentTypeError, ["eye"]),
    ("randint low >= high", lambda: eg.randint(3, 3, (2,)), ArgumentError, ["randint"]),
    ("one_hot 0 classes", lambda: eg.one_hot(eg.tensor([1]), 0), ArgumentError,
     ["one_hot", "num_classes"]),
    ("layer_norm eps -1", lambda: eg.layer_norm(eg.ones(2, 3), eps=-1.0), ArgumentError,
     ["layer_norm", "eps"]),
    ("load_state_dict(3)", lambda: _lm().load_state_dict(3), TypeError, ["load_state_dict"]),
    ("save a non-module", lambda: nn.save("unused.npz", 3), TypeError, ["nn.save", "Module"]),
    ("generate bos outside vocab", lambda: nn.generate(_lm(), [[1, 2]], 2, bos=11),
     ArgumentError, ["bos=11", "vocabulary"]),
    ("generate eos negative", lambda: nn.generate(_lm(), [[1, 2]], 2, eos=-5), ArgumentError,
     ["eos"]),
    ("generate max_new_tokens 0", lambda: nn.generate(_lm(), [[1, 2]], 0), ArgumentError,
     ["max_new_tokens"]),
]


def _lm_bad(**kw):
    return nn.CausalLM(11, d_model=8, nhead=2, num_layers=1, dim_feedforward=16, **kw)


@pytest.mark.parametrize("label,call,exc,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_engine_error(label, call, exc, words):
    with pytest.raises(exc) as info:
        call()
    assert isinstance(info.value, EngineError), type(info.value)
    assert isinstance(info.value, (ValueError, TypeError))
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)


def test_good_inputs_still_pass_the_checks():
    """NumPy integers count as ints, ints as floats, None where it is the default."""
    lin = nn.Linear(np.int64(3), 2)
    assert lin(eg.ones(1, 3)).shape == (1, 2)
    nn.optim.Adam(_params(), lr=1, betas=[0.5, 0.9], eps=0)
    nn.optim.AdamW(_params(), lr=eg.tensor(1e-3))
    nn.amp.GradScaler(init_scale=1024)
    nn.Dropout(0)
    nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), num_layers=2)
    nn.optim.clip_grad_norm_(_params(), 1.0, norm_type=math.inf)
    out = nn.generate(_lm(), [[1, 2]], 2, do_sample=True, top_k=np.int64(3), top_p=1.0,
                      temperature=1, rng=np.random.default_rng(0))
    assert len(out[0]) == 2
    assert eg.zeros(np.int64(2), 3).shape == (2, 3) and eg.zeros((2, 0)).shape == (2, 0)


def test_engine_functions_convert_array_likes_but_nn_refuses_them():
    """The documented split: eg.* follows NumPy (array-likes in), nn follows PyTorch."""
    np.testing.assert_allclose(eg.softmax([0.0, 0.0]).numpy(), [0.5, 0.5])
    np.testing.assert_allclose(eg.sum(np.arange(4.0), dim=0).numpy(), 6.0)
    with pytest.raises(TypeError, match="softmax"):
        nn.functional.softmax([0.0, 0.0])


def test_the_rules_apply_to_a_new_layer_by_argument_name():
    """A user layer gets the shared checks from its argument names, with no code of its own."""
    class Mine(nn.Module):
        def __init__(self, d_model: int, dropout: float = 0.1) -> None:
            super().__init__()
            self.lin = nn.Linear(d_model, d_model)

        def forward(self, x: eg.Tensor) -> eg.Tensor:
            return self.lin(x)
    with pytest.raises(ArgumentError, match="Mine: dropout"):
        Mine(4, dropout=2.0)
    with pytest.raises(ArgumentTypeError, match="Mine: d_model"):
        Mine(4.5)
    with pytest.raises(ArgumentTypeError, match="Mine: x must be a Tensor"):
        Mine(4)([1.0, 2.0, 3.0, 4.0])


# -- files ---------------------------------------------------------------------------------------

def _saved(tmp_path):
    path = tmp_path / "ckpt.npz"
    model = _lm()
    nn.save(path, model, nn.optim.AdamW(model.parameters()), step=3)
    return path


@pytest.mark.parametrize("damage", ["text", "empty", "truncated", "flipped", "foreign_npz",
                                    "bad_meta", "npy"])
def test_unreadable_checkpoints_raise_checkpoint_error_naming_the_file(tmp_path, damage):
    path = _saved(tmp_path)
    data = path.read_bytes()
    if damage == "text":
        path.write_text("step 3, loss 1.2\n")
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":               # the central directory survives, a member does not
        mid = len(data) // 3
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64])
                         + data[mid + 64:])
    elif damage == "foreign_npz":
        np.savez(path, w=np.zeros(3))
    elif damage == "bad_meta":
        np.savez(path, __meta__=np.array("{not json"))
    else:
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    with pytest.raises(nn.CheckpointError) as info:
        nn.load(path, _lm())
    assert str(path) in str(info.value)
    assert "pickled" not in str(info.value)
    assert os.listdir(tmp_path) == ["ckpt.npz"]


def test_a_missing_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        nn.load(tmp_path / "absent.npz", _lm())


@pytest.mark.parametrize("what", ["checkpoint", "tokenizer", "log"])
def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, what):
    """The write fails halfway (a full disk, an interrupt): the previous file survives
    and nothing else is left in the directory."""
    import nn.files

    real_replace = os.replace

    def fail_before_rename(src, dst):
        raise OSError(28, "No space left on device")
    if what == "checkpoint":
        path = _saved(tmp_path)
        save = lambda: nn.save(path, _lm())                              # noqa: E731
    elif what == "tokenizer":
        path = tmp_path / "tok.json"
        nn.CharTokenizer.train(["abc"]).save(path)
        save = lambda: nn.CharTokenizer.train(["xyz"]).save(path)      # noqa: E731
    else:
        path = tmp_path / "log.csv"
        from nn.training import _Log
        log = _Log(str(path), keep_until=None)
        log.append({"step": 1, "loss": 1.0})
        save = lambda: log.append({"step": 2, "loss": 0.5, "val_loss": 0.7})  # noqa: E731
    before = path.read_bytes()
    monkeypatch.setattr(nn.files.os, "replace", fail_before_rename)
    with pytest.raises(OSError, match="No space"):
        save()
    monkeypatch.setattr(nn.files.os, "replace", real_replace)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [path.name]


@pytest.mark.parametrize("content", ["", "not json at all", '{"type": "char", ', "[1, 2]",
                                     '{"type": "char", "special_tokens": '
                                     '["<pad>", "<bos>", "<eos>", "<unk>", "<mask>"]}',
                                     "\udcff"])
def test_unreadable_tokenizer_files_raise_tokenizer_error(tmp_path, content):
    path = tmp_path / "tok.json"
    if content == "\udcff":
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        path.write_text(content)
    with pytest.raises(nn.TokenizerError) as info:
        nn.load_tokenizer(path)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)
    json.dumps(str(info.value))
