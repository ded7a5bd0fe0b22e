"""Process memory for benchmarks and ``peftkit compare``: current and peak RSS, and resetting the peak.

Linux keeps a per-process peak RSS (VmHWM, what ``ru_maxrss`` reports); writing "5" to
/proc/self/clear_refs resets it to the current RSS, so a setup-time peak (loading or converting weights)
does not hide the peak of training. Elsewhere the reset is unavailable and the peak covers the whole process.
"""

from __future__ import annotations

import os
import resource
from typing import Any


def current_rss() -> int:
    """Resident set size now, in bytes."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """Peak resident set size since the process started or since :func:`reset_peak_rss`, in bytes."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class TorchMemoryTracker:
    """Peak bytes of live tensor storage while it is active, the way a GPU's ``max_memory_allocated`` counts
    them, on any device (CPU included): every storage an op creates is counted until it is freed.

    ``TorchMemoryTracker(tensors)`` counts the storages of ``tensors`` (parameters, buffers, optimizer state:
    what exists before the step) from the start. Storages are weighed by their bytes (a view counts its whole
    storage once); a storage resized in place (FSDP2 frees and re-allocates its all-gather buffers with
    ``UntypedStorage.resize_``, which is no op a dispatch mode sees) is re-weighed. :meth:`phase` closes a
    phase of the step (forward, backward, ...) and records its own peak in :attr:`phases`. Not seen: memory a
    tensor subclass allocates inside its own ops (torchao's NF4 weight dequantised for one matmul), buffers
    inside collectives and allocator rounding or caching."""

    def __init__(self, tensors: list[Any] | None = None) -> None:
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.phases: dict[str, int] = {}
        self._phase_peak = 0
        self._mode: Any = None
        self._resize: Any = None
        for t in tensors or []:
            self._add(t)
        self.start = self.current

    def _count(self, delta: int) -> None:
        self.current += delta
        self.peak = max(self.peak, self.current)
        self._phase_peak = max(self._phase_peak, self.current)

    def _add(self, t: Any) -> None:
        import torch

        if not isinstance(t, torch.Tensor):
            return
        inner = getattr(type(t), "__tensor_flatten__", None)
        if inner is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
            names, _ = t.__tensor_flatten__()
            for n in names:
                self._add(getattr(t, n))
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        self._add_storage(storage)

    def _add_storage(self, storage: Any) -> None:
        import weakref

        try:
            key = storage._cdata
            nbytes = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            return
        if key in self.live or storage.device.type == "meta":
            return
        self.live[key] = nbytes
        self._count(nbytes)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def _resized(self, storage: Any) -> None:
        key = storage._cdata
        if key not in self.live:  # e.g. a buffer made before the tracker and freed by resizing, now re-allocated
            self._add_storage(storage)
            return
        nbytes = storage.nbytes()
        delta, self.live[key] = nbytes - self.live[key], nbytes
        self._count(delta)

    def phase(self, name: str) -> int:
        """Close the phase that ends now: its peak (bytes) is recorded under ``name`` and returned."""
        self.phases[name] = self._phase_peak
        self._phase_peak = self.current
        return self.phases[name]

    def __enter__(self) -> TorchMemoryTracker:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker._add(t)
                return out

        resize = torch.UntypedStorage.resize_

        def resized(storage: Any, size: int) -> Any:
            out = resize(storage, size)
            tracker._resized(storage)
            return out

        self.peak = self._phase_peak = self.current
        self._resize = torch.UntypedStorage.__dict__.get("resize_")  # usually inherited from the C base
        torch.UntypedStorage.resize_ = resized
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        self._mode.__exit__(*exc)
        if self._resize is None:
            del torch.UntypedStorage.resize_
        else:
            torch.UntypedStorage.resize_ = self._resize
