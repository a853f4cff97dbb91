"""Checkpoints: bit-exact round trips (model and optimizer), no pickle, atomic writes,
clear errors for another architecture, and torch weight import helpers."""
from __future__ import annotations

import os

import numpy as np
import pytest

import engine as eg
from engine import nn

F = nn.functional


def tiny_lm(seed=0, layers=1, d=8):
    eg.manual_seed(seed)
    return nn.CausalLM(11, d, 2, layers, 16, dropout=0.0)


def train(model, opt, steps, seed=0):
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        tokens = eg.tensor(rng.integers(0, 11, (2, 6)))
        loss = F.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("opt_name", ["AdamW", "SGD", "capturable"])
def test_save_load_round_trips_bit_exactly_and_training_resumes(tmp_path, opt_name):
    def make_opt(model):
        if opt_name == "SGD":
            return nn.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        return nn.optim.AdamW(model.parameters(), lr=3e-3, capturable=opt_name == "capturable")

    a = tiny_lm(0)
    opt_a = make_opt(a)
    train(a, opt_a, 3)
    path = tmp_path / "ckpt.npz"
    nn.save(path, a, opt_a, step=3, note="hello", schedule={"warmup": 4})

    b = tiny_lm(1)                                     # different initial values
    opt_b = make_opt(b)
    meta = nn.load(path, b, opt_b)
    assert meta == {"step": 3, "note": "hello", "schedule": {"warmup": 4}}
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert pa.dtype == pb.dtype
        np.testing.assert_array_equal(pa.numpy(), pb.numpy(), err_msg=n)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for k, v in sa["state"][i].items():
            w = sb["state"][i][k]
            if isinstance(v, eg.Tensor):
                assert v.dtype == w.dtype
                np.testing.assert_array_equal(v.numpy(), w.numpy())
            else:
                assert v == w
    # both continue identically: the optimizer state really was restored
    assert train(a, opt_a, 3, seed=9) == train(b, opt_b, 3, seed=9)
    for pa, pb in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(pa.numpy(), pb.numpy())


def test_file_is_plain_npz_without_pickle(tmp_path):
    m = tiny_lm()
    path = tmp_path / "m.ckpt"
    nn.save(path, m)
    assert path.exists() and not (tmp_path / "m.ckpt.npz").exists()    # the exact path
    with np.load(path, allow_pickle=False) as z:
        names = z.files
        assert all(z[k].dtype != object for k in names)
    assert "model/embed.token.weight" in names and "__meta__" in names
    assert not any(k.startswith("optim/") for k in names)
    with pytest.raises(nn.CheckpointError, match="holds no optimizer state"):
        nn.load(path, m, nn.optim.SGD(m.parameters(), lr=0.1))


def test_another_architecture_fails_naming_the_first_mismatch(tmp_path):
    path = tmp_path / "lm.npz"
    nn.save(path, tiny_lm(layers=1))
    wider = tiny_lm(d=12)
    before = wider.embed.weight.numpy().copy()
    with pytest.raises(nn.CheckpointError,
                       match=r"parameter 'embed.token.weight' has shape \(11, 8\) in the checkpoint "
                             r"but \(11, 12\) in the model"):
        nn.load(path, wider)
    np.testing.assert_array_equal(wider.embed.weight.numpy(), before)     # nothing loaded
    with pytest.raises(nn.CheckpointError,
                       match=r"parameter 'layers.1.self_attn.q.weight' \(8, 8\) is missing"):
        nn.load(path, tiny_lm(layers=2))
    nn.save(path, tiny_lm(layers=2))
    with pytest.raises(nn.CheckpointError, match=r"extra parameter 'layers.1.self_attn.q.weight'"):
        nn.load(path, tiny_lm(layers=1))
    s2s = nn.Seq2SeqTransformer(11, d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                dim_feedforward=16)
    with pytest.raises(nn.CheckpointError, match=r"saved from CausalLM\) does not fit Seq2SeqTransformer: "
                                                 r"entry 0 is 'embed.token.weight'"):
        nn.load(path, s2s)
    with pytest.raises(nn.CheckpointError, match="holds AdamW state, not SGD"):
        m = tiny_lm(layers=2)
        nn.save(path, m, nn.optim.AdamW(m.parameters()))
        nn.load(path, m, nn.optim.SGD(m.parameters(), lr=0.1))


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    good = tiny_lm(0)
    nn.save(path, good)
    original = path.read_bytes()

    def crash(f, **arrays):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("power cut")
    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        nn.save(path, tiny_lm(1))
    monkeypatch.undo()
    assert path.read_bytes() == original                          # the old file is intact
    assert os.listdir(tmp_path) == ["ckpt.npz"]                   # and no temporary is left
    fresh = tiny_lm(2)
    nn.load(path, fresh)
    np.testing.assert_array_equal(fresh.embed.weight.numpy(), good.embed.weight.numpy())


def test_unreadable_or_foreign_files(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(nn.CheckpointError, match="not a checkpoint"):
        nn.load(junk, tiny_lm())
    other = tmp_path / "other.npz"
    np.savez(other, w=np.zeros(3))
    with pytest.raises(nn.CheckpointError, match="no '__meta__' entry"):
        nn.load(other, tiny_lm())
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        nn.save(tmp_path / "x.npz", tiny_lm(), when=object())


def test_float64_model_round_trip(tmp_path):
    m = tiny_lm().double()
    nn.save(tmp_path / "d.npz", m)
    n = tiny_lm(3).double()
    nn.load(tmp_path / "d.npz", n)
    for pa, pb in zip(m.parameters(), n.parameters()):
        assert pb.dtype == np.float64
        np.testing.assert_array_equal(pa.numpy(), pb.numpy())


# -- importing torch weights ----------------------------------------------------------------------

def test_convert_torch_state_dict_rejects_leftovers():
    m = nn.MultiheadAttention(4, 2)
    sd = {"in_proj_weight": np.zeros((12, 4)), "in_proj_bias": np.zeros(12),
          "out_proj.weight": np.zeros((4, 4)), "out_proj.bias": np.zeros(4), "bias_k": np.zeros(4)}
    with pytest.raises(nn.StateDictError, match=r"no place in MultiheadAttention: \['bias_k'\]"):
        nn.convert_torch_state_dict(m, sd)
    nn.load_torch_state_dict(m, {k: v for k, v in sd.items() if k != "bias_k"})
    assert np.all(m.q.weight.numpy() == 0)


def test_load_torch_state_dict_transposes_linear_weights():
    seq = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    w0 = np.arange(6.0).reshape(2, 3)                 # torch layout (out, in)
    sd = {"0.weight": w0, "0.bias": np.ones(2), "2.weight": np.ones((1, 2)), "2.bias": np.zeros(1)}
    nn.load_torch_state_dict(seq, sd)
    np.testing.assert_array_equal(seq[0].weight.numpy(), w0.T)
