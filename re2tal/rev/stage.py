"""Reversible residual stages: the Re²TAL rewiring and its memory-free backward.

A stage of residual functions F_1..F_n, originally x_i = x_{i-1} + F_i(x_{i-1}), is rewired to

    x_i = x_{i-2} + F_i(x_{i-1}),   x_{-1} = x_0 = stage input,   output = (x_{n-1} + x_n) / 2.

Written as two streams (a, b) = (x_{i-2}, x_{i-1}), one step is (a, b) -> (b, a + F_i(b)) and its
inverse is a = c - F_i(b): given the last two streams every earlier one can be recomputed, so
nothing per block is kept for backward. Parameters are untouched, so pretrained weights load as
they are. All tensors here have the stage's activation shape, e.g. (B, T, H, W, C).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

ResidualFn = Callable[[Tensor], Tensor]


class RevStage(nn.Module):
    """A reversible stage built from blocks that expose their residual functions.

    Each block has `residual_fns() -> list[Callable[[Tensor], Tensor]]`, its residual functions in
    order (a transformer block: [attention branch, MLP branch]; a bottleneck: [branch]); each maps
    a tensor to one of the same shape and uses only the block's own submodules. Blocks are
    registered as children "0", "1", ..., so state-dict keys equal those of
    `nn.Sequential(*blocks)`; given as a mapping name -> block they keep their names (those of
    `nn.Sequential(OrderedDict(blocks))`).

    lead: the first `lead` blocks run ordinarily before the reversible part and need no
    `residual_fns()` (a ResNet stage's first block changes channels and stride, so it cannot be
    inverted); they keep their place, so the keys are still those of `nn.Sequential(*blocks)`.
    They run under activation checkpointing (`checkpointed`): only their input is kept.

    fp32_streams: keep the two streams in fp32 when the input or the autocast precision is lower
    (F_i still run in low precision); False keeps them in the compute precision (autocast dtype if
    autocast is on, else the input dtype), which halves the two saved tensors but lets
    reconstruction drift. `vanilla = True` runs the same rewired computation under plain autograd
    (reference for tests; keeps every activation).

    Randomness: in training mode every forward draws one base seed from the global CPU generator
    and runs F_i on generators seeded with base + i (then restores the global ones), in all
    paths, so dropout / drop-path masks are the same in the forward, the recomputation and the
    vanilla path, and other code's random stream only ever moves by that one draw.

    Memory: kept for backward are the leading blocks' input, the output y and b_n
    (a_n = 2 y - b_n), or a_n and b_n when y is in a lower precision than the streams; so a next
    layer that keeps y shares it, and the stage must not be followed by an in-place change of y
    (autograd would report it).

    Limitations: parameter gradients are accumulated into `.grad` by a nested
    `torch.autograd.backward` (like reentrant checkpointing), so use `loss.backward()`;
    `torch.autograd.grad(loss, params)` does not see them. Under DDP keep
    `find_unused_parameters=False` (the default).
    """

    def __init__(self, blocks: Sequence[nn.Module] | Mapping[str, nn.Module], *, lead: int = 0, fp32_streams: bool = True):
        super().__init__()
        named = list(blocks.items()) if isinstance(blocks, Mapping) else [(str(i), b) for i, b in enumerate(blocks)]
        if not 0 <= lead < len(named):
            raise ValueError(f"RevStage: needs at least one block after the {lead} leading ones, got {len(named)}")
        for i, (name, block) in enumerate(named):
            if i >= lead and not callable(getattr(block, "residual_fns", None)):
                raise TypeError(f"RevStage: block {i} ({type(block).__name__}) has no residual_fns() method")
            self.add_module(name, block)
        self.lead = lead
        self.fp32_streams = fp32_streams
        self.vanilla = False

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __getitem__(self, i: int) -> nn.Module:
        return list(self._modules.values())[i]

    def reversible_blocks(self) -> list[nn.Module]:
        """The blocks after the leading ordinary ones."""
        return list(self)[self.lead:]

    def residual_fns(self) -> list[ResidualFn]:
        """F_1..F_n of the reversible part, in order."""
        return [fn for block in self.reversible_blocks() for fn in block.residual_fns()]

    def extra_repr(self) -> str:
        return f"lead={self.lead}, fp32_streams={self.fp32_streams}"

    def forward(self, x: Tensor) -> Tensor:
        """The leading blocks, then (a_n + b_n) / 2 after n steps from a_0 = b_0 = their output;
        the reversible part keeps shape and dtype."""
        for block in list(self)[:self.lead]:
            x = checkpointed(block, x) if torch.is_grad_enabled() and not self.vanilla else block(x)
        fns = self.residual_fns()
        spec = _Precision.of(x, self.fp32_streams)
        seed = _draw_seed() if self.training else None
        if self.vanilla:
            return spec.output(*_streams(fns, x, spec, seed))
        rev = self.reversible_blocks()
        params_need_grad = any(p.requires_grad for block in rev for p in block.parameters())
        if not torch.is_grad_enabled() or not (x.requires_grad or params_need_grad):
            with torch.no_grad():
                return spec.output(*_streams(fns, x, spec, seed))
        # Function.apply only builds a graph node when an input requires grad; a stage whose
        # input is constant (frozen stem) but whose parameters train needs one anyway.
        anchor = x.new_empty(0, requires_grad=True) if not x.requires_grad else None
        return _RevFunction.apply(x, anchor, rev, fns, spec, seed)


class _Precision:
    """Dtypes of one forward: the streams' (`stream`), what F_i get (`fn_in`, None = the stream
    itself, autocast casts), the output's (`out`), and the autocast state to re-enter."""

    def __init__(self, stream: torch.dtype, fn_in: torch.dtype | None, out: torch.dtype, device: torch.device,
                 autocast: bool, autocast_dtype: torch.dtype):
        self.stream, self.fn_in, self.out, self.device = stream, fn_in, out, device
        self.autocast, self.autocast_dtype = autocast, autocast_dtype

    @classmethod
    def of(cls, x: Tensor, fp32_streams: bool) -> "_Precision":
        dev = x.device.type
        # devices without autocast (the meta device of `re2tal plan`) never run under it
        autocast = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
        autocast_dtype = torch.get_autocast_dtype(dev) if autocast else x.dtype
        if fp32_streams:
            stream = torch.promote_types(x.dtype, torch.float32)
        else:
            stream = autocast_dtype if autocast else x.dtype
        # Without autocast the parameters are in x's dtype (e.g. a DeepSpeed bf16 engine), so F_i
        # must see x's dtype, as the unrewired block did; under autocast its casts do the work.
        fn_in = None if autocast else x.dtype
        return cls(stream, fn_in, x.dtype, x.device, autocast, autocast_dtype)

    def fn_input(self, b: Tensor) -> Tensor:
        return b if self.fn_in is None else b.to(self.fn_in)

    def output(self, a: Tensor, b: Tensor) -> Tensor:
        return ((a + b) * 0.5).to(self.out)

    def autocast_ctx(self) -> torch.autocast | nullcontext:
        if not self.autocast:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def _streams(fns: Sequence[ResidualFn], x: Tensor, spec: _Precision, seed: int | None) -> tuple[Tensor, Tensor]:
    """(a_n, b_n) from a_0 = b_0 = x by (a, b) -> (b, a + F_i(b)).

    Without grad, from step 2 on a_i = a_{i-1} + F_i is written into a_{i-1}'s buffer (made
    here, no longer needed): two stream buffers for the whole stage instead of one per step plus
    a stream-dtype copy of F_i's output (the sum promotes it). Steps 0 and 1 read x's buffer."""
    a = b = x.to(spec.stream)
    in_place = not torch.is_grad_enabled()
    with _rng_substreams(spec.device, seed) as select:
        for i, fn in enumerate(fns):
            select(i)
            f = fn(spec.fn_input(b))
            a, b = b, a.add_(_addend(f, spec.stream)) if in_place and i >= 2 else a + f.to(spec.stream)
            del f
    return a, b


def _addend(f: Tensor, stream: torch.dtype) -> Tensor:
    """f as the in-place update of a stream adds it: a narrower f is widened exactly inside the
    op (no copy); a wider one is rounded to the stream dtype first, as `a + f.to(stream)` does."""
    return f if torch.promote_types(f.dtype, stream) == stream else f.to(stream)


def _draw_seed() -> int:
    """One draw from the global CPU generator: the base seed of a training forward's F_i."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


@contextmanager
def _rng_substreams(device: torch.device, seed: int | None) -> Iterator[Callable[[int], None]]:
    """`select(i)` seeds the CPU generator (and x's CUDA one) with seed + i, so F_i draws the same
    dropout / drop-path masks in the forward and in the recomputation. The global generators are
    restored on exit: other code's randomness is untouched, and one base seed per stage replaces
    a 5 KB generator state per F_i. seed None (eval mode): nothing is seeded."""
    if seed is None:
        yield lambda i: None
        return
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        def select(i: int) -> None:
            torch.default_generator.manual_seed(seed + i)
            if cuda:
                torch.cuda.default_generators[device.index].manual_seed(seed + i)

        yield select


class _RevFunction(torch.autograd.Function):
    """Keeps only (a_n, b_n); backward walks the steps in reverse, reconstructing each F_i's
    input and back-propagating through F_i once."""

    @staticmethod
    def forward(ctx, x: Tensor, anchor: Tensor | None, blocks: list[nn.Module], fns: list[ResidualFn],
                spec: _Precision, seed: int | None) -> Tensor:
        a, b = _streams(fns, x, spec, seed)
        y = spec.output(a, b)
        # Any two of (a_n, b_n, y) determine the third. y exists anyway and the next layer often
        # keeps it too (a LayerNorm, a checkpointed patch merging): keeping (y, b_n) then costs
        # one tensor, not two. A y rounded to a lower dtype than the streams cannot give a_n back.
        ctx.from_output = y.dtype == a.dtype
        # Every tensor kept goes through save_for_backward so saved-tensor hooks (offloading, the
        # memory benchmark) see it; ctx attributes hold only non-tensor metadata.
        ctx.save_for_backward(y if ctx.from_output else a, b)
        ctx.blocks, ctx.fns, ctx.spec, ctx.seed = blocks, fns, spec, seed
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        """With (ga, gb) = dL/d(a_i, b_i) and z = a_i = b_{i-1}, f = F_i(z):
        a_{i-1} = b_i - f,  dL/da_{i-1} = gb,  dL/db_{i-1} = ga + J_f(z)^T gb;  dL/dx = ga_0 + gb_0."""
        a, b = ctx.saved_tensors
        if ctx.from_output:
            a = b.mul(-1).add_(a, alpha=2)  # a_n = 2 y - b_n; y is the caller's, never written
        fns, spec = ctx.fns, ctx.spec
        ga = gb = dy.to(spec.stream) * 0.5
        # Memory: from the third step on, a_{i-1} = b_i - f is written into b_i's buffer (made
        # by this loop two steps before, no longer needed), so the backward allocates no stream
        # per step and no stream-dtype copy of f; the saved (a_n, b_n) are never written, so a
        # retained graph can run backward again.
        with _rng_substreams(spec.device, ctx.seed) as select, running_stats_kept(ctx.blocks), spec.autocast_ctx():
            for k, i in enumerate(reversed(range(len(fns)))):
                select(i)
                z = a.detach().requires_grad_()
                with torch.enable_grad():
                    f = fns[i](spec.fn_input(z))
                if i > 0:
                    a = b.sub_(_addend(f.detach(), spec.stream)) if k >= 2 else b - f.detach().to(spec.stream)
                b = z.detach()
                # One evaluation of F_i serves both the reconstruction above and this backward;
                # parameter .grad accumulates through the ordinary path, so DDP / ZeRO gradient
                # hooks fire once per use.
                if f.requires_grad:
                    torch.autograd.backward(f, gb.to(f.dtype))
                dz = z.grad
                del f, z
                ga, gb = gb, ga if dz is None else dz.add_(ga)  # dz is ours: add in place
        dx = (ga + gb).to(spec.out) if ctx.needs_input_grad[0] else None
        return dx, None, None, None, None, None


@contextmanager
def running_stats_kept(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Restore the blocks' BatchNorm running statistics on exit, also by an exception (torch's
    checkpoint stops a recomputation early by raising): around a recomputation, which would
    otherwise update them a second time per forward."""
    norms = [m for block in blocks for m in block.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    saved = [[buf.clone() for buf in m.buffers(recurse=False)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, values in zip(norms, saved):
                for buf, value in zip(m.buffers(recurse=False), values):
                    buf.copy_(value)


def checkpointed(module: nn.Module, x: Tensor) -> Tensor:
    """module(x) keeping only x for backward: non-reentrant activation checkpointing (RNG
    replayed), whose recomputation leaves the BatchNorm running statistics as the forward did."""
    return checkpoint(module, x, use_reentrant=False, context_fn=lambda: (nullcontext(), running_stats_kept([module])))
