"""Reversible residual stages: the Re²TAL rewiring and its memory-free backward.

A stage of residual functions F_1..F_n, originally x_i = x_{i-1} + F_i(x_{i-1}), is rewired to

    x_i = x_{i-2} + F_i(x_{i-1}),   x_{-1} = x_0 = stage input,   output = (x_{n-1} + x_n) / 2.

Written as two streams (a, b) = (x_{i-2}, x_{i-1}), one step is (a, b) -> (b, a + F_i(b)) and its
inverse is a = c - F_i(b): given the last two streams every earlier one can be recomputed, so
nothing per block is kept for backward. Parameters are untouched, so pretrained weights load as
they are. All tensors here have the stage's activation shape, e.g. (B, T, H, W, C).

Residual functions that are local along a dimension (`re2tal.rev.pieces`) run piece by piece in
the forward and in the backward's recomputation and back-propagation, so neither holds more
than one piece's intermediate tensors.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from re2tal.rev.pieces import Pieces, default_piece_size

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

    piece_size: a residual function whose block declares it local along a dimension
    (`residual_pieces()`, see re2tal.rev.pieces) runs in pieces of at most this many elements of
    the stage tensor (whole windows / samples as the declaration allows), in the forward and the
    backward; 0 runs every function whole, None takes the input device's default
    (`default_piece_size`). The vanilla path runs them whole.

    Memory: kept for backward are the leading blocks' input, the output y and b_n
    (a_n = 2 y - b_n), or a_n and b_n when y is in a lower precision than the streams; so a next
    layer that keeps y shares it, and the stage must not be followed by an in-place change of y
    (autograd would report it). The backward holds two stream-sized gradients and reconstructs
    the streams in the kept buffers (in new ones while autograd keeps the graph, retain_graph),
    plus one piece's recomputation.

    Limitations: parameter gradients are accumulated into `.grad` by a nested
    `torch.autograd.backward` (like reentrant checkpointing), so use `loss.backward()`;
    `torch.autograd.grad(loss, params)` does not see them. Under DDP keep
    `find_unused_parameters=False` (the default).
    """

    def __init__(self, blocks: Sequence[nn.Module] | Mapping[str, nn.Module], *, lead: int = 0, fp32_streams: bool = True,
                 piece_size: int | None = 0):
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
        if piece_size is not None and piece_size < 0:
            raise ValueError(f"RevStage: piece_size must be >= 0, got {piece_size}")
        self.piece_size = piece_size
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

    def residual_pieces(self) -> list[Pieces | None]:
        """How each of F_1..F_n may run in pieces (None: whole), as its block declares it."""
        return [pieces for block in self.reversible_blocks() for pieces in _pieces_of(block)]

    def extra_repr(self) -> str:
        return f"lead={self.lead}, fp32_streams={self.fp32_streams}, piece_size={self.piece_size}"

    def forward(self, x: Tensor) -> Tensor:
        """The leading blocks, then (a_n + b_n) / 2 after n steps from a_0 = b_0 = their output;
        the reversible part keeps shape and dtype."""
        for block in list(self)[:self.lead]:
            x = checkpointed(block, x) if torch.is_grad_enabled() and not self.vanilla else block(x)
        spec = _Precision.of(x, self.fp32_streams)
        seed = _draw_seed() if self.training else None
        rev = self.reversible_blocks()
        piece_size = 0 if self.vanilla else default_piece_size(x.device.type) if self.piece_size is None else self.piece_size
        steps = [_Step.of(fn, block, pieces, x, piece_size) for block in rev for fn, pieces in zip(block.residual_fns(), _pieces_of(block))]
        if self.vanilla:
            return spec.output(*_streams(steps, x, spec, seed))
        if not torch.is_grad_enabled() or not (x.requires_grad or any(s.params for s in steps)):
            with torch.no_grad():
                return spec.output(*_streams(steps, x, spec, seed))
        # Function.apply only builds a graph node when an input requires grad; a stage whose
        # input is constant (frozen stem) but whose parameters train needs one anyway.
        anchor = x.new_empty(0, requires_grad=True) if not x.requires_grad else None
        return _RevFunction.apply(x, anchor, rev, steps, spec, seed)


class _Precision:
    """Dtypes of one forward: the streams' (`stream`), what F_i get (`fn_in`, None = the stream
    itself, autocast casts), the output's (`out`), and the autocast state to re-enter."""

    def __init__(self, stream: torch.dtype, fn_in: torch.dtype | None, out: torch.dtype, device: torch.device,
                 autocast: bool, autocast_dtype: torch.dtype):
        self.stream, self.fn_in, self.out, self.device = stream, fn_in, out, device
        self.autocast, self.autocast_dtype = autocast, autocast_dtype
        self.low_precision = autocast_dtype.itemsize < 4  # F_i compute in less than fp32

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
        return cls(stream, fn_in, x.dtype, x.device, autocast, autocast_dtype)  # autocast_dtype: x's without autocast

    def fn_input(self, b: Tensor) -> Tensor:
        return b if self.fn_in is None else b.to(self.fn_in)

    def output(self, a: Tensor, b: Tensor) -> Tensor:
        return ((a + b) * 0.5).to(self.out)

    def autocast_ctx(self) -> torch.autocast | nullcontext:
        if not self.autocast:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def _pieces_of(block: nn.Module) -> list[Pieces | None]:
    """The block's `residual_pieces()`, one per residual function; all None if it declares none."""
    n = len(block.residual_fns())
    declared = getattr(block, "residual_pieces", None)
    pieces = list(declared()) if callable(declared) else [None] * n
    if len(pieces) != n:
        raise ValueError(f"RevStage: {type(block).__name__}.residual_pieces() has {len(pieces)} entries for {n} residual functions")
    return pieces


Span = tuple[int, int] | None  # [start, stop) along the pieces' dimension; None: the whole tensor


@dataclass
class _Step:
    """F_i with the parameters it may use (its block's that need grad) and where it runs: spans
    along `pieces.dim`, or [None] (whole)."""

    fn: ResidualFn
    params: list[nn.Parameter]
    pieces: Pieces | None
    spans: list[Span]

    @classmethod
    def of(cls, fn: ResidualFn, block: nn.Module, pieces: Pieces | None, x: Tensor, piece_size: int) -> "_Step":
        """F_i of `block` on the stage tensor x."""
        spans: list[Span] = [None]
        if pieces is not None and piece_size > 0:
            cut = pieces.spans(x.shape, piece_size)
            spans = cut if len(cut) > 1 else [None]
        if x.is_meta and len(spans) > 3:
            spans = planned_spans(spans)
        return cls(fn, [p for p in block.parameters() if p.requires_grad], pieces, spans)

    def piece(self, t: Tensor, span: Span) -> Tensor:
        return t if span is None else t.narrow(self.pieces.dim, span[0], span[1] - span[0])

    def run(self, x: Tensor, span: Span, size: int) -> Tensor:
        """F_i on the piece x of the stage tensor (size: the length of the pieces' dimension)."""
        return self.fn(x) if span is None else self.pieces.call(self.fn, x, span[0], size)


def planned_spans(spans: list[Span]) -> list[Span]:
    """The pieces run on the meta device (`re2tal plan`: shapes, no data): from the second on,
    pieces of one length allocate and free alike (the second, as all later ones, next to the sums
    of the earlier ones' parameter gradients), and only the first and the last lie at an end, so
    the first two and the last stand for all; thousands of pieces at paper scale cost seconds."""
    return spans[:2] + spans[-1:]


def _streams(steps: Sequence[_Step], x: Tensor, spec: _Precision, seed: int | None, like_backward: bool = False) -> tuple[Tensor, Tensor]:
    """(a_n, b_n) from a_0 = b_0 = x by (a, b) -> (b, a + F_i(b)).

    With grad (the vanilla path) through plain autograd, F_i whole. Without grad, F_i piece by
    piece, and from step 2 on a_i = a_{i-1} + F_i is written into a_{i-1}'s buffer (made here,
    no longer needed): two stream buffers for the whole stage instead of one per step plus a
    stream-dtype copy of F_i's output (the sum promotes it). Steps 0 and 1 read x's buffer.

    like_backward: F_i runs as the backward will recompute it, with grad on and its input
    requiring grad (the graph dropped at once), so that kernels which depend on that (CPU
    attention: flash without grad, math with a mask that requires grad) compute the same bits
    and the backward reconstructs the streams exactly. The forward asks for it in low precision
    only: there such kernels differ by ~1e-2 (a bf16 reconstruction would drift), in fp32 by
    ~1e-7, where the faster no-grad kernels are kept (CPU: about a third of a step)."""
    a = b = x.to(spec.stream)
    with _rng_substreams(spec.device, seed) as select:
        for i, step in enumerate(steps):
            if torch.is_grad_enabled():
                select(i)
                a, b = b, a + step.fn(spec.fn_input(b)).to(spec.stream)
                continue
            new = a if i >= 2 else torch.empty_like(a)
            size = x.shape[step.pieces.dim] if step.pieces is not None else 0
            for span in step.spans:
                select(i)
                bp = step.piece(b, span)
                if like_backward:  # (the saved-tensor hooks of whoever watches the forward must not see this graph)
                    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_detached, _same):
                        f = step.run(spec.fn_input(bp.detach().requires_grad_()), span, size).detach()
                else:
                    f = step.run(spec.fn_input(bp), span, size)
                torch.add(step.piece(a, span), _addend(f, spec.stream), out=step.piece(new, span))
                del f
            a, b = b, new
    return a, b


def _same(t: Tensor) -> Tensor:
    return t


def _detached(t: Tensor) -> Tensor:
    """A pack hook for a graph that is never run backward: keeping a saved output with its
    grad_fn would make a reference cycle that outlives the graph."""
    return t.detach()


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
    input and back-propagating through F_i once, piece by piece."""

    @staticmethod
    def forward(ctx, x: Tensor, anchor: Tensor | None, blocks: list[nn.Module], steps: list[_Step],
                spec: _Precision, seed: int | None) -> Tensor:
        a, b = _streams(steps, x, spec, seed, like_backward=spec.low_precision)
        y = spec.output(a, b)
        # Any two of (a_n, b_n, y) determine the third. y exists anyway and the next layer often
        # keeps it too (a LayerNorm, a checkpointed patch merging): keeping (y, b_n) then costs
        # one tensor, not two. A y rounded to a lower dtype than the streams cannot give a_n back.
        ctx.from_output = y.dtype == a.dtype
        # Every tensor kept goes through save_for_backward so saved-tensor hooks (offloading, the
        # memory benchmark) see it; ctx attributes hold only non-tensor metadata.
        ctx.save_for_backward(y if ctx.from_output else a, b)
        ctx.blocks, ctx.steps, ctx.spec, ctx.seed = blocks, steps, spec, seed
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        """With (ga, gb) = dL/d(a_i, b_i) and z = a_i = b_{i-1}, f = F_i(z):
        a_{i-1} = b_i - f,  dL/da_{i-1} = gb,  dL/db_{i-1} = ga + J_f(z)^T gb;  dL/dx = ga_0 + gb_0,
        each on every piece of F_i in turn."""
        a, b = ctx.saved_tensors
        # Buffers this backward may write: its own, and the kept streams unless autograd keeps
        # the graph for another backward (retain_graph); never y, which is the caller's.
        kept_free = not _graph_kept()
        a_own, b_own = ctx.from_output or kept_free, kept_free
        if ctx.from_output:
            a = b.mul(-1).add_(a, alpha=2)  # a_n = 2 y - b_n
        steps, spec = ctx.steps, ctx.spec
        gb = torch.empty_like(b)
        torch.mul(dy, 0.5, out=gb)  # exact in any dtype
        ga = gb.clone()
        with _rng_substreams(spec.device, ctx.seed) as select, running_stats_kept(ctx.blocks), spec.autocast_ctx():
            for i in reversed(range(len(steps))):
                step, z = steps[i], a
                dest = None if i == 0 else b if b_own else torch.empty_like(b)  # a_{i-1} = b_i - f goes here
                size = z.shape[step.pieces.dim] if step.pieces is not None else 0
                summed: list[Tensor | None] = [None] * len(step.params)  # parameter gradients of earlier pieces
                for j, span in enumerate(step.spans):
                    select(i)
                    zp = step.piece(z, span).detach().requires_grad_()
                    with torch.enable_grad():
                        f = step.run(spec.fn_input(zp), span, size)
                    if i > 0:
                        torch.sub(step.piece(b, span), _addend(f.detach(), spec.stream), out=step.piece(dest, span))
                    if f.requires_grad:
                        g = step.piece(gb, span).to(f.dtype)
                        if j + 1 < len(step.spans):
                            dz, *dparams = torch.autograd.grad(f, [zp, *step.params], g, allow_unused=True)
                            summed = [s if d is None else d if s is None else s.add_(d) for s, d in zip(summed, dparams)]
                        else:
                            # The last (or only) piece goes through the ordinary path with the
                            # earlier pieces' sums added on the way: each parameter's .grad and its
                            # gradient hooks (DDP, ZeRO) are reached once per use, as without pieces.
                            with _added_to_grads(step.params, summed):
                                torch.autograd.backward(f, g)
                            dz = zp.grad
                        if dz is not None:
                            step.piece(ga, span).add_(dz)  # ga + J^T gb, in place: the next gb
                    del f, zp
                del summed
                ga, gb = gb, ga
                if i > 0:
                    a, b, b_own = dest, z, a_own
                    a_own = True
        dx = ga.add_(gb).to(spec.out) if ctx.needs_input_grad[0] else None
        return dx, None, None, None, None, None


@contextmanager
def _added_to_grads(params: Sequence[nn.Parameter], extra: Sequence[Tensor | None]) -> Iterator[None]:
    """Inside, a backward reaching parameter p adds extra[p] to its gradient before it is
    accumulated; on exit, an extra that no backward reached is accumulated on its own."""
    pending = {i for i, e in enumerate(extra) if e is not None}

    def adder(i: int) -> Callable[[Tensor], Tensor]:
        def add(grad: Tensor) -> Tensor:
            pending.discard(i)
            return grad + extra[i]
        return add

    handles = [params[i].register_hook(adder(i)) for i in pending]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
    if pending:
        torch.autograd.backward([params[i] for i in sorted(pending)], [extra[i] for i in sorted(pending)])


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph); True when it cannot be told."""
    kept = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if kept is None else bool(kept())


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


def checkpointed(fn: Callable[..., Any], *inputs: Tensor, modules: Sequence[nn.Module] | None = None) -> Any:
    """fn(*inputs) keeping only the inputs for backward: non-reentrant activation checkpointing
    (RNG replayed), whose recomputation leaves the BatchNorm running statistics of `modules`
    (default: fn, a module) as the forward did."""
    modules = [fn] if modules is None else modules
    return checkpoint(fn, *inputs, use_reentrant=False, context_fn=lambda: (nullcontext(), running_stats_kept(modules)))
