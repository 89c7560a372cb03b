"""Reversible stages (re2tal.rev): reconstruction, exact gradients, RNG, precision, memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from re2tal.bench.model import SavedTensors, max_relative_error, recording_inputs
from re2tal.bench.synthetic import build_synthetic_stage
from re2tal.rev import Pieces, ReluIn, RevStage, relu_in
from re2tal.rev.pieces import window_cuts

WIDTH = 16


class TwoBranchBlock(nn.Module):
    """A transformer-like block: an "attention" branch and an MLP branch with dropout and drop-path."""

    def __init__(self, width: int = WIDTH, drop_path: float = 0.5):
        super().__init__()
        self.norm1, self.proj, self.drop = nn.LayerNorm(width), nn.Linear(width, width), nn.Dropout(0.2)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.drop_path = StochasticDepth(drop_path, "row")

    def attn(self, x):
        return self.drop_path(self.drop(self.proj(self.norm1(x))))

    def mlp(self, x):
        return self.drop_path(self.fc2(F.gelu(self.fc1(self.norm2(x)))))

    def residual_fns(self):
        return [self.attn, self.mlp]

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class OneBranchBlock(TwoBranchBlock):
    """The MLP branch alone."""

    def __init__(self, width: int = WIDTH, drop_path: float = 0.5):
        super().__init__(width, drop_path)
        del self.norm1, self.proj

    def residual_fns(self):
        return [self.mlp]

    def forward(self, x):
        return x + self.mlp(x)


def window_mean(x, start: int, window: int, shift: int):
    """Mean of x over its group along dim 1, groups [0, shift), [shift, shift + window), ... of
    the whole tensor, for x the piece starting at `start` (a group border)."""
    t = torch.arange(start, start + x.shape[1])
    ids = (t - shift) // window + (1 if shift else 0)
    ids = ids - ids[0]
    n = int(ids[-1]) + 1
    sums = torch.zeros(x.shape[0], n, *x.shape[2:], dtype=x.dtype).index_add(1, ids, x)
    counts = torch.bincount(ids, minlength=n).view(1, n, *[1] * (x.dim() - 2))
    return (sums / counts)[:, ids]


class PiecewiseBlock(TwoBranchBlock):
    """Pieces along dim 1: a windowed branch (mean over shifted windows, at its position) and the
    MLP branch (token-local). No dropout: element masks are not piece-invariant."""

    def __init__(self, width: int = WIDTH, drop_path: float = 0.5, window: int = 4, shift: int = 2):
        super().__init__(width, drop_path)
        self.drop, self.window, self.shift = nn.Identity(), window, shift

    def windowed(self, x, start=0):
        return self.drop_path(self.proj(window_mean(self.norm1(x), start, self.window, self.shift)))

    def residual_fns(self):
        return [self.windowed, self.mlp]

    def residual_pieces(self):
        return [Pieces(1, lambda size: window_cuts(size, self.window, self.shift), lambda x, start, size: self.windowed(x, start)),
                Pieces(1)]


def make_stage(functions: int, width: int = WIDTH, pieces: bool = False, **kwargs) -> RevStage:
    """A stage of `functions` residual functions (two per block, one block of one if odd);
    pieces: blocks declaring their functions local along dim 1 (PiecewiseBlock)."""
    two = PiecewiseBlock if pieces else TwoBranchBlock
    blocks = [two(width) for _ in range(functions // 2)] + [OneBranchBlock(width) for _ in range(functions % 2)]
    return RevStage(blocks, **kwargs)


def run(stage: RevStage, x: torch.Tensor, dy: torch.Tensor, *, vanilla: bool, seed: int = 0):
    """Output, input grad and parameter grads of one forward+backward."""
    stage.vanilla = vanilla
    stage.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(x.requires_grad)
    torch.manual_seed(seed)
    y = stage(x)
    y.backward(dy)
    stage.vanilla = False
    return y.detach(), x.grad, [p.grad for p in stage.parameters()]


def inputs(shape=(4, 3, 5, WIDTH), seed=1, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).requires_grad_(requires_grad)
    return x, torch.randn(shape, generator=gen)


@pytest.mark.parametrize("functions", [1, 2, 5, 12])
def test_reversible_gradients_of_input_and_all_parameters_match_vanilla(functions):
    torch.manual_seed(functions)
    stage = make_stage(functions).train()
    x, dy = inputs()
    y_rev, gx_rev, gp_rev = run(stage, x, dy, vanilla=False)
    y_van, gx_van, gp_van = run(stage, x, dy, vanilla=True)
    assert torch.equal(y_rev, y_van)
    assert all(g is not None for g in gp_rev) and len(gp_rev) == len(list(stage.parameters()))
    assert max_relative_error([gx_rev, *gp_rev], [gx_van, *gp_van]) <= 1e-5
    # the comparison is meaningful: dropout / drop-path really change the result between seeds
    assert not torch.equal(run(stage, x, dy, vanilla=True, seed=1)[0], y_van)


@pytest.mark.parametrize("functions", [1, 2, 5, 12])
def test_inputs_reconstructed_in_backward_equal_forward_inputs(functions):
    torch.manual_seed(functions)
    stage = make_stage(functions).train()
    x, dy = inputs()
    with recording_inputs(stage) as log:
        stage(x).backward(dy)
    assert len(log.forward) == len(log.recomputed) == functions
    assert log.max_relative_error() <= 1e-5


def test_gradients_match_finite_differences_in_float64():
    torch.manual_seed(0)
    stage = make_stage(3, width=4).double().eval()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(stage, (x,))


def test_training_forward_takes_one_draw_from_global_rng_and_backward_none():
    stage = make_stage(4).train()
    x, dy = inputs()
    torch.manual_seed(7)
    torch.randint(0, 2**62, ())
    after_one_draw = torch.get_rng_state()
    for vanilla in (True, False):
        stage.vanilla = vanilla
        torch.manual_seed(7)
        y = stage(x)
        assert torch.equal(torch.get_rng_state(), after_one_draw)
    torch.rand(3)  # other code keeps drawing between forward and backward
    before_backward = torch.get_rng_state()
    y.backward(dy)
    assert torch.equal(torch.get_rng_state(), before_backward)


def test_eval_forward_leaves_global_rng_untouched():
    stage = make_stage(4).eval()
    x, _ = inputs()
    before = torch.get_rng_state()
    stage(x).sum().backward()
    assert torch.equal(torch.get_rng_state(), before)


def test_parameters_get_gradients_when_stage_input_does_not_require_grad():
    torch.manual_seed(0)
    stage = make_stage(3).train()
    x, dy = inputs(requires_grad=False)
    _, gx_rev, gp_rev = run(stage, x, dy, vanilla=False)
    _, _, gp_van = run(stage, x, dy, vanilla=True)
    assert gx_rev is None
    assert max_relative_error(gp_rev, gp_van) <= 1e-5


def test_no_grad_forward_equals_vanilla_and_builds_no_graph():
    stage = make_stage(5).eval()
    x, _ = inputs()
    with torch.no_grad():
        y = stage(x)
    stage.vanilla = True
    assert y.grad_fn is None and torch.equal(y, stage(x))


def test_state_dict_keys_equal_sequential_and_pretrained_weights_load():
    blocks = [TwoBranchBlock(), OneBranchBlock()]
    plain = nn.Sequential(*blocks)
    keys = list(plain.state_dict())
    rev = RevStage([TwoBranchBlock(), OneBranchBlock()])
    assert list(rev.state_dict()) == keys
    rev.load_state_dict(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(rev.state_dict().values(), plain.state_dict().values()))


def test_stage_rejects_empty_block_list_and_blocks_without_residual_fns():
    with pytest.raises(ValueError, match="at least one block"):
        RevStage([])
    with pytest.raises(TypeError, match="block 1 \\(Linear\\) has no residual_fns"):
        RevStage([OneBranchBlock(), nn.Linear(2, 2)])


def test_leading_blocks_run_ordinarily_keep_their_keys_and_get_exact_gradients():
    """lead=1: a shape-changing first block (a ResNet stage's strided one) runs before the
    reversible part; keys stay those of nn.Sequential and gradients those of plain autograd."""
    torch.manual_seed(0)
    blocks = [nn.Linear(8, WIDTH), TwoBranchBlock(), OneBranchBlock()]
    stage = RevStage(blocks, lead=1)
    assert list(stage.state_dict()) == list(nn.Sequential(*blocks).state_dict())
    assert stage.reversible_blocks() == blocks[1:]
    x, _ = inputs(shape=(4, 3, 5, 8))
    dy = torch.randn(4, 3, 5, WIDTH)
    fast, vanilla = run(stage, x, dy, vanilla=False), run(stage, x, dy, vanilla=True)
    assert torch.allclose(fast[0], vanilla[0], atol=1e-6)
    assert fast[2][0] is not None  # the leading block's weight trains
    assert max_relative_error([fast[1], *fast[2]], [vanilla[1], *vanilla[2]]) <= 1e-5
    with pytest.raises(ValueError, match="at least one block after the 1 leading"):
        RevStage([nn.Linear(8, WIDTH)], lead=1)


def test_output_keeps_input_dtype_and_shape_with_fp32_streams():
    stage = make_stage(2).to(torch.bfloat16)
    x = torch.randn(2, 3, WIDTH, dtype=torch.bfloat16, requires_grad=True)
    y = stage(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and all(p.grad.dtype == torch.bfloat16 for p in stage.parameters())


def test_bf16_autocast_fp32_streams_drift_far_less_than_bf16_streams():
    torch.manual_seed(0)
    x, dy = inputs(shape=(2, 8, 8, WIDTH))
    errors = {}
    for fp32_streams in (True, False):
        torch.manual_seed(0)
        stage = make_stage(12, fp32_streams=fp32_streams).train()
        with recording_inputs(stage) as log:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = stage(x)
            y.backward(dy)
        assert y.dtype == x.dtype
        errors[fp32_streams] = log.max_relative_error()
    assert errors[True] < 1e-5 < errors[False]


def test_bf16_autocast_reversible_gradients_match_vanilla_with_fp32_streams():
    torch.manual_seed(0)
    stage = make_stage(12).train()
    x, dy = inputs(shape=(2, 8, 8, WIDTH))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rev = run(stage, x, dy, vanilla=False)
        van = run(stage, x, dy, vanilla=True)
    assert torch.equal(rev[0], van[0])
    assert max_relative_error([rev[1], *rev[2]], [van[1], *van[2]]) <= 1e-3


# ---------------------------------------------------------------------------------------------
# pieces: functions local along a dimension run piece by piece


def test_piece_spans_follow_the_cut_points_and_the_size():
    p = Pieces(1, lambda size: window_cuts(size, 4, 2))
    assert p.cuts(13) == [0, 2, 6, 10, 13]
    per_index = 2 * 3 * 16
    assert p.spans((2, 13, 3, 16), 5 * per_index) == [(0, 2), (2, 6), (6, 10), (10, 13)]
    assert p.spans((2, 13, 3, 16), 9 * per_index) == [(0, 6), (6, 13)]
    assert p.spans((2, 13, 3, 16), 1) == [(0, 2), (2, 6), (6, 10), (10, 13)]  # never below one group
    assert p.spans((2, 13, 3, 16), 0) == [(0, 13)]
    assert Pieces(0).spans((5, 7), 14) == [(0, 2), (2, 4), (4, 5)]


@pytest.mark.parametrize("piece_size", [1, 5 * 2 * 3 * WIDTH, 9 * 2 * 3 * WIDTH])
def test_piecewise_gradients_of_input_and_all_parameters_match_whole_vanilla(piece_size):
    """Pieces of one group, of several groups and a ragged last one (13 = 2 + 4 + 4 + 3, shifted
    windows of 4), with drop path drawing per sample: outputs, input and every parameter's
    gradient equal plain autograd through whole functions."""
    torch.manual_seed(0)
    stage = make_stage(6, pieces=True, piece_size=piece_size).train()
    x, dy = inputs(shape=(2, 13, 3, WIDTH))
    y_rev, gx_rev, gp_rev = run(stage, x, dy, vanilla=False)
    y_van, gx_van, gp_van = run(stage, x, dy, vanilla=True)
    assert torch.allclose(y_rev, y_van, atol=1e-6)
    assert all(g is not None for g in gp_rev)
    assert max_relative_error([gx_rev, *gp_rev], [gx_van, *gp_van]) <= 1e-5
    assert not torch.equal(run(stage, x, dy, vanilla=True, seed=1)[0], y_van)  # drop path acts


def test_pieces_take_the_function_position_into_account():
    """The windowed branch run on a piece without its position groups differently: the test
    above would catch a stage that ignored `at`."""
    block = PiecewiseBlock().eval()
    x = torch.randn(2, 13, 3, WIDTH)
    whole = block.windowed(x)
    assert torch.allclose(block.windowed(x[:, 6:10], 6), whole[:, 6:10], atol=1e-6)
    assert not torch.allclose(block.windowed(x[:, 6:10], 0), whole[:, 6:10], atol=1e-3)


def live_peak(step, exclude) -> int:
    """High-water mark of the bytes of tensors allocated while step() runs (`exclude`: tensors
    that exist before, the input and the parameters)."""
    from re2tal.planning.memory import LiveBytes

    with LiveBytes(exclude) as live:
        step()
    return live.peak


def test_pieces_bound_the_transient_of_forward_and_backward():
    """Eight pieces: over forward and backward, what is live beyond five stream-sized tensors
    (y and b_n kept, a_n = 2 y - b_n, the two gradients; streams reconstructed in place) is one
    piece's recomputation and back-propagation instead of the whole function's."""
    x, dy = inputs(shape=(1, 64, 8, WIDTH))
    stream = x.numel() * 4
    peaks = {}
    for piece_size in (0, 8 * 8 * WIDTH):
        torch.manual_seed(0)
        stage = make_stage(6, pieces=True, piece_size=piece_size).train()
        xi = x.detach().requires_grad_()

        def step():
            stage(xi).backward(dy)

        step()  # warm-up: .grad exists
        peaks[piece_size] = live_peak(step, [xi, dy, *stage.parameters(), *(p.grad for p in stage.parameters()), xi.grad])
    assert peaks[0] > 12 * stream
    assert peaks[8 * 8 * WIDTH] - 5 * stream <= (peaks[0] - 5 * stream) / 4


def test_forward_frees_everything_with_its_output():
    """In low precision the forward runs F as the backward will (grad on) and drops that graph at
    once, also where F saves its own output (ReLU): nothing is left alive once the stage's output
    is gone."""
    from re2tal.planning.memory import LiveBytes

    torch.manual_seed(0)
    stage = RevStage([relu_in(PostActBottleneck(), bottleneck_branch) for _ in range(3)], piece_size=1).eval()
    x, _ = inputs(shape=(2, 8, 6, 6))
    with LiveBytes(exclude=[x, *stage.parameters(), *stage.buffers()]) as live:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # (its cache of cast weights ends with it)
            y = stage(x)
        assert live.live > 0
        del y
        assert live.live == 0


def test_retained_graph_backward_twice_gives_the_same_gradients():
    torch.manual_seed(0)
    stage = make_stage(5, pieces=True, piece_size=5 * WIDTH).eval()
    x, dy = inputs()
    y = stage(x)
    grads = []
    for _ in range(2):
        stage.zero_grad(set_to_none=True)
        x.grad = None
        y.backward(dy, retain_graph=True)
        grads.append([x.grad.clone(), *(p.grad.clone() for p in stage.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_residual_pieces_must_match_residual_fns():
    class Mismatched(OneBranchBlock):
        def residual_pieces(self):
            return [Pieces(1), Pieces(1)]

    stage = RevStage([Mismatched()], piece_size=1)
    with pytest.raises(ValueError, match="2 entries for 1 residual functions"):
        stage(torch.randn(2, 3, WIDTH, requires_grad=True))
    with pytest.raises(ValueError, match="piece_size must be >= 0"):
        RevStage([OneBranchBlock()], piece_size=-1)


# ---------------------------------------------------------------------------------------------
# ReLU-in


class PostActBottleneck(nn.Module):
    """torchvision-style post-activation bottleneck: ReLU(x + bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))))."""

    def __init__(self, width=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width // 2, 1, bias=False), nn.BatchNorm2d(width // 2)
        self.conv2, self.bn2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False), nn.BatchNorm2d(width // 2)
        self.conv3, self.bn3 = nn.Conv2d(width // 2, width, 1, bias=False), nn.BatchNorm2d(width)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x + bottleneck_branch(self, x))


def bottleneck_branch(m, x):
    return m.bn3(m.conv3(m.relu(m.bn2(m.conv2(m.relu(m.bn1(m.conv1(x))))))))


class BranchModuleBlock(nn.Module):
    """pytorchvideo-style block: ReLU(x + branch2(x))."""

    def __init__(self, width=8):
        super().__init__()
        self.branch2 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.activation = nn.ReLU()

    def forward(self, x):
        return self.activation(x + self.branch2(x))


def test_relu_in_keeps_parameters_and_keys_and_computes_x_plus_relu_of_branch():
    torch.manual_seed(0)
    for block, branch in ((PostActBottleneck(), bottleneck_branch), (BranchModuleBlock(), "branch2")):
        block.eval()
        converted = relu_in(block, branch)
        assert list(converted.state_dict()) == list(block.state_dict())
        assert all(a is b for a, b in zip(converted.parameters(), block.parameters()))
        x = torch.randn(2, 8, 5, 5)
        f = bottleneck_branch(block, x) if callable(branch) else block.branch2(x)
        torch.testing.assert_close(converted(x), x + F.relu(f))
        assert not torch.allclose(converted(x), block(x))  # the rewiring really changes the function


def test_relu_in_rejects_unknown_branch_and_tensors_outside_children():
    with pytest.raises(ValueError, match="no child 'branch9'"):
        ReluIn(BranchModuleBlock(), "branch9")
    block = BranchModuleBlock()
    block.scale = nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="outside its children \\(scale\\)"):
        ReluIn(block, "branch2")


def test_relu_in_stage_gradients_and_batchnorm_statistics_match_vanilla():
    torch.manual_seed(0)
    stage = RevStage([relu_in(PostActBottleneck(), bottleneck_branch) for _ in range(3)]).train()
    x, dy = inputs(shape=(2, 8, 6, 6))
    results, stats = {}, {}
    initial = {k: v.clone() for k, v in stage.state_dict().items()}
    for vanilla in (False, True):
        stage.load_state_dict(initial)
        results[vanilla] = run(stage, x, dy, vanilla=vanilla)
        stats[vanilla] = [b.clone() for b in stage.buffers()]
    assert max_relative_error([results[False][1], *results[False][2]], [results[True][1], *results[True][2]]) <= 1e-5
    # running statistics are updated once per forward, not again by the recomputation
    assert all(torch.equal(a, b) for a, b in zip(stats[False], stats[True]))
    assert not torch.equal(stats[True][0], initial["0.bn1.running_mean"])


# ---------------------------------------------------------------------------------------------
# memory: what a stage keeps for backward


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    counter = SavedTensors(exclude=[*model.parameters(), *model.buffers()])
    with counter:
        y = model(x)
    counter.add_graph([y])
    return counter.total_bytes


def test_reversible_keeps_only_the_two_final_streams_at_any_depth_while_standard_grows_linearly():
    x = torch.randn(1, 4, 7, 7, WIDTH, requires_grad=True)
    stream = x.numel() * 4
    rev, std = {}, {}
    for n in (2, 7, 12):
        torch.manual_seed(0)
        rev[n] = activation_bytes(build_synthetic_stage("reversible", n, WIDTH).train(), x)
        std[n] = activation_bytes(build_synthetic_stage("standard", n, WIDTH).train(), x)
        assert rev[n] == 2 * stream
    assert rev[12] <= 1.1 * rev[2]
    assert std[12] - std[7] == std[7] - std[2] > 10 * stream
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 streams: half the bytes
        assert activation_bytes(build_synthetic_stage("reversible_lowp", 12, WIDTH).train(), x) == stream


def test_next_layer_keeping_the_stage_output_shares_it():
    x = torch.randn(1, 4, 7, 7, WIDTH, requires_grad=True)
    stream = x.numel() * 4
    stage = build_synthetic_stage("reversible", 6, WIDTH).train()
    norm_stats = 2 * 4 * 7 * 7 * 4  # LayerNorm's mean and rstd per token
    assert activation_bytes(nn.Sequential(stage, nn.LayerNorm(WIDTH)), x) == 2 * stream + norm_stats


def test_activation_counter_sees_tensors_kept_as_ctx_attributes():
    class KeepsAttribute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.kept = [x * 2]  # kept outside save_for_backward
            return x * 3

        @staticmethod
        def backward(ctx, g):
            return g * 3

    x = torch.randn(1000, requires_grad=True)
    counter = SavedTensors()
    with counter:
        y = KeepsAttribute.apply(x).sin()
    assert counter.total_bytes == 4000  # sin keeps its input
    counter.add_graph([y])
    assert counter.total_bytes == 8000 and counter.graph_only_bytes == 4000


# ---------------------------------------------------------------------------------------------
# the benchmark command


def bench_cli(tmp_path, *args):
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "re2tal.cli", "bench", *args, "--json", str(out)],
                          capture_output=True, text=True)
    return proc, out


def test_bench_memory_writes_json_with_every_mode_and_reversible_keeps_least(tmp_path):
    import json

    proc, out = bench_cli(tmp_path, "memory", "--stage-blocks", "4", "--width", "16", "--frames", "8", "--size", "32")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["config"]["input_shape"] == [1, 4, 8, 8, 16]
    modes = report["modes"]
    assert list(modes) == ["standard", "checkpoint", "reversible"]
    for r in modes.values():
        assert r["peak_rss_bytes"] >= r["baseline_rss_bytes"] > 0 and r["step_seconds"] > 0
    stream = 4 * 8 * 8 * 16 * 4
    assert modes["reversible"]["activation_bytes"] == 2 * stream
    assert modes["checkpoint"]["activation_bytes"] == 4 * stream  # each block's input
    assert modes["standard"]["activation_bytes"] > 10 * 4 * stream
    assert modes["reversible"]["reconstruction_error"] <= 1e-5 and modes["reversible"]["grad_error"] <= 1e-5


def test_bench_rejects_unknown_mode_and_backbone_with_exit_2(tmp_path):
    proc, out = bench_cli(tmp_path, "speed", "--modes", "standard,fast")
    assert proc.returncode == 2 and "--modes: unknown mode 'fast'" in proc.stderr and not out.exists()
    proc, _ = bench_cli(tmp_path, "memory", "--backbone", "resnet9")
    assert proc.returncode == 2 and "--backbone" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
