"""Data-parallel training: every rank holds the model, trains on its shard of the batch,
and gradients are averaged over the ranks before the optimizer step.

    eg.distributed.init()
    model = nn.DistributedDataParallel(model)     # rank 0's parameters on every rank
    loss_fn(model(x_shard), y_shard).backward()   # gradients averaged during backward
    opt.step()

Gradients are averaged in buckets (about `bucket_cap_mb` each, parameters in reverse
order, roughly the order backward finishes them): a leaf-gradient hook marks each
parameter ready, and a bucket is reduced (one `all_reduce` op on the concatenated
gradients) as soon as its last parameter is ready, so earlier buckets travel while
backward still computes the rest. The all-reduce is an op, so under `eg.jit` the traced
step holds one all-reduce node per bucket and communicates at every call. Buckets are
fixed at construction, the same on every rank; a parameter that gets no gradient in a
backward raises (every rank must use every parameter, or the buckets would differ).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

import engine as eg
import ops
from engine import autograd, distributed

from .module import Module


class DistributedDataParallel(Module):
    """Wraps `module`: forward is the module's, backward averages gradients over ranks."""

    def __init__(self, module: Module, bucket_cap_mb: float = 25.0, group: Any = None) -> None:
        super().__init__()
        if bucket_cap_mb <= 0:
            raise ValueError(f"DistributedDataParallel: bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        self.module = module
        self._group = group if group is not None else distributed.group()
        self._sync = True
        params = [p for p in module.parameters() if p.requires_grad]
        with eg.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                self._group.broadcast_array(t._data, 0)
                t._version[0] += 1
        self.buckets = _buckets(params[::-1], bucket_cap_mb * 2 ** 20)
        self._ready: list[set[int]] = [set() for _ in self.buckets]
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._flush_queued = False
        self._unhook = [autograd.register_leaf_hook(p, self._on_grad) for p in params]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside the block only accumulates local gradients (gradient
        accumulation); the first backward after it averages the sums. Eager use: a
        jit-compiled step keeps the synchronisation it was traced with."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def _on_grad(self, p: Any) -> None:
        if not self._sync:
            return
        i = self._bucket_of[id(p)]
        self._ready[i].add(id(p))
        if not self._flush_queued:
            self._flush_queued = True
            autograd.queue_callback(self._check_complete)
        if len(self._ready[i]) == len(self.buckets[i]):
            self._reduce(self.buckets[i])

    def _reduce(self, bucket: list) -> None:
        """Average one bucket's gradients: one all_reduce of their concatenation."""
        with eg.no_grad():
            flat = eg.concatenate([p.grad.reshape(-1) for p in bucket]) if len(bucket) > 1 \
                else bucket[0].grad.reshape(-1)
            avg = ops.REGISTRY["all_reduce"](flat, group=self._group, reduction="mean")
            at = 0
            for p in bucket:
                n = int(np.prod(p.shape))
                p.grad = avg[at:at + n].reshape(p.shape)
                at += n

    def _check_complete(self) -> None:
        """End of backward: every bucket must have been reduced."""
        self._flush_queued = False
        missing = [p for b, r in zip(self.buckets, self._ready) for p in b if id(p) not in r]
        for r in self._ready:
            r.clear()
        if missing:
            names = {id(p): n for n, p in self.module.named_parameters()}
            raise distributed.DistributedError(
                f"DistributedDataParallel: {len(missing)} parameter(s) got no gradient in this "
                f"backward ({', '.join(names.get(id(p), '?') for p in missing[:3])}...): every "
                f"rank must use every parameter, or its gradient buckets would not match the "
                f"other ranks'")


def _buckets(params: list, cap_bytes: float) -> list[list]:
    """Consecutive parameters grouped into buckets of about cap_bytes each, one dtype
    per bucket (they are concatenated)."""
    buckets: list[list] = [[]]
    size = 0
    for p in params:
        nbytes = int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize
        if buckets[-1] and (size + nbytes > cap_bytes or buckets[-1][0].dtype != p.dtype):
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return [b for b in buckets if b]


__all__ = ["DistributedDataParallel"]
