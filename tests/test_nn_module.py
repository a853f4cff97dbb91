"""nn.Module, Parameter, containers, initializers, state_dict and device/dtype moves."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import engine as eg
from engine import nn
from engine.errors import DTypeError, GradError, ShapeError


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.scale = nn.Parameter(eg.ones(4))
        self.register_buffer("count", eg.zeros(1))
        self.register_buffer("cache", eg.zeros(2), persistent=False)
        self.b = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.b(self.a(x) * self.scale)


def test_from_engine_import_nn_is_the_package():
    import nn as pkg
    assert nn is pkg
    assert eg.nn is pkg


def test_parameter_is_a_tensor_with_its_own_repr():
    p = nn.Parameter(eg.zeros(2))
    assert isinstance(p, eg.Tensor) and p.requires_grad and p.is_leaf
    assert repr(p).startswith("Parameter containing:\ntensor(")
    assert type(p * 2) is eg.Tensor                      # results are plain tensors
    assert not nn.Parameter(eg.zeros(2), requires_grad=False).requires_grad
    with pytest.raises(DTypeError):
        nn.Parameter(eg.tensor([1, 2]))                   # integers cannot require grad


def test_registration_order_names_and_counts():
    m = Tiny()
    names = [n for n, _ in m.named_parameters()]
    assert names == ["scale", "a.weight", "a.bias", "b.weight"]   # own params first, then children
    assert [n for n, _ in m.named_buffers()] == ["count", "cache"]
    assert list(m.state_dict()) == ["scale", "count", "a.weight", "a.bias", "b.weight"]
    assert m.num_parameters() == 4 + 12 + 4 + 8
    assert [n for n, _ in m.named_modules()] == ["", "a", "b"]
    assert m.b.bias is None and "bias" in m.b._parameters
    # reassigning and deleting keep the registries consistent
    m.a = nn.Linear(3, 4, bias=False)
    assert [n for n, _ in m.named_parameters()] == ["scale", "a.weight", "b.weight"]
    del m.b
    assert [n for n, _ in m.named_modules()] == ["", "a"]


def test_shared_parameter_listed_once():
    m = nn.Module()
    m.x = nn.Linear(2, 2)
    m.y = nn.Linear(2, 2)
    m.y.weight = m.x.weight
    assert len(list(m.parameters())) == 3
    assert m.num_parameters() == 4 + 2 + 2


def test_assignment_type_errors():
    m = Tiny()
    with pytest.raises(TypeError, match="scale is a parameter"):
        m.scale = eg.ones(4)
    with pytest.raises(TypeError, match="a is a submodule"):
        m.a = 3
    with pytest.raises(TypeError, match="count is a buffer"):
        m.count = [1.0]
    with pytest.raises(TypeError, match="defines no forward"):
        nn.Module()(1)

    class NoInit(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(eg.zeros(1))
    with pytest.raises(AttributeError, match=r"must call super\(\).__init__\(\)"):
        NoInit()


def test_train_eval_zero_grad_requires_grad():
    m = Tiny()
    m.eval()
    assert not m.training and not m.a.training
    m.train()
    assert m.b.training
    m(eg.ones(2, 3)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad(set_to_none=False)
    assert all(float(np.abs(p.grad.numpy()).max()) == 0.0 for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    m.requires_grad_(False)
    assert not any(p.requires_grad for p in m.parameters())


def test_repr_is_readable():
    r = repr(Tiny())
    assert "Tiny(" in r and "(a): Linear(in_features=3, out_features=4, bias=True)" in r
    assert "(b): Linear(in_features=4, out_features=2, bias=False)" in r


def test_state_dict_round_trip_and_errors():
    src, dst = Tiny(), Tiny()
    src.count[...] = 5.0
    ids = [id(p) for p in dst.parameters()]
    res = dst.load_state_dict(src.state_dict())
    assert res.missing_keys == [] and res.unexpected_keys == []
    assert [id(p) for p in dst.parameters()] == ids             # same objects, new values
    for (n, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=n)

    sd = src.state_dict()
    del sd["a.bias"]
    with pytest.raises(nn.StateDictError, match=r"missing keys \['a.bias'\]"):
        dst.load_state_dict(sd)
    sd = dict(src.state_dict(), extra=np.zeros(1))
    with pytest.raises(nn.StateDictError, match=r"unexpected keys \['extra'\]"):
        dst.load_state_dict(sd)
    res = dst.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == ["extra"]
    bad = dict(src.state_dict())
    bad["b.weight"] = np.zeros((2, 4))
    before = dst.a.weight.numpy().copy()
    with pytest.raises(ShapeError, match=r"'b.weight' has shape \(2, 4\) in the state dict but \(4, 2\)"):
        dst.load_state_dict({k: (v.numpy() * 0 if k == "a.weight" else v) for k, v in bad.items()})
    np.testing.assert_array_equal(dst.a.weight.numpy(), before)   # nothing half-loaded


def test_to_dtype_and_device_keep_parameter_identity():
    m = Tiny()
    p = m.a.weight
    m.double()
    assert m.a.weight is p and p.dtype == np.float64 and m.count.dtype == np.float64
    assert m(eg.ones(1, 3, dtype=eg.float64)).dtype == np.float64
    m.to("cpu")
    assert m.a.weight is p and p.device == "cpu"
    m.float()
    assert p.dtype == np.float32
    with pytest.raises(ValueError, match="unknown device"):
        m.to("tpu")
    with pytest.raises(DTypeError):
        m.to(eg.int32)


def test_deepcopy_gives_independent_copies_on_the_same_device():
    m = Tiny()
    c = copy.deepcopy(m)
    assert c.a.weight is not m.a.weight
    np.testing.assert_array_equal(c.a.weight.numpy(), m.a.weight.numpy())
    out = c(eg.ones(1, 3)) + m(eg.ones(1, 3))            # same backend: tensors mix
    assert out.shape == (1, 2)
    with eg.no_grad():
        c.a.weight[...] = 0.0
    assert np.abs(m.a.weight.numpy()).max() > 0


def test_containers():
    seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    x = eg.randn(4, 2)
    ref = seq[2](eg.relu(seq[0](x)))
    np.testing.assert_allclose(seq(x).numpy(), ref.numpy())
    assert len(seq) == 3 and len(seq[:2]) == 2
    ml = nn.ModuleList([nn.Linear(1, 1)])
    ml.append(nn.Linear(1, 2)).extend([nn.Identity()])
    ml.insert(0, nn.Linear(2, 1))
    assert [type(m).__name__ for m in ml] == ["Linear", "Linear", "Linear", "Identity"]
    assert [n for n, _ in ml.named_parameters()][:2] == ["0.weight", "0.bias"]
    assert ml[0].in_features == 2
    with pytest.raises(TypeError, match="expected nn.Module"):
        ml.append(3)
    md = nn.ModuleDict({"enc": nn.Linear(1, 1)})
    assert "enc" in md and [n for n, _ in md.named_parameters()] == ["enc.weight", "enc.bias"]


# -- initializers ------------------------------------------------------------------------------

def test_init_bounds_and_moments():
    eg.manual_seed(0)
    w = eg.zeros(400, 300)
    nn.init.xavier_uniform_(w)
    a = math.sqrt(6 / 700)
    assert np.abs(w.numpy()).max() <= a and np.abs(w.numpy()).max() > 0.99 * a
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))               # default Linear init
    assert np.abs(w.numpy()).max() <= 1 / math.sqrt(400)
    nn.init.kaiming_normal_(w, nonlinearity="relu")
    assert abs(w.numpy().std() - math.sqrt(2 / 400)) < 0.002  # fan_in is the first axis here
    nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
    assert abs(w.numpy().std() - math.sqrt(2 / 300)) < 0.002
    nn.init.xavier_normal_(w, gain=2.0)
    assert abs(w.numpy().std() - 2 * math.sqrt(2 / 700)) < 0.002
    nn.init.normal_(w, 3.0, 0.5)
    assert abs(w.numpy().mean() - 3.0) < 0.01 and abs(w.numpy().std() - 0.5) < 0.01
    nn.init.constant_(w, 0.25)
    assert np.all(w.numpy() == 0.25)
    assert nn.init.calculate_gain("tanh") == 5 / 3
    with pytest.raises(ValueError, match="unknown nonlinearity"):
        nn.init.calculate_gain("swish")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        nn.init.xavier_uniform_(eg.zeros(3))


def test_init_is_reproducible_with_manual_seed():
    eg.manual_seed(7)
    a = nn.Linear(5, 5).weight.numpy().copy()
    eg.manual_seed(7)
    b = nn.Linear(5, 5).weight.numpy()
    np.testing.assert_array_equal(a, b)


def test_init_in_place_on_a_parameter_is_allowed_and_bumps_version():
    p = nn.Parameter(eg.zeros(2, 2))
    v = p._version[0]
    nn.init.ones_(p)
    assert p._version[0] > v and np.all(p.numpy() == 1)
    assert eg.is_grad_enabled()


def test_functional_call_swaps_and_restores():
    lin = nn.Linear(2, 1)
    w = eg.tensor([[1.0], [2.0]])
    out = nn.functional_call(lin, {"weight": w, "bias": eg.tensor([0.5])}, eg.tensor([[1.0, 1.0]]))
    assert out.item() == 3.5
    assert isinstance(lin.weight, nn.Parameter) and lin.weight is lin._parameters["weight"]
    with pytest.raises(nn.StateDictError, match="no parameters"):
        nn.functional_call(lin, {"nope": w}, eg.ones(1, 2))


def test_inplace_on_parameter_outside_no_grad_is_refused():
    p = nn.Parameter(eg.zeros(2))
    with pytest.raises(GradError):
        p -= 1.0
