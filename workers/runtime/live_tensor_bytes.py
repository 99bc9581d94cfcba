"""The bytes of tensors alive on one rank at the worst moment of a step (CPU ranks).

A CPU process has no allocator statistics like CUDA's `max_memory_allocated`, and its RSS
(or `ru_maxrss`, which only grows) counts the interpreter, libraries and freed-but-kept
pages, so it cannot be compared with an estimate of tensor bytes. This counts what the
estimate counts: every tensor storage the rank holds when the step starts (the base's
shards, the LoRA factors, their optimizer state), plus each storage an op creates inside
the step, until it is freed. A TorchDispatchMode sees every op's outputs; a weak reference
to each storage (torch keeps one Python object per live storage) says when it is freed.

The mode costs a Python call per op, so a host measures only one step of each
membership (workers.host.memory); on a GPU the device allocator's own peak is used instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes:
    """`with tracker:` counts the storages created inside (on the calling thread; autograd
    runs CPU backward there too); `peak` is the most bytes alive at any moment."""

    def __init__(self, device_type: str = "cpu") -> None:
        self.device_type = device_type
        self.live: dict[int, int] = {}  # storage id -> bytes
        self.refs: dict[int, weakref.ref[Any]] = {}
        self.current = self.peak = 0
        self._mode = _Mode(self)

    def hold(self, tensors: Iterable[torch.Tensor]) -> None:
        """Counts storages that exist before the step (and are not created by it)."""
        for tensor in tensors:
            self.track(tensor)

    def track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != self.device_type:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live or storage.nbytes() == 0:
            return
        self.live[key] = storage.nbytes()
        self.current += self.live[key]
        self.peak = max(self.peak, self.current)
        self.refs[key] = weakref.ref(storage, self._forgetter(key))

    def _forgetter(self, key: int) -> Any:
        return lambda _ref: self._forget(key)

    def _forget(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self.refs.pop(key, None)

    def __enter__(self) -> LiveTensorBytes:
        self._mode.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._mode.__exit__(kind, error, trace)


class _Mode(TorchDispatchMode):
    def __init__(self, tracker: LiveTensorBytes) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.tracker.track(value)
        return out


def held_tensors(
    model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]
) -> Iterator[torch.Tensor]:
    """What a rank holds between steps: each parameter's local data (a ZeRO-3 parameter's
    shard, `ds_tensor`, and whatever of it is gathered now), gradients, buffers, and the
    optimizers' state (Adam's moments)."""
    for param in model.parameters():
        shard = getattr(param, "ds_tensor", None)
        if shard is not None:
            yield shard
        yield param.data
        if param.grad is not None:
            yield param.grad
    yield from model.buffers()
    for optimizer in optimizers:
        for state in optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))
