"""Counting the memory of a training step without running it for real (used by `re2tal plan`).

A model moved to the meta device runs its real forward and backward code, op by op, with tensors
that have shapes, dtypes and strides but no data. Three tools turn that into bytes:

- `LiveBytes`, a TorchDispatchMode: every op output's storage is counted from the op that
  allocates it until its last reference goes (a weak reference on the storage), so `peak` is the
  high-water mark of live tensor bytes, what `torch.cuda.max_memory_allocated` measures up to the
  allocator's 512-byte rounding. Autograd's own ops (gradient accumulation, recomputation inside
  checkpointing or reversible stages) go through the dispatcher and are counted too.
- `SavedTensors`: unique storages kept for backward (saved-tensor hooks plus tensors held in
  custom Function nodes), the "activations" of a step.
- `TargetAttention`, a TorchFunctionMode: on the meta device `F.scaled_dot_product_attention`
  always takes the math path, which keeps the (N x N) attention matrices; this picks the kernel
  the target device would (CUDA: flash without a mask in fp16 / bf16, else memory-efficient;
  CPU: torch's own choice), whose saved tensors and gradients differ.

Not seen: allocator caching and fragmentation, the CUDA / NCCL context, cuDNN / cuBLAS workspaces
and other memory a kernel allocates outside the dispatcher, and kernel choices beyond attention
(cuDNN attention on Hopper is not modelled; see `TargetAttention`).
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# torch.nn.attention.SDPBackend values, as returned by torch._fused_sdp_choice
SDP_MATH, SDP_FLASH, SDP_EFFICIENT = 0, 1, 2
MEM_EFFICIENT_MASK_ALIGNMENT = 8  # aten's preprocess_mask pads the mask's rows to this


def storage_key(t: Tensor) -> int:
    """Identity of a tensor's storage, also on the meta device (where data_ptr is 0)."""
    return t.untyped_storage()._cdata


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages of `tensors`."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen.setdefault(storage_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages allocated by ops run inside (any device). Storages that existed
    before (`exclude`: parameters, buffers, inputs) are not counted, nor are views and aliases of
    storages already counted.

    `layouts`: a dict, shareable between trackers, that caches the output layouts of meta-device
    ops which return fresh tensors (no aliasing, no mutation): many meta kernels are Python
    (BatchNorm ~3 ms, cat ~3 ms a call) and a network repeats few input signatures."""

    def __init__(self, exclude: Iterable[Tensor] = (), layouts: dict | None = None):
        super().__init__()
        self.excluded = {storage_key(t) for t in exclude}
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}
        self._layouts = {} if layouts is None else layouts

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._refs.pop(key, None)

    def _count(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._refs or key in self.excluded:
            return
        nbytes = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._freed(key, nbytes))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _fresh_outputs(func) and _on_meta(args):
            out = self._memo_call(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self._count(t)
        return out

    def _memo_call(self, func, args: tuple, kwargs: dict) -> Any:
        key = (func, _signature(args), _signature(kwargs))
        layout = self._layouts.get(key)
        if layout is None:
            out = func(*args, **kwargs)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if all(t is None or (isinstance(t, Tensor) and _plain_layout(t)) for t in outs):
                self._layouts[key] = (isinstance(out, (tuple, list)), [None if t is None else (t.shape, t.stride(), t.dtype) for t in outs])
            else:  # e.g. a padded allocation sliced to size: not reproducible from the layout alone
                self._layouts[key] = False
            return out
        if layout is False:
            return func(*args, **kwargs)
        many, specs = layout
        outs = [None if spec is None else torch.empty_strided(spec[0], spec[1], dtype=spec[2], device="meta") for spec in specs]
        return tuple(outs) if many else outs[0]


@functools.lru_cache(maxsize=None)
def _fresh_outputs(func) -> bool:
    """An op that mutates nothing and whose outputs alias no input."""
    schema = func._schema
    return not schema.is_mutable and all(r.alias_info is None for r in schema.returns) and len(schema.returns) > 0 \
        and all(str(r.type) in ("Tensor", "Tensor?") for r in schema.returns)


def _on_meta(args: tuple) -> bool:
    return any(isinstance(a, Tensor) and a.device.type == "meta" for a in args) or \
        any(isinstance(a, (list, tuple)) and any(isinstance(t, Tensor) and t.device.type == "meta" for t in a) for a in args)


def _plain_layout(t: Tensor) -> bool:
    """t's storage is exactly what empty_strided(t.shape, t.stride()) would allocate."""
    if t.storage_offset() != 0 or t.device.type != "meta":
        return False
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
    return t.untyped_storage().nbytes() == extent * t.element_size()


def _signature(obj: Any) -> Any:
    """A hashable description of op arguments: tensors by layout, containers element-wise."""
    if isinstance(obj, Tensor):
        return ("tensor", tuple(obj.shape), obj.stride(), obj.dtype, obj.device.type)
    if isinstance(obj, (list, tuple)):
        return tuple(_signature(v) for v in obj)
    if isinstance(obj, dict):
        return tuple(sorted((k, _signature(v)) for k, v in obj.items()))
    return obj


class SavedTensors:
    """Unique storages kept for backward by the forward run inside `with counter:`, plus tensors
    reachable from the graph of the outputs passed to `add_graph` (ctx attributes and the like).
    Tensors sharing storage with `exclude` (parameters, buffers) are not counted."""

    def __init__(self, exclude: Iterable[Tensor] = ()):
        self.excluded = {storage_key(t) for t in exclude}
        self.storages: dict[int, int] = {}
        self.graph_only: set[int] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _add(self, t: Tensor) -> bool:
        key = storage_key(t)
        if key in self.excluded or key in self.storages:
            return False
        self.storages[key] = t.untyped_storage().nbytes()
        return True

    def _pack(self, t: Tensor) -> Tensor:
        self._add(t)
        return t

    def __enter__(self) -> "SavedTensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def add_graph(self, outputs: Iterable[Tensor]) -> None:
        """Walk grad_fn.next_functions from the outputs; count tensors held in the attributes of
        Python (custom Function) nodes, e.g. `ctx.x = x` instead of `ctx.save_for_backward(x)`."""
        stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
        seen = set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            for t in _tensors_in(getattr(node, "__dict__", {}), depth=3):
                if self._add(t):
                    self.graph_only.add(storage_key(t))
            stack.extend(n for n, _ in node.next_functions)

    @property
    def total_bytes(self) -> int:
        return sum(self.storages.values())

    @property
    def graph_only_bytes(self) -> int:
        return sum(self.storages[k] for k in self.graph_only)


def _tensors_in(obj: Any, depth: int) -> Iterable[Tensor]:
    """Tensors in obj, looking into containers and plain objects' attributes (not modules,
    whose parameters and buffers are not activations)."""
    if isinstance(obj, Tensor):
        yield obj
    elif depth == 0 or isinstance(obj, (nn.Module, str, bytes, type)) or callable(obj):
        return
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, depth - 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _tensors_in(v, depth - 1)
    elif hasattr(obj, "__dict__"):
        yield from _tensors_in(vars(obj), depth - 1)


class TargetAttention(TorchFunctionMode):
    """`F.scaled_dot_product_attention` on meta tensors runs the kernel `device_type` would pick,
    following aten's composite (mask conversion and padding included):

    - "cuda": flash attention when there is no mask and q is fp16 / bf16 with a head size <= 256,
      else memory-efficient attention (masks and fp32 too), else math. This is torch's order on
      Ampere / Hopper; cuDNN attention, which recent torch may prefer on Hopper, is not modelled.
      Memory-efficient attention's backward materialises the gradient of an expanded mask that
      requires grad (Swin's relative position bias) at (B, heads, N, N).
    - "cpu": whatever `torch._fused_sdp_choice` says for CPU tensors of these shapes, dtypes and
      requires_grad (flash, or math when the mask requires grad).
    Other calls pass through. The backward must run with this mode on (recomputation calls
    attention): use `run_backward`, since `Tensor.backward` would switch it off."""

    def __init__(self, device_type: str):
        super().__init__()
        if device_type not in ("cuda", "cpu"):
            raise ValueError(f"TargetAttention: device_type must be cuda or cpu, got {device_type!r}")
        self.device_type = device_type

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].device.type == "meta":
            return self._attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                   is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # aten's convert_boolean_attn_mask
            attn_mask = torch.where(attn_mask, 0.0, torch.tensor(float("-inf"), dtype=q.dtype, device=q.device))
        choice = self._choice(q, k, v, attn_mask, dropout_p, is_causal)
        if choice == SDP_FLASH and self.device_type == "cpu":
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
        if choice == SDP_FLASH:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
        if choice == SDP_EFFICIENT:
            if attn_mask is not None:
                attn_mask = _padded_mask(attn_mask).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, grad, dropout_p, is_causal, scale=scale)[0]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)

    def _choice(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, is_causal: bool) -> int:
        if q.dim() != 4:
            return SDP_MATH
        if self.device_type == "cpu":
            proxies = [_proxy(t) for t in (q, k, v)]
            return int(torch._fused_sdp_choice(*proxies, attn_mask=None if mask is None else _proxy(mask),
                                               dropout_p=dropout_p, is_causal=is_causal))
        head = q.shape[-1]
        if mask is None and q.dtype in (torch.float16, torch.bfloat16) and head <= 256 and head % 8 == 0:
            return SDP_FLASH
        if head % (8 if q.dtype in (torch.float16, torch.bfloat16) else 4) == 0:
            return SDP_EFFICIENT
        return SDP_MATH


def _proxy(t: Tensor) -> Tensor:
    """A CPU tensor with t's shape, dtype and requires_grad whose storage is one row (stride 0
    except the last dim): enough for torch's kernel choice, which reads no data."""
    row = torch.empty(t.shape[-1], dtype=t.dtype)
    return row.as_strided(t.shape, (0,) * (t.dim() - 1) + (1,)).requires_grad_(t.requires_grad)


def _padded_mask(mask: Tensor) -> Tensor:
    """aten's preprocess_mask for memory-efficient attention: a mask whose strides are not
    multiples of 8 is copied into one with rows padded to a multiple of 8 (then sliced back)."""
    a = MEM_EFFICIENT_MASK_ALIGNMENT
    aligned = all(s % a == 0 for s in mask.stride()[:-1]) and mask.stride(-1) == 1
    if aligned:
        return mask
    last = mask.shape[-1]
    return F.pad(mask, (0, a - last % a))[..., :last]


def run_backward(outputs: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """`torch.autograd.backward(outputs, grads)` straight into the autograd engine, so the torch
    function modes active here (TargetAttention) stay active during the backward."""
    from torch.autograd.graph import _engine_run_backward

    _engine_run_backward(tuple(outputs), tuple(grads), False, False, (), allow_unreachable=True, accumulate_grad=True)
