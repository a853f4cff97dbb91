"""The CUDA backend, through the engine: registry-driven forward and gradient
checks, Tensor basics, RNG, fused kernels and a small nn model on device "cuda".

Every check runs in two modes:
- "gpu": the real CupyBackend on CuPy and a GPU (skipped, with the reason, when
  either is missing);
- "emulated": the same CupyBackend code driven by a CPU stand-in for CuPy whose
  `ElementwiseKernel` compiles the generated kernel bodies with the system C
  compiler and whose `RawKernel` runs the fused CUDA kernels on a pthread
  emulation of CUDA's thread model. Its arrays refuse implicit conversion to
  NumPy and reject host arrays in device functions, as CuPy's do, so host/device
  mix-ups in the engine fail here too. It validates the backend's Python side
  (dtype plans, scalar handling, layouts, launch parameters) without a GPU; only
  the GPU run proves CuPy/NVRTC themselves.
Tests at the end check the errors asking for "cuda" gives without CuPy or a GPU.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import hashlib
import sys
import types

import numpy as np
import pytest

import backends
import engine as eg
import ops
from backends import attnprint, cprint
from backends import cupy_backend as cb
from ops.elementwise import ElementwiseOp, _draw
from tests import test_cuda_codegen as codegen


# -- is there a real GPU? --------------------------------------------------------------------

def _gpu_skip_reason() -> str | None:
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:      # ImportError, CUDARuntimeError (no driver / no device), ...
        return f"no CuPy with a usable GPU here ({type(e).__name__}: {e}); {cb.INSTALL_HINT}"
    return None if count > 0 else "CuPy sees no CUDA GPU"


GPU_SKIP = _gpu_skip_reason()


# -- a CPU stand-in for CuPy ------------------------------------------------------------------

class DevArray:
    """An emulated device array: a NumPy array that will not pass for one. Operations
    that launch work on a GPU go through the emulated device (`_launch`), so a stream
    capture records them; those that read values on the host are refused during one."""

    __slots__ = ("a", "__weakref__")

    def __init__(self, a: np.ndarray) -> None:
        assert isinstance(a, np.ndarray)
        self.a = a

    shape = property(lambda self: self.a.shape)
    dtype = property(lambda self: self.a.dtype)
    ndim = property(lambda self: self.a.ndim)
    size = property(lambda self: self.a.size)
    flags = property(lambda self: self.a.flags)

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def get(self) -> np.ndarray:
        _host_read("ndarray.get")
        return self.a.copy()

    def set(self, arr, stream=None) -> None:
        _host_read("ndarray.set (a host-to-device copy)")
        assert isinstance(arr, np.ndarray) and arr.shape == self.shape
        self.a[...] = arr

    def astype(self, dtype, copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return _launch(lambda: self.a.astype(dtype), reads=(self,))

    def copy(self):
        return _launch(lambda: self.a.copy(), reads=())

    def view(self, dtype):
        return DevArray(self.a.view(dtype))

    def reshape(self, *shape):
        return _launch(lambda: self.a.reshape(*shape), reads=(self,))

    def transpose(self, *axes):
        return DevArray(self.a.transpose(*axes))

    def sum(self, axis=None, dtype=None, keepdims=False):
        return _launch(lambda: self.a.sum(axis=axis, dtype=dtype, keepdims=keepdims), reads=(self,))

    def max(self, axis=None, keepdims=False):
        return _launch(lambda: self.a.max(axis=axis, keepdims=keepdims), reads=(self,))

    def item(self):
        _host_read("ndarray.item")
        return self.a.item()

    def __len__(self):
        return len(self.a)

    def __bool__(self):
        _host_read("bool(ndarray)")
        return bool(self.a)

    def __float__(self):
        _host_read("float(ndarray)")
        return float(self.a)

    def __int__(self):
        _host_read("int(ndarray)")
        return int(self.a)

    def __getitem__(self, index):
        return _launch(lambda: self.a[_unwrap(index)], reads=(self,))

    def __setitem__(self, index, value):
        _launch_in_place(lambda: self.a.__setitem__(_unwrap(index), _unwrap(value)))

    def __repr__(self):
        return f"DevArray({self.a!r})"


def _binary(name):
    def method(self, other):
        return _launch(lambda: getattr(self.a, name)(_unwrap(other)), reads=())
    return method


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
              "__rtruediv__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
              "__and__", "__or__", "__neg__", "__invert__"):
    setattr(DevArray, _name, _binary(_name) if _name not in ("__neg__", "__invert__")
            else (lambda n: lambda self: _launch(lambda: getattr(self.a, n)(), reads=()))(_name))
DevArray.__hash__ = object.__hash__


def _unwrap(x):
    """Device arrays -> their data; host arrays are refused (CuPy rejects them too)."""
    if isinstance(x, DevArray):
        return x.a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}: a NumPy array reached a device function")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    return x


def _wrap(x):
    if isinstance(x, np.ndarray):
        return DevArray(x)
    if isinstance(x, np.generic):           # CuPy reductions give 0-d arrays, not scalars
        return DevArray(np.asarray(x))
    if isinstance(x, (list, tuple)):
        return type(x)(_wrap(v) for v in x)
    return x


# -- the emulated device's work queue: run now, or recorded by a stream capture -----------------

_DEVICE: list = []                         # the emulated device (one FakeCupy) when there is one


def _capture_ops():
    """The list recording launches when the current stream captures, else None. Work on
    another stream while a capture runs is refused (CUDA invalidates the capture)."""
    fake = _DEVICE[0] if _DEVICE else None
    if fake is None or fake.capturing is None:
        return None
    if fake.current_stream is not fake.capturing:
        fake.capturing.invalid = "work on another stream during the capture"
        raise RuntimeError("cudaErrorStreamCaptureImplicit: work on a stream that does not "
                           "capture while another stream captures")
    return fake.capturing.ops


def _host_read(what):
    """Host reads of device values are synchronous: refused during a capture."""
    fake = _DEVICE[0] if _DEVICE else None
    if fake is not None and fake.capturing is not None:
        fake.capturing.invalid = what
        raise RuntimeError(f"cudaErrorStreamCaptureUnsupported: operation not permitted when "
                           f"stream is capturing ({what})")


def _launch_in_place(run):
    """A kernel writing arrays that exist: run now, or recorded."""
    ops_ = _capture_ops()
    if ops_ is None:
        run()
    else:
        ops_.append(run)


def _launch(compute, reads=(), dest=None, allocates=True):
    """A kernel computing `compute()` (NumPy, from the arrays' memory when it runs) into
    `dest` or into a new array. During a capture nothing runs on the device: the new
    array still gets its shape (and meaningless values) from one run now, the launch is
    recorded, and the memory must come from a pool other than the default one (the
    engine's rule: a graph's buffers are its own). A result sharing memory with one of
    `reads` is a view: no launch."""
    if dest is not None:
        def write():
            dest.a[...] = compute()
        _launch_in_place(write)
        return dest
    ops_ = _capture_ops()
    with np.errstate(all="ignore"):
        value = compute()
    if isinstance(value, (list, tuple)):
        assert ops_ is None, "the emulation cannot record functions returning several arrays"
        return _wrap(value)
    if not isinstance(value, (np.ndarray, np.generic)):
        return value
    value = np.asarray(value)
    if any(np.may_share_memory(value, r.a) for r in reads if isinstance(r, DevArray)):
        return DevArray(value)
    out = DevArray(value.copy() if value.base is not None else value)
    if ops_ is not None:
        fake = _DEVICE[0]
        if fake.allocator is None:
            fake.capturing.invalid = "allocation from the default pool"
            raise RuntimeError("emulated device: a capture allocated from the default memory pool")
        if allocates:
            ops_.append(lambda: out.a.__setitem__(Ellipsis, compute()))
    return out


_C_CACHE: dict[str, ctypes.CDLL] = {}


def _build_c(source: str, tmp_dir) -> ctypes.CDLL:
    key = hashlib.sha1(source.encode()).hexdigest()[:16]
    if key not in _C_CACHE:
        src = tmp_dir / f"k{key}.c"
        src.write_text(source)
        so = tmp_dir / f"k{key}.so"
        res = codegen._run([codegen.CC, "-O1", "-std=c99", "-shared", "-fPIC", str(src), "-o", str(so), "-lm"])
        assert res.returncode == 0, f"C compiler failed:\n{res.stderr[:3000]}\n{source}"
        _C_CACHE[key] = ctypes.CDLL(str(so))
    return _C_CACHE[key]


class FakeCupy:
    """The parts of the `cupy` module the backend uses, on NumPy and the C compiler,
    with CUDA's streams, stream capture and graphs: launches on a capturing stream are
    recorded (nothing runs), `Graph.launch` runs them again in order on the memory they
    were recorded with, with the scalars they were recorded with."""

    ndarray = DevArray

    def __init__(self, tmp_dir, emu_lib, device_count: int = 2) -> None:
        fake = self
        self.tmp_dir, self.emu_lib = tmp_dir, emu_lib
        self.current_device = 0
        self.kernel_devices: list[int] = []   # the current device at each kernel launch
        self.matmul_ndims: list[tuple] = []   # (a.ndim, b.ndim) of each cupy.matmul call
        self.capturing = None                 # the stream capturing now
        self.allocator = None                 # set by using_allocator
        self.graph_launches = 0
        _DEVICE[:] = [self]

        class Device:
            def __init__(self, index: int = 0) -> None:
                self.index = index
                self.prev: list[int] = []

            def __enter__(self):
                self.prev.append(fake.current_device)
                fake.current_device = self.index
                return self

            def __exit__(self, *exc):
                fake.current_device = self.prev.pop()

        class Stream:
            def __init__(self, null=False, non_blocking=False):
                self.null, self.ops, self.invalid, self.prev = null, None, None, []

            def __enter__(self):
                self.prev.append(fake.current_stream)
                fake.current_stream = self
                return self

            def __exit__(self, *exc):
                fake.current_stream = self.prev.pop()

            def begin_capture(self, mode=None):
                if self.null:
                    raise RuntimeError("cannot capture on the default (legacy) stream")
                if fake.capturing is not None:
                    raise RuntimeError("another stream is capturing")
                fake.capturing, self.ops, self.invalid = self, [], None

            def end_capture(self):
                if fake.capturing is not self:
                    raise RuntimeError("cudaErrorIllegalState: the stream is not capturing")
                fake.capturing = None
                if self.invalid:
                    raise RuntimeError(f"cudaErrorStreamCaptureInvalidated ({self.invalid})")
                return Graph(self.ops)

            def is_capturing(self):
                return fake.capturing is self

            def synchronize(self):
                _host_read("stream.synchronize")

            def record(self, event=None):
                return types.SimpleNamespace(stream=self)

            def wait_event(self, event):
                pass

        class Graph:
            def __init__(self, ops_):
                self.ops = list(ops_)

            def launch(self, stream=None):
                assert fake.capturing is None, "graph launched during a capture"
                fake.graph_launches += 1
                for op in self.ops:
                    op()

        class MemoryPool:
            def malloc(self, nbytes):
                raise AssertionError("the emulation does not allocate through pools")

            def free_all_blocks(self):
                pass

            def total_bytes(self):
                return 0

        @contextlib.contextmanager
        def using_allocator(allocator=None):
            prev, fake.allocator = fake.allocator, allocator
            try:
                yield
            finally:
                fake.allocator = prev

        self.current_stream = Stream(null=True)
        self.cuda = types.SimpleNamespace(
            Device=Device, runtime=types.SimpleNamespace(getDeviceCount=lambda: device_count),
            Stream=Stream, Graph=Graph, MemoryPool=MemoryPool, using_allocator=using_allocator,
            get_current_stream=lambda: fake.current_stream)
        self.ElementwiseKernel = lambda *a, **k: _FakeElementwiseKernel(fake, *a, **k)
        self.RawKernel = lambda *a, **k: _FakeRawKernel(fake, *a, **k)
        self.ReductionKernel = lambda *a, **k: _FakeReductionKernel(fake, *a, **k)
        self.add = _FakeUfunc(self.__getattr__("add"), at=_add_at)

    def matmul(self, a, b, out=None):
        self.matmul_ndims.append((a.ndim, b.ndim))
        return self.__getattr__("matmul")(a, b, out=out)

    def asarray(self, a, dtype=None):
        if isinstance(a, DevArray):
            return a if dtype is None else a.astype(dtype, copy=False)
        _host_read("cupy.asarray of host data")
        return DevArray(np.array(a, dtype=dtype, copy=True))

    def asnumpy(self, x):
        if isinstance(x, DevArray):
            _host_read("cupy.asnumpy")
            return x.a.copy()
        return np.asarray(x)

    def copyto(self, dst, src):
        _launch(lambda: _unwrap(src), dest=dst)

    def empty(self, shape, dtype=float):
        return _launch(lambda: np.empty(shape, dtype), allocates=False)

    def __getattr__(self, name):
        fn = getattr(np, name)

        def lifted(*args, **kwargs):
            out = kwargs.get("out")
            reads = [a for a in args if isinstance(a, DevArray)]
            if isinstance(out, DevArray):          # CuPy returns `out`
                rest = {k: v for k, v in kwargs.items() if k != "out"}
                return _launch(lambda: fn(*_unwrap(args), **{k: _unwrap(v) for k, v in rest.items()}),
                               dest=out)
            return _launch(lambda: fn(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}),
                           reads=reads)
        return lifted


class _FakeUfunc:
    """A lifted NumPy ufunc with the one ufunc method the backend uses, `at`."""

    def __init__(self, call, at) -> None:
        self.call, self.at = call, at

    def __call__(self, *args, **kwargs):
        return self.call(*args, **kwargs)


class _FakeElementwiseKernel:
    """cupy.ElementwiseKernel: typed params as CuPy checks them, broadcasting, and the
    body compiled with the system C compiler (the CUDA preamble included)."""

    def __init__(self, fake, in_params, out_params, operation, name="kernel", preamble="", **kw):
        self.fake = fake
        self.ins = cprint.parse_params(in_params)
        self.outs = cprint.parse_params(out_params)
        assert len(self.outs) == 1 and name.isidentifier()
        tu = cprint.c_translation_unit([(name, in_params, out_params, operation)])
        head = "#include <math.h>\n#include <stdbool.h>\n"
        assert tu.startswith(head)
        self.fn = getattr(_build_c(head + preamble + tu[len(head):], fake.tmp_dir), name)
        self.fn.restype = None

    def plan(self, args):
        """Check the arguments now; returns (compute, the output given or None), where
        compute() runs the kernel on the arrays' memory as it is then."""
        assert len(args) in (len(self.ins), len(self.ins) + 1), "wrong number of kernel arguments"
        args, given_out = args[:len(self.ins)], args[len(self.ins):]
        if not any(isinstance(a, DevArray) for a in args + given_out):
            raise ValueError("Loop size is undecided.")
        params = []
        for (dt, pname), a in zip(self.ins, args):
            if isinstance(a, DevArray):
                if a.dtype != dt:
                    raise TypeError(f"Type is mismatched. {pname} {a.dtype} {dt}")
                params.append(a)
            elif isinstance(a, np.ndarray):
                raise TypeError("Unsupported type <class 'numpy.ndarray'>")
            else:
                params.append(np.asarray(a).astype(dt))          # CScalar.apply_dtype (baked)
        self.fake.kernel_devices.append(self.fake.current_device)
        shape = np.broadcast_shapes(*(p.shape for p in params))
        if given_out:                           # CuPy takes the loop size from the output
            dest = given_out[0]
            if (not isinstance(dest, DevArray) or np.broadcast_shapes(shape, dest.shape) != dest.shape
                    or dest.dtype != self.outs[0][0]):
                raise ValueError("Out shape is mismatched")
            shape = dest.shape

        def compute():
            arrays = [p.a if isinstance(p, DevArray) else p for p in params]
            flat = [np.ascontiguousarray(np.broadcast_to(b, shape)).reshape(-1) for b in arrays]
            out = np.empty(int(np.prod(shape, dtype=np.int64)), self.outs[0][0])
            if out.size:
                self.fn(ctypes.c_longlong(out.size), *[b.ctypes.data_as(ctypes.c_void_p) for b in flat],
                        out.ctypes.data_as(ctypes.c_void_p))
            return out.reshape(shape)
        return compute, (given_out[0] if given_out else None)

    def __call__(self, *args):
        compute, dest = self.plan(args)
        return _launch(compute, dest=dest)


class _FakeReductionKernel:
    """cupy.ReductionKernel for sums: the map expression compiled like an elementwise
    kernel, then summed over `axis` (identity 0, reduce `a + b`, post map `out0 = a`)."""

    def __init__(self, fake, in_params, out_params, map_expr, reduce_expr, post_map_expr,
                 identity, name="kernel", preamble="", **kw):
        assert reduce_expr == "a + b" and post_map_expr == "out0 = a" and identity == "0"
        # CuPy's CUB path for one-input reductions reads these names (see reduction_preamble)
        assert "typedef" in preamble and "type_in0_raw" in preamble and "type_out0_raw" in preamble
        self.map = _FakeElementwiseKernel(fake, in_params, out_params, f"out0 = {map_expr};",
                                          name=name, preamble=preamble)

    def __call__(self, *args, axis=None, keepdims=False):
        mapped, _ = self.map.plan(args)
        return _launch(lambda: np.asarray(np.sum(mapped(), axis=axis, keepdims=keepdims)))


class _FakeRawKernel:
    """cupy.RawKernel for the fused kernels: checks the source and every argument
    (contiguous arrays of the kernel's dtype, exact scalar types: a GPU would read
    garbage otherwise) and runs the pthread emulation."""

    def __init__(self, fake, code, name, **kw):
        self.fake = fake
        attention = [(k, dt) for k in cb.ATTENTION_KERNELS.values() for dt in attnprint.DTYPES
                     if k.kernel_name(dt) == name]
        if attention:
            self.kernel, self.dtype = attention[0]
            assert code == cb.attention_kernel_source(self.kernel, self.dtype)
            self.lib = _build_attention(self.kernel, self.dtype, fake.tmp_dir)
            return
        self.lib = None
        matches = [(k, dt) for k in codegen.ROW_KERNELS.values() for dt in cb.FUSED_DTYPES
                   if k.kernel_name(dt) == name]
        assert len(matches) == 1, f"unknown row kernel {name}"
        self.kernel, self.dtype = matches[0]
        assert code == cb.row_kernel_source(self.kernel.program, self.dtype)

    def __call__(self, grid, block, args, shared_mem=0, **kw):
        assert len(grid) == 1 and len(block) == 1 and 1 <= grid[0] < 2 ** 31
        b = block[0]
        assert b & (b - 1) == 0 and 32 <= b <= cb.FUSED_BLOCK, f"bad block size {b}"
        if self.lib is not None:
            return self._attention(grid[0], b, args, shared_mem)
        acc = np.float64 if self.dtype == np.float64 else np.float32
        want = {"i64": np.int64, "acc": acc, "i32": np.int32}
        host = []
        for (role, pname), a in zip(self.kernel.params, args, strict=True):
            if role in ("in", "out"):
                assert isinstance(a, DevArray) and a.dtype == self.dtype and a.flags.c_contiguous, \
                    f"{pname}: needs a contiguous {self.dtype} device array, got {a!r}"
                host.append(a.a)                # the memory: read and written when it runs
            elif role == "index":
                assert isinstance(a, DevArray) and a.dtype == np.int64 and a.flags.c_contiguous, \
                    f"{pname}: needs a contiguous int64 device array, got {a!r}"
                host.append(a.a)
            else:
                assert type(a) is want[role], f"{pname}: needs {want[role].__name__}, got {type(a)}"
                host.append(a.item())           # a scalar: baked into the launch
        self.fake.kernel_devices.append(self.fake.current_device)
        _launch_in_place(lambda: codegen._launch(self.fake.emu_lib, self.kernel, self.dtype.name,
                                                 grid[0], b, host))


    def _attention(self, grid, block, args, shared_mem):
        """An attention kernel: the arguments checked by role, the dynamic shared memory
        the launch asks for within the emulation's 64 KiB (and under CUDA's default 48 KiB)."""
        k, dt = self.kernel, self.dtype
        acc = dt.type
        want = {"i64": np.int64, "acc": acc, "i32": np.int32, "u32": np.uint32, "u64": np.uint64}
        host = []
        dims = {}
        for (role, pname), a in zip(k.params, args, strict=True):
            if role in ("in", "out", "mask", "state"):
                need = {"in": dt, "out": dt, "state": np.dtype(np.uint64),
                        "mask": np.dtype(bool) if k.mask == "bool" else dt}[role]
                assert isinstance(a, DevArray) and a.dtype == need and a.flags.c_contiguous, \
                    f"{pname}: needs a contiguous {need} device array, got {a!r}"
                host.append(a.a)
            else:
                assert type(a) is want[role], f"{pname}: needs {want[role].__name__}, got {type(a)}"
                host.append(a)
                dims[pname] = int(a) if role == "i64" else None
        need = k.shared_bytes(dt, dims["S"], dims["D"], dims["DV"])
        assert need <= shared_mem <= 48 * 1024, f"dynamic shared memory {shared_mem}, the kernel needs {need}"
        self.fake.kernel_devices.append(self.fake.current_device)
        _launch_in_place(lambda: codegen.launch_attention(self.lib, k, dt.name, grid, block, host))


def _build_attention(kernel, dtype, tmp_dir) -> ctypes.CDLL:
    """The emulation of one printed attention kernel, compiled once per source."""
    source = codegen.attention_emu_source(kernel, dtype.name)
    key = "attn" + hashlib.sha1(source.encode()).hexdigest()[:16]
    if key not in _C_CACHE:
        src = tmp_dir / f"{key}.cpp"
        src.write_text(source)
        so = tmp_dir / f"{key}.so"
        res = codegen._run([codegen.CXX, "-O1", "-std=c++17", "-shared", "-fPIC", "-pthread", str(src),
                            "-o", str(so)])
        assert res.returncode == 0, f"{codegen.CXX} failed on {kernel.kernel_name(dtype)}:\n{res.stderr[:3000]}"
        _C_CACHE[key] = ctypes.CDLL(str(so))
    return _C_CACHE[key]


SCATTER_ADD_DTYPES = {np.dtype(t) for t in (np.int32, np.float16, np.float32, np.float64,
                                            np.uint32, np.uint64)}


def _add_at(a, slices, value):
    """cupy.add.at, with the dtype limits of CuPy's atomics."""
    if a.dtype not in SCATTER_ADD_DTYPES or value.dtype != a.dtype:
        raise TypeError(f"add.at only supports int32, float16, float32, float64, uint32, "
                        f"uint64, got {a.dtype} / {value.dtype}")
    _launch_in_place(lambda: np.add.at(a.a, _unwrap(slices), _unwrap(value)))


@pytest.fixture(scope="module")
def fake_cupy(tmp_path_factory):
    if codegen.CC is None or codegen.CXX is None:
        pytest.skip("the emulated CUDA device needs a C and a C++ compiler (gcc/g++)")
    d = tmp_path_factory.mktemp("fake_cupy")
    parts = [codegen.EMU_PRELUDE, cb.FUSED_HELPERS]
    for k in codegen.ROW_KERNELS.values():
        for dt in codegen.FLOATS:
            parts += [k.source(dt), codegen._emu_wrapper(k, dt)]
    src = d / "emu.cpp"
    src.write_text("\n".join(parts))
    res = codegen._run([codegen.CXX, "-O1", "-std=c++17", "-shared", "-fPIC", "-pthread", str(src),
                        "-o", str(d / "emu.so")])
    assert res.returncode == 0, res.stderr[:3000]
    return FakeCupy(d, ctypes.CDLL(str(d / "emu.so")))


@pytest.fixture(scope="module")
def emulated_backend(fake_cupy):
    return cb.CupyBackend(fake_cupy, "cuda")


@pytest.fixture(params=[pytest.param("gpu", marks=[pytest.mark.cuda, pytest.mark.skipif(
                            GPU_SKIP is not None, reason=str(GPU_SKIP))]),
                        "emulated"])
def cuda(request, monkeypatch):
    """The device name "cuda", backed by the real GPU or by the emulation."""
    if request.param == "emulated":
        be = request.getfixturevalue("emulated_backend")
        monkeypatch.setitem(backends._instances, "cuda", be)
    else:
        assert isinstance(eg.zeros(1, device="cuda")._backend, cb.CupyBackend)
    return "cuda"


# -- registry-driven checks ---------------------------------------------------------------------

RANDOM_OPS = {name for name, op in ops.REGISTRY.items() if op.random}
SAMPLED = sorted(name for name, op in ops.REGISTRY.items() if not op.random)
DIFFERENTIABLE = sorted(name for name in SAMPLED if ops.REGISTRY[name].differentiable)
ELEMENTWISE = sorted(n for n, op in ops.REGISTRY.items() if isinstance(op, ElementwiseOp))


def to_dev(a, device, requires_grad=False):
    """A NumPy sample on `device` (floats differentiable when asked); scalars pass through."""
    if isinstance(a, (np.ndarray, np.generic)):
        a = np.asarray(a)
        return eg.tensor(a, dtype=a.dtype, device=device,
                         requires_grad=requires_grad and a.dtype.kind == "f")
    return a


def _on(params, device):
    return {k: (device if k == "device" else v) for k, v in params.items()}


@pytest.mark.parametrize("name", SAMPLED)
def test_registry_forward_on_cuda(cuda, name, rng):
    op = ops.REGISTRY[name]
    for args, params in op.sample(rng):
        params = _on(params, cuda)
        xs = [to_dev(a, cuda) for a in args]
        out = op(*xs, **params)
        assert out.device == cuda
        ref = np.asarray(op.reference(*args, **_on(params, "cpu")))
        shape, dtype = op.infer(*xs, **params)
        assert out.shape == ref.shape == shape and out.dtype == dtype, (name, params)
        np.testing.assert_allclose(out.numpy().astype(np.float64), ref.astype(np.float64),
                                   rtol=1e-6, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_registry_gradcheck_on_cuda(cuda, name, rng):
    op = ops.REGISTRY[name]
    for args, params in op.sample(rng):
        params = _on(params, cuda)
        inputs = [to_dev(a, cuda, requires_grad=True) for a in args]
        if any(isinstance(t, eg.Tensor) and t.requires_grad for t in inputs):
            assert eg.gradcheck(lambda *xs: op(*xs, **params), *inputs)


@pytest.mark.parametrize("name", sorted(ops.COMPOSITES))
def test_composites_on_cuda(cuda, name, rng):
    comp = ops.COMPOSITES[name]
    for args, params in comp.sample(rng):
        out = comp.fn(*[to_dev(a, cuda) for a in args], **params)
        assert out.device == cuda
        np.testing.assert_allclose(out.numpy(), comp.reference(*args, **params), rtol=1e-6,
                                   atol=1e-9, err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_low_precision_on_cuda(cuda, name, dtype, rng):
    """float32 and float16 kernels agree with the CPU computing in float32."""
    op = ops.REGISTRY[name]
    xs = [x if x.dtype == bool else x.astype(dtype)            # a select's condition stays bool
          for x in (_draw(op.domain, rng, (5, 7), i) for i in range(op.nin))]
    got = op(*[eg.tensor(x, device=cuda) for x in xs])
    want = op(*[eg.tensor(x if x.dtype == bool else x.astype(np.float32)) for x in xs]).numpy()
    expected_dtype = np.dtype(bool) if op.result == "bool" else np.dtype(dtype)
    assert got.dtype == expected_dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(got.numpy().astype(np.float64),
                               want.astype(expected_dtype).astype(np.float64), **tol)


def test_scalars_and_mixed_dtypes_promote_like_numpy(cuda):
    x32 = eg.tensor(np.arange(6, dtype=np.float32).reshape(2, 3), device=cuda)
    i64 = eg.arange(3, device=cuda)
    assert (x32 * 2.5).dtype == np.float32 and (2 ** x32).dtype == np.float32
    assert (i64 + 0.5).dtype == np.float64 and (i64 * 2).dtype == np.int64
    assert (x32 + i64).dtype == np.float64
    assert eg.exp(i64).dtype == np.float32 and (i64 / 2).dtype == np.float32
    np.testing.assert_array_equal((i64 ** 2).numpy(), [0, 1, 4])          # integer power
    np.testing.assert_array_equal((x32 > 2.0).numpy(), np.arange(6).reshape(2, 3) > 2)
    np.testing.assert_allclose((1 - x32 / 4).numpy(), 1 - np.arange(6).reshape(2, 3) / 4)
    h = eg.tensor(np.ones(3, np.float16), device=cuda)
    assert (h * 3).dtype == np.float16 and (h + x32[0]).dtype == np.float32


# -- Tensor basics ----------------------------------------------------------------------------------

def test_tensor_round_trip_and_basic_ops(cuda):
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    x = eg.tensor(a, device=cuda)
    assert x.device == cuda and x.to("cpu").device == "cpu" and x.cpu().to(cuda).device == cuda
    np.testing.assert_array_equal(x.numpy(), a)
    np.testing.assert_array_equal(np.asarray(x), a)
    np.testing.assert_allclose((x @ x.T).numpy(), a @ a.T)
    np.testing.assert_allclose(x.sum(axis=0).numpy(), a.sum(0))
    np.testing.assert_allclose(x.max(axis=1, keepdims=True).numpy(), a.max(1, keepdims=True))
    np.testing.assert_allclose(x.mean().numpy(), a.mean())
    np.testing.assert_array_equal(x[1:, ::2].numpy(), a[1:, ::2])
    np.testing.assert_array_equal(x[[0, 2, 2]].numpy(), a[[0, 2, 2]])
    np.testing.assert_array_equal(x[x > 5].numpy(), a[a > 5])
    np.testing.assert_array_equal(eg.where(x > 5, x, 0.0).numpy(), np.where(a > 5, a, 0.0))
    np.testing.assert_array_equal(eg.concatenate([x, x], axis=1).numpy(), np.concatenate([a, a], 1))
    np.testing.assert_array_equal(eg.pad(x, ((1, 0), (0, 2))).numpy(), np.pad(a, ((1, 0), (0, 2))))
    assert x.argmax().item() == 11 and x[2, 3].item() == 11.0
    y = x.clone()
    with eg.no_grad():
        y[0] = 7.0
        y += 1
    np.testing.assert_array_equal(y.numpy()[0], [8.0] * 4)
    np.testing.assert_array_equal(x.numpy(), a)                 # the original is untouched
    assert eg.zeros(2, 3, device=cuda).device == cuda
    assert eg.arange(4, device=cuda).numpy().tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(eg.eye(3, device=cuda).numpy(), np.eye(3))


def test_gradients_match_cpu(cuda, rng):
    """Advanced indexing with repeats (index_add), broadcasting and reductions."""
    a, w = rng.standard_normal((5, 3)), rng.standard_normal((3, 4))
    idx = np.array([0, 3, 3, 1, 0, 0])

    def loss(device):
        x = eg.tensor(a, device=device, requires_grad=True)
        v = eg.tensor(w, device=device, requires_grad=True)
        h = (x[eg.tensor(idx, device=device)] @ v).tanh()
        out = (h * h).sum() + eg.softmax(h, axis=0).max() + eg.layer_norm(h).mean()
        out.backward()
        return out.item(), x.grad.numpy(), v.grad.numpy()

    for got, want in zip(loss(cuda), loss("cpu")):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int64", "int32", "int8", "bool"])
def test_index_add_accumulates_repeated_indices(cuda, dtype):
    be = eg.zeros(1, device=cuda)._backend
    vals = np.array([1, 2, 3, 4, 5, 6]).astype(dtype).reshape(3, 2)
    idx = np.array([1, 1, 3])
    want = np.zeros((4, 2), dtype)
    np.add.at(want, (idx,), vals)
    got = be.index_add((4, 2), (be.asarray(idx),), be.asarray(vals), True)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(be.to_numpy(got), want)
    basic = be.index_add((4, 2), (slice(1, 4),), be.asarray(vals), False)
    np.testing.assert_array_equal(be.to_numpy(basic)[1:], vals)


def test_float16_sums_accumulate_in_float32(cuda):
    v = np.full(4096, 0.1, np.float16)
    v[0] = 1000.0
    s = eg.tensor(v, device=cuda).sum()
    assert s.dtype == np.float16
    assert abs(float(s.item()) - float(v.astype(np.float64).sum())) <= 0.5


# -- fused kernels ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_fused_softmax_family_matches_composites(cuda, dtype, rng):
    from ops import composite
    a = rng.standard_normal((4, 6, 5)) * 4
    a[1, :, 2] = -np.inf                  # a fully masked row along axis 1
    a[0, 0, :] = -np.inf                  # ... and along axis 2
    a[2, 3, 1] = 500.0
    tol = {"float64": 1e-12, "float32": 2e-5, "float16": 3e-3}[dtype]
    x = eg.tensor(a.astype(dtype), device=cuda)
    ref = eg.tensor(a.astype(dtype).astype(np.float64))
    for axis in (-1, 1, 0):
        for fused, comp in ((eg.softmax, composite.softmax), (eg.log_softmax, composite.log_softmax)):
            got = fused(x, axis=axis)
            assert got.dtype == np.dtype(dtype) and got.shape == x.shape
            with np.errstate(all="ignore"):
                want = comp(ref, axis).numpy()
            g = got.numpy().astype(np.float64)
            assert not np.isnan(g).any()
            np.testing.assert_allclose(g, want, rtol=tol, atol=tol, err_msg=f"{fused.__name__} {axis}")
    w, b = rng.standard_normal(5).astype(dtype), rng.standard_normal(5).astype(dtype)
    finite = rng.standard_normal((4, 6, 5)) * 4 + 2
    x, ref = eg.tensor(finite.astype(dtype), device=cuda), eg.tensor(finite.astype(dtype).astype(np.float64))
    for params in ((w, b), (None, None)):
        dev = [None if p is None else eg.tensor(p, device=cuda) for p in params]
        cpu = [None if p is None else eg.tensor(p.astype(np.float64)) for p in params]
        got = eg.layer_norm(x, *dev, eps=1e-4).numpy().astype(np.float64)
        want = composite.layer_norm(ref, *cpu, eps=1e-4).numpy()
        np.testing.assert_allclose(got, want, rtol=tol * 5, atol=tol * 5)


def test_fused_ops_are_differentiable_on_cuda(cuda, rng):
    x = eg.tensor(rng.standard_normal((3, 4)), device=cuda, requires_grad=True)
    w = eg.tensor(rng.standard_normal(4), device=cuda, requires_grad=True)
    b = eg.tensor(rng.standard_normal(4), device=cuda, requires_grad=True)
    assert eg.gradcheck(lambda t: eg.softmax(t, axis=0), x)
    assert eg.gradcheck(lambda t: eg.log_softmax(t, axis=-1), x)
    assert eg.gradcheck(lambda t, u, v: eg.layer_norm(t, u, v, eps=1e-5), x, w, b)


def test_jit_on_cuda_matches_eager(cuda, rng):
    """Compiled programs on the device: fused groups become one generated kernel."""
    a, w = rng.standard_normal((4, 6)), rng.standard_normal((6, 3))

    def step(x, v):
        h = (x @ v) * 0.5 + 1.0
        return (h.tanh() * h.sigmoid() - h.relu()).sum()

    compiled = eg.jit(step)
    for _ in range(2):
        x, v = eg.tensor(a, device=cuda), eg.tensor(w, device=cuda)
        got = compiled(x, v)
        assert got.device == cuda
        np.testing.assert_allclose(got.item(), step(eg.tensor(a), eg.tensor(w)).item(), rtol=1e-10)
    be = eg.zeros(1, device=cuda)._backend
    k = be.elementwise_kernel("float32 in0, float32 in1", "float32 out0", "out0 = in0*in1 + 1.0f;",
                              "engine_test_fma")
    p, q = be.asarray(np.arange(3, dtype=np.float32)), be.asarray(np.full(3, 2, np.float32))
    np.testing.assert_array_equal(be.to_numpy(k(p, q)), [1, 3, 5])
    dest = be.full((3,), 0, np.float32)
    assert k(p, q, dest) is dest and be.to_numpy(dest).tolist() == [1, 3, 5]
    mm = be.full((2, 2), 0, np.float64)
    x2 = be.asarray(np.eye(2))
    assert be.matmul_out(x2, x2, mm) is mm and be.to_numpy(mm).tolist() == [[1, 0], [0, 1]]


def test_rows_times_weight_is_one_2d_gemm(fake_cupy, emulated_backend, monkeypatch, rng):
    """(B, T, d) @ (d, n) and its two gradients run as 2-D GEMMs (eager and jit), with
    the results of the batched product."""
    monkeypatch.setitem(backends._instances, "cuda", emulated_backend)
    a, w = rng.standard_normal((3, 5, 4)), rng.standard_normal((4, 6))

    def step(x, v):
        y = x @ v
        loss = (y * y).sum()
        loss.backward()
        return loss, y

    want = []
    for device in ("cpu", "cuda", "jit"):
        run = eg.jit(step) if device == "jit" else step
        for _ in range(2 if device == "jit" else 1):
            x = eg.tensor(a, device="cpu" if device == "cpu" else "cuda", requires_grad=True)
            v = eg.tensor(w, device=x.device, requires_grad=True)
            fake_cupy.matmul_ndims.clear()
            loss, y = run(x, v)
            got = [y.numpy(), x.grad.numpy(), v.grad.numpy()]
        if device != "cpu":
            assert fake_cupy.matmul_ndims == [(2, 2)] * 3, (device, fake_cupy.matmul_ndims)
        want = want or got
        for g, ref in zip(got, want):
            np.testing.assert_allclose(g, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(want[0], a @ w, rtol=1e-12)
    np.testing.assert_allclose(want[2], np.einsum("btd,btn->dn", a, 2 * (a @ w)), rtol=1e-12)
    be = emulated_backend                       # a transposed (non-contiguous) left operand
    fake_cupy.matmul_ndims.clear()
    t = be.transpose(be.asarray(a), (1, 0, 2))
    np.testing.assert_allclose(be.to_numpy(be.matmul(t, be.asarray(w))), a.transpose(1, 0, 2) @ w)
    assert fake_cupy.matmul_ndims == [(3, 2)]


def test_jit_single_input_reductions_on_cuda(cuda, rng):
    """One-input fused sums over trailing axes: on CuPy these take its CUB block reduction."""
    a = rng.standard_normal((6, 40)).astype(np.float32)

    def norms(x):
        return (x * x).sum(axis=-1), (x.exp()).sum(), x.sum(axis=-1, keepdims=True)

    compiled = eg.jit(norms)
    for _ in range(2):
        got = compiled(eg.tensor(a, device=cuda))
        want = norms(eg.tensor(a))
        for g, w in zip(got, want):
            assert g.device == cuda
            np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-5)


@pytest.mark.parametrize("model_kind", ["causal", "seq2seq"])
def test_jit_transformer_training_step_on_cuda_matches_eager(cuda, model_kind):
    """A whole compiled training step (forward, backward, capturable AdamW) on the device
    leaves the same parameters as the eager step on the device."""
    from engine import nn
    vocab, batch, seq = 13, 3, 7
    tokens = np.random.default_rng(1).integers(0, vocab, (batch, seq + 1))
    states = []
    for use_jit in (False, True):
        eg.manual_seed(0)
        if model_kind == "causal":
            model = nn.CausalLM(vocab, 16, 2, 2, 32, dropout=0.0).to(cuda)
        else:
            model = nn.Seq2SeqTransformer(vocab, d_model=16, nhead=2, num_encoder_layers=1,
                                          num_decoder_layers=1, dim_feedforward=32,
                                          dropout=0.0, device=cuda)
        opt = nn.optim.AdamW(model.parameters(), lr=1e-2, capturable=use_jit)
        inp = eg.tensor(tokens[:, :-1], device=cuda)
        tgt = eg.tensor(tokens[:, 1:], device=cuda)

        def step(inp, tgt):
            opt.zero_grad()
            logits = model(inp) if model_kind == "causal" else model(inp, inp)
            loss = nn.functional.cross_entropy(logits, tgt)
            loss.backward()
            opt.step()
            return loss

        run = eg.jit(step) if use_jit else step
        losses = [run(inp, tgt).item() for _ in range(3)]
        states.append((losses, {k: v.numpy() for k, v in model.state_dict().items()}))
    (eager_losses, eager_state), (jit_losses, jit_state) = states
    np.testing.assert_allclose(jit_losses, eager_losses, rtol=1e-4)
    for name, value in eager_state.items():
        if name.endswith("k.bias"):
            # softmax ignores a key bias, so its gradient is rounding noise that Adam scales
            # to full steps of lr: bounded, not equal (as in the CPU jit test)
            assert np.abs(jit_state[name] - value).max() <= 2 * 3 * 1e-2 + 1e-6, name
            continue
        np.testing.assert_allclose(jit_state[name], value, rtol=1e-3, atol=1e-4, err_msg=name)


# -- random numbers -------------------------------------------------------------------------------

def test_device_rng_is_seeded_by_manual_seed(cuda):
    eg.manual_seed(11)
    a = eg.randn(1000, device=cuda)
    assert a.device == cuda and a.dtype == np.float32
    eg.manual_seed(11)
    np.testing.assert_array_equal(a.numpy(), eg.randn(1000, device=cuda).numpy())
    assert abs(a.numpy().mean()) < 0.15 and abs(a.numpy().std() - 1) < 0.1
    u = eg.rand(2000, dtype=eg.float16, device=cuda).numpy()
    assert u.dtype == np.float16 and u.min() >= 0 and u.max() <= 1
    d = eg.dropout(eg.ones(20000, device=cuda), p=0.25).numpy()
    assert set(np.unique(d)) <= {0.0, np.float32(1 / 0.75)} and abs((d == 0).mean() - 0.25) < 0.02
    assert eg.randn(2, 2, dtype=eg.float64, device=cuda).dtype == np.float64


# -- devices ---------------------------------------------------------------------------------------------

def test_mixing_devices_names_both(cuda):
    with pytest.raises(eg.DeviceError, match="cpu and cuda|cuda and cpu"):
        eg.ones(2) + eg.ones(2, device=cuda)


def test_nn_module_to_cuda_matches_cpu(cuda, rng):
    from engine import nn
    eg.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3)) \
        if hasattr(nn, "Sequential") else None
    if model is None:
        pytest.skip("nn.Sequential is not available yet")
    model = model.to(eg.float64)
    gpu_model = copy.deepcopy(model).to(cuda)
    assert all(p.device == cuda for p in gpu_model.parameters())
    x = rng.standard_normal((5, 6))
    outs = []
    for m, dev in ((model, "cpu"), (gpu_model, cuda)):
        y = m(eg.tensor(x, device=dev))
        (y * y).sum().backward()
        outs.append((y.numpy(), [p.grad.numpy() for p in m.parameters()]))
    np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-12)
    for g1, g0 in zip(outs[1][1], outs[0][1]):
        np.testing.assert_allclose(g1, g0, rtol=1e-10, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
def test_dlpack_with_torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    t = torch.arange(6, dtype=torch.float32, device="cuda").reshape(2, 3)
    x = eg.from_dlpack(t)
    assert x.device == "cuda" and x.shape == (2, 3)
    np.testing.assert_array_equal(x.numpy(), t.cpu().numpy())
    back = torch.from_dlpack(x * 2)
    assert back.is_cuda and torch.equal(back, t * 2)


def test_indexed_devices_run_on_their_gpu(fake_cupy, monkeypatch):
    """"cuda:1" gets its own backend whose kernels launch with GPU 1 current."""
    factory = lambda device: cb.CupyBackend(fake_cupy, device)
    monkeypatch.setitem(backends._factories, "cuda", factory)
    monkeypatch.delitem(backends._instances, "cuda:1", raising=False)
    try:
        x = eg.tensor([[1.0, -2.0]], device="cuda:1")
        assert x.device == "cuda:1"
        fake_cupy.kernel_devices.clear()
        y = eg.softmax(x.relu() * 2, axis=-1)
        assert y.device == "cuda:1" and fake_cupy.kernel_devices == [1, 1, 1]
        assert fake_cupy.current_device == 0
        with pytest.raises(eg.DeviceError, match="cuda:1"):
            x + eg.ones(2, device="cpu")
    finally:
        backends._instances.pop("cuda:1", None)


# -- without CuPy or without a GPU -------------------------------------------------------------------

@pytest.fixture
def fresh_cuda(monkeypatch):
    """Forget any started "cuda" backend and use the real factory for this test."""
    monkeypatch.delitem(backends._instances, "cuda", raising=False)
    monkeypatch.delitem(backends._instances, "cuda:3", raising=False)
    from backends import _cupy_factory
    monkeypatch.setitem(backends._factories, "cuda", _cupy_factory)
    return monkeypatch


def test_cuda_without_cupy_is_a_device_error_with_the_install_hint(fresh_cuda):
    fresh_cuda.setitem(sys.modules, "cupy", None)          # `import cupy` raises ImportError
    for make in (lambda: eg.tensor([1.0], device="cuda"), lambda: eg.zeros(2, device="cuda"),
                 lambda: eg.ones(2).to("cuda")):
        with pytest.raises(eg.DeviceError, match=r'pip install -e "\.\[cuda\]"') as info:
            make()
        assert not isinstance(info.value, ImportError)
        assert "CuPy" in str(info.value)
    assert "cuda" not in backends._instances


def _fake_cupy_module(get_count):
    mod = types.ModuleType("cupy")
    mod.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_count))
    return mod


def test_cuda_without_a_gpu_is_a_device_error(fresh_cuda):
    def no_driver():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
    fresh_cuda.setitem(sys.modules, "cupy", _fake_cupy_module(no_driver))
    with pytest.raises(eg.DeviceError, match="cannot reach a CUDA GPU.*no CUDA-capable device"):
        eg.zeros(1, device="cuda")
    fresh_cuda.setitem(sys.modules, "cupy", _fake_cupy_module(lambda: 0))
    with pytest.raises(eg.DeviceError, match=r'no CUDA GPU is present.*pip install -e "\.\[cuda\]"'):
        eg.zeros(1, device="cuda")
    fresh_cuda.setitem(sys.modules, "cupy", _fake_cupy_module(lambda: 2))
    with pytest.raises(eg.DeviceError, match=r"'cuda:3': no such GPU .*cuda:0 \.\. cuda:1"):
        eg.zeros(1, device="cuda:3")


def test_from_dlpack_refuses_unknown_devices():
    class Producer:
        def __dlpack_device__(self):
            return (10, 0)                   # kDLROCM

        def __dlpack__(self, **kw):
            raise AssertionError("must not be consumed")
    with pytest.raises(eg.DeviceError, match="device type 10"):
        eg.from_dlpack(Producer())
