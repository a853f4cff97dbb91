"""Source ops: tensors made from nothing (constants, ranges, random draws), and the
engine's one random generator, Philox4x32-10.

Source ops take no tensor inputs, so they name their device. Random ops draw from
that device's stream (seeded by `engine.manual_seed`) and are never merged by CSE.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11;
Random123) maps a 128-bit counter and a 64-bit key to four 32-bit words in ten
rounds of 32x32->64-bit multiplies and xors. Element j of a draw gets the counter
(n mod 2^32, n >> 32, 0, 0), n = the device's counter offset + j (row-major), and
each draw advances the offset by its size. A value therefore depends only on the key
and its global index: not on the device, the array layout or the kernel launch, so
NumPy and CuPy give bit-identical uniform and Bernoulli draws (normal draws differ by
the ulps of their log/cos). The round function is written once, `philox4x32`, over a
word arithmetic: `_NumpyWords` evaluates it on uint64 arrays, `_CWords` prints it as
C for the CUDA kernel (`kernel_source`). `fold_in` derives keys as JAX does: a
per-step or per-rank key is the Philox image of (data, tag) under the parent key,
with a counter no element draw uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DTypeError
from .spec import Op, register

PHILOX_M = (0xD2511F53, 0xCD9E8D57)       # round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)       # key schedule (Weyl) increments
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
_FOLD_TAG = 1                             # counter word 2 of fold_in; element draws use 0
# Random bits per float: exactly representable as (bits) * 2^-bits, so the
# conversion is exact on every device.
MANTISSA_BITS = {np.dtype(np.float16): 11, np.dtype(np.float32): 24, np.dtype(np.float64): 53}
_TWO_PI_F32 = np.float32(2 * np.pi)


def philox4x32(ctr: tuple, key: tuple, w: Any) -> tuple:
    """Philox4x32-10 of counter words `ctr` (4) under key words `key` (2), in the word
    arithmetic `w` (mulhilo, xor, bump). Python ints are constants in any arithmetic."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(PHILOX_ROUNDS):
        if r:
            k0, k1 = w.bump(k0, PHILOX_W[0]), w.bump(k1, PHILOX_W[1])
        hi0, lo0 = w.mulhilo(PHILOX_M[0], c0)
        hi1, lo1 = w.mulhilo(PHILOX_M[1], c2)
        c0, c1, c2, c3 = w.xor(hi1, c1, k0), lo1, w.xor(hi0, c3, k1), lo0
    return c0, c1, c2, c3


class _NumpyWords:
    """32-bit words as uint64 arrays (values < 2^32) or Python ints."""

    @staticmethod
    def bump(k: Any, inc: int) -> Any:
        return (k + inc) & MASK32

    @staticmethod
    def mulhilo(m: int, x: Any) -> tuple:
        if isinstance(x, int):
            p = m * x
            return p >> 32, p & MASK32
        p = x * np.uint64(m)
        return p >> np.uint64(32), p & np.uint64(MASK32)

    @staticmethod
    def xor(a: Any, b: Any, k: Any) -> Any:
        if isinstance(a, int) and isinstance(b, int):
            return a ^ b ^ k
        return a ^ b ^ np.uint64(k) if isinstance(k, int) else a ^ b ^ k


class _CWords:
    """Prints the rounds as C statements on `unsigned int` words (C's wrap-around is
    the mod 2^32 of the spec); Python ints stay folded constants."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def _name(self, expr: str, ctype: str = "unsigned int") -> str:
        name = f"t{len(self.lines)}"
        self.lines.append(f"const {ctype} {name} = {expr};")
        return name

    def bump(self, k: Any, inc: int) -> Any:
        return (k + inc) & MASK32 if isinstance(k, int) else self._name(f"{k} + {inc:#x}u")

    def mulhilo(self, m: int, x: Any) -> tuple:
        if isinstance(x, int):
            return _NumpyWords.mulhilo(m, x)
        p = self._name(f"{m:#x}ull * (unsigned long long){x}", "unsigned long long")
        return self._name(f"(unsigned int)({p} >> 32)"), self._name(f"(unsigned int){p}")

    def xor(self, a: Any, b: Any, k: Any) -> Any:
        if isinstance(a, int) and isinstance(b, int) and isinstance(k, int):
            return a ^ b ^ k
        return self._name(" ^ ".join(f"{v:#x}u" if isinstance(v, int) else v for v in (a, b, k)))


def key_from_seed(seed: int) -> tuple[int, int]:
    """The two key words of a seed (any int, taken mod 2^64)."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return s & MASK32, s >> 32


def fold_in(key: tuple[int, int], data: int) -> tuple[int, int]:
    """A new key for sub-stream `data` (a step, a rank) of `key`, as jax.random.fold_in."""
    d = int(data) & 0xFFFFFFFFFFFFFFFF
    words = philox4x32((d & MASK32, d >> 32, _FOLD_TAG, 0), tuple(int(k) for k in key), _NumpyWords)
    return int(words[0]), int(words[1])


def philox_words(start: int, n: int, key: tuple[int, int]) -> tuple:
    """The four words of counters start..start+n-1 (as uint64 arrays of 32-bit values)."""
    idx = np.arange(start, start + n, dtype=np.uint64)
    return philox4x32((idx & np.uint64(MASK32), idx >> np.uint64(32), 0, 0), key, _NumpyWords)


def _bits(words: tuple, dtype: np.dtype, first: int) -> np.ndarray:
    """The top MANTISSA_BITS[dtype] bits of words[first] (and words[first+1] for float64)."""
    b = MANTISSA_BITS[dtype]
    if b <= 32:
        return words[first] >> np.uint64(32 - b)
    return (words[first] << np.uint64(b - 32)) | (words[first + 1] >> np.uint64(64 - b))


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


@dataclass(frozen=True)
class PhiloxDraw:
    """How one random op turns Philox words into values, on the host (`host`) and as
    the body of a CUDA elementwise kernel (`kernel_source`); both compute the same
    integer bits and the same float operations in the same order."""

    name: str                      # "uniform", "normal" or "bernoulli"
    # 0/1 values from comparing a word against the threshold of a probability p
    # (Bernoulli): exact in every dtype, and the kernel takes the threshold as a scalar.
    thresholded: bool = False

    def check_dtype(self, dtype: Any) -> np.dtype:
        dt = np.dtype(dtype)
        if not self.thresholded and dt not in MANTISSA_BITS:
            raise DTypeError(f"random_{self.name}: dtype {dt} is not a float dtype "
                             f"(float16, float32 or float64)")
        return dt

    @staticmethod
    def threshold(p: float) -> int:
        """Bernoulli(p) is `bits24 < threshold`: the float32 uniform u = bits24 * 2^-24 is
        below p exactly then (p * 2^24 is exact in a double)."""
        return min(max(math.ceil(float(p) * (1 << 24)), 0), 1 << 24)

    def host(self, start: int, n: int, key: tuple[int, int], dtype: Any, p: float = 0.0) -> np.ndarray:
        """n values (flat) for counters start.. under `key`, computed with NumPy."""
        dt = self.check_dtype(dtype)
        words = philox_words(start, n, key)
        if self.thresholded:
            return (_bits(words, np.dtype(np.float32), 0) < np.uint64(self.threshold(p))).astype(dt)
        ct = _compute_dtype(dt)
        scale = ct.type(2.0 ** -MANTISSA_BITS[dt])
        if self.name == "uniform":
            return (_bits(words, dt, 0).astype(ct) * scale).astype(dt, copy=False)
        cb = MANTISSA_BITS[ct]
        second = 2 if ct == np.float64 else 1
        u1 = (_bits(words, ct, 0) + np.uint64(1)).astype(ct) * ct.type(2.0 ** -cb)
        u2 = _bits(words, ct, second).astype(ct) * ct.type(2.0 ** -cb)
        two_pi = _TWO_PI_F32 if ct == np.float32 else 2 * np.pi
        z = np.sqrt(ct.type(-2.0) * np.log(u1)) * np.cos(ct.type(two_pi) * u2)
        return z.astype(dt, copy=False)

    def kernel_source(self, dtype: Any) -> tuple[str, str, str]:
        """(in_params, out_params, body) of a CuPy ElementwiseKernel writing this draw
        into its output; the element's counter is `start + i`."""
        dt = self.check_dtype(dtype)
        w = _CWords()
        idx = "(unsigned long long)start + (unsigned long long)i"
        c0, c1 = w._name(f"(unsigned int)({idx})"), w._name(f"(unsigned int)(({idx}) >> 32)")
        words = philox4x32((c0, c1, 0, 0), ("k0", "k1"), w)
        lines = list(w.lines)

        def bits(d: np.dtype, first: int) -> str:
            b = MANTISSA_BITS[d]
            if b <= 32:
                return f"({words[first]} >> {32 - b})"
            return (f"(((unsigned long long){words[first]} << {b - 32}) | "
                    f"({words[first + 1]} >> {64 - b}))")

        ins = "uint64 start, uint32 k0, uint32 k1"
        if self.thresholded:
            ins += ", uint32 threshold"
            lines.append(f"out0 = {bits(np.dtype(np.float32), 0)} < threshold;")
        else:
            ct = _compute_dtype(dt)
            t, sfx = ("double", "") if ct == np.float64 else ("float", "f")
            if self.name == "uniform":
                lines.append(f"out0 = ({t}){bits(dt, 0)} * ({t})(1.0 / {2 ** MANTISSA_BITS[dt]}.0);")
            else:
                cb = MANTISSA_BITS[ct]
                second = 2 if ct == np.float64 else 1
                two_pi = repr(float(_TWO_PI_F32)) if ct == np.float32 else repr(2 * np.pi)
                lines += [f"const {t} u1 = ({t})({bits(ct, 0)} + 1) * ({t})(1.0 / {2 ** cb}.0);",
                          f"const {t} u2 = ({t}){bits(ct, second)} * ({t})(1.0 / {2 ** cb}.0);",
                          f"out0 = sqrt{sfx}(-2.0{sfx} * log{sfx}(u1)) * cos{sfx}({two_pi}{sfx} * u2);"]
        return ins, f"{_ctype_name(dt)} out0", "\n".join(lines)


    def host_c_source(self, dtype: Any) -> tuple[str, str]:
        """(function name, C source) of the same body as a host loop
        `void name(long long n, unsigned long long start, unsigned int k0, unsigned int k1,
        unsigned int threshold, T* out)`, for float32/float64 outputs."""
        dt = self.check_dtype(dtype)
        ctype = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}[dt]
        name = f"philox_{self.name}_{dt.name}"
        body = self.kernel_source(dt)[2].replace("\n", "\n    ")
        return name, (f"void {name}(long long n, unsigned long long start, unsigned int k0, "
                      f"unsigned int k1, unsigned int threshold, {ctype}* restrict out) {{\n"
                      f"  (void)threshold;\n"
                      f"  for (long long i = 0; i < n; ++i) {{\n    {ctype} out0;\n    {body}\n"
                      f"    out[i] = out0;\n  }}\n}}\n")


def _ctype_name(dt: np.dtype) -> str:
    return "bool" if dt.kind == "b" else dt.name


UNIFORM, NORMAL = PhiloxDraw("uniform"), PhiloxDraw("normal")
BERNOULLI = PhiloxDraw("bernoulli", thresholded=True)


def _shape_dtype(shape: tuple, dtype: object, **_: object) -> tuple:
    return tuple(shape), np.dtype(dtype)


full = register(Op(
    "full", kind="source",
    forward=lambda be, shape, value, dtype, device: be.full(shape, value, dtype),
    infer=lambda shape, value, dtype, device: _shape_dtype(shape, dtype),
    sample=lambda rng: [([], dict(shape=(2, 3), value=1.5, dtype=np.dtype(np.float64), device="cpu"))],
    reference=lambda shape, value, dtype, device: np.full(shape, value, dtype)))


def _arange_len(start: float, stop: float, step: float) -> int:
    return max(0, int(np.ceil((stop - start) / step)))


arange = register(Op(
    "arange", kind="source",
    forward=lambda be, start, stop, step, dtype, device: be.arange(start, stop, step, dtype),
    infer=lambda start, stop, step, dtype, device: ((_arange_len(start, stop, step),), np.dtype(dtype)),
    sample=lambda rng: [([], dict(start=0, stop=5, step=1, dtype=np.dtype(np.int64), device="cpu"))],
    reference=lambda start, stop, step, dtype, device: np.arange(start, stop, step, dtype=dtype)))

random_normal = register(Op(
    "random_normal", kind="random", random=True,
    forward=lambda be, shape, dtype, device: be.random(NORMAL, shape, dtype),
    infer=lambda shape, dtype, device: _shape_dtype(shape, NORMAL.check_dtype(dtype)),
    doc="standard normal: Box-Muller of two Philox uniforms"))

random_uniform = register(Op(
    "random_uniform", kind="random", random=True,
    forward=lambda be, shape, dtype, device: be.random(UNIFORM, shape, dtype),
    infer=lambda shape, dtype, device: _shape_dtype(shape, UNIFORM.check_dtype(dtype)),
    doc="uniform in [0, 1): the top mantissa-many bits of a Philox word"))

bernoulli = register(Op(
    "bernoulli", kind="random", random=True,
    forward=lambda be, shape, p, dtype, device: be.random(BERNOULLI, shape, dtype, p=p),
    infer=lambda shape, p, dtype, device: _shape_dtype(shape, dtype),
    doc="1 with probability p else 0 (float32 uniform < p): the keep-mask of dropout"))
