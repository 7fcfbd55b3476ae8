"""The networks: the paper's parameter count, ONE shared attention module and its eq. 4
gradient, shapes, determinism, TorchScript, and the SFCN peer of the ablation.

Quick tests use 32^3 inputs (they reach 1x1x1 after the seven blocks like 91x109x91 does);
one test runs the full grid with batch 1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from brainage_bids.model import BrainAgeNet, SpatialAttention3d, blocks
from brainage_bids.model.blocks import ConvBlock3d, DepthTapConv3d
from brainage_bids.model.net import INPUT_SHAPE
from brainage_bids.model.sfcn import SFCN, gaussian_soft_labels, soft_label_loss

SMALL = (32, 32, 32)
PAPER_PARAMETERS = 5_408_228
ATTENTION_PARAMETERS = 2 * 7**3 + 1  # Conv3d(2 -> 1, 7x7x7) with bias: 687
SFCN_PARAMETERS = 2_952_936


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def seeded(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


# --- BrainAgeNet: size and sharing -------------------------------------------------------

def test_parameter_count_matches_the_paper() -> None:
    assert n_parameters(BrainAgeNet(attention="shared")) == PAPER_PARAMETERS


def test_parameter_counts_of_the_ablation_variants() -> None:
    """Separate adds six more attention modules; none removes the only one."""
    assert n_parameters(BrainAgeNet(attention="separate")) == (
        PAPER_PARAMETERS + 6 * ATTENTION_PARAMETERS)
    assert n_parameters(BrainAgeNet(attention="none")) == PAPER_PARAMETERS - ATTENTION_PARAMETERS


@pytest.mark.parametrize(("attention", "instances"), [("shared", 1), ("separate", 7), ("none", 0)])
def test_number_of_attention_instances(attention: str, instances: int) -> None:
    model = BrainAgeNet(attention=attention)
    found = [m for m in model.modules() if isinstance(m, SpatialAttention3d)]
    assert len(found) == instances
    uses = [model.attention_module(i) for i in range(len(model.blocks))]
    if attention == "none":
        assert all(use is None for use in uses)
    else:
        # Identity, not equality: the shared variant must hand out the same object 7 times.
        assert len({id(use) for use in uses}) == instances
        assert all(any(use is m for m in found) for use in uses)


def test_invalid_attention_name() -> None:
    with pytest.raises(ValueError, match="attention must be one of"):
        BrainAgeNet(attention="cbam")


# --- eq. 4: the shared attention's gradient sums over its seven uses ---------------------

def _attention_grads(model: BrainAgeNet, x: torch.Tensor,
                     rewrite: Callable[[int, nn.Conv3d, torch.Tensor, torch.Tensor],
                                       torch.Tensor | None] | None = None,
                     leaves: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """Gradient of the summed output w.r.t. ``leaves`` (default: the shared attention conv).

    ``rewrite(use, conv, input, output)`` may replace the conv's output at a given use; the
    hook also checks that the one module is called seven times per forward.
    """
    conv = model.sa.conv
    calls: list[int] = []

    def hook(module: nn.Conv3d, inputs: tuple[torch.Tensor], out: torch.Tensor):
        calls.append(len(calls))
        return None if rewrite is None else rewrite(len(calls) - 1, module, inputs[0], out)

    handle = conv.register_forward_hook(hook)
    try:
        loss = model(x).sum()
    finally:
        handle.remove()
    assert len(calls) == 7
    return torch.autograd.grad(loss, leaves or [conv.weight, conv.bias])


@pytest.fixture(scope="module")
def shared_f64() -> tuple[BrainAgeNet, torch.Tensor]:
    model = seeded(lambda: BrainAgeNet(attention="shared")).double().eval()
    torch.manual_seed(1)
    return model, torch.randn(2, 1, *SMALL, dtype=torch.float64)


def test_shared_gradient_is_the_sum_over_the_seven_uses(shared_f64) -> None:
    """Give each use its own copy of the weights: the seven copy-gradients sum to the full one.

    This is eq. 4 made checkable: the copies hold the same values, so the forward is
    unchanged, and d loss / d theta = sum_k d loss / d theta_k.
    """
    model, x = shared_f64
    weight, bias = model.sa.conv.weight, model.sa.conv.bias
    copies = [(weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_())
              for _ in range(7)]

    def own_copy(use: int, conv: nn.Conv3d, inp: torch.Tensor, _out: torch.Tensor):
        w, b = copies[use]
        return nn.functional.conv3d(inp, w, b, conv.stride, conv.padding, conv.dilation,
                                    conv.groups)

    full_w, full_b = _attention_grads(model, x)
    grads = _attention_grads(model, x, own_copy, [t for pair in copies for t in pair])
    per_use_w, per_use_b = grads[0::2], grads[1::2]
    assert torch.allclose(sum(per_use_w), full_w, rtol=1e-9, atol=1e-14)
    assert torch.allclose(sum(per_use_b), full_b, rtol=1e-9, atol=1e-14)
    assert full_w.abs().sum() > 0
    for use, (gw, gb) in enumerate(zip(per_use_w, per_use_b, strict=True), start=1):
        assert gw.abs().sum() > 0 and gb.abs().sum() > 0, f"use {use} contributes no gradient"


@pytest.mark.parametrize("blocked", range(7))
def test_blocking_any_one_use_changes_the_gradient(shared_f64, blocked: int) -> None:
    """Detaching the attention map of one use (forward unchanged) changes the gradient."""
    model, x = shared_f64

    def detach_one(use: int, _conv: nn.Conv3d, _inp: torch.Tensor, out: torch.Tensor):
        return out.detach() if use == blocked else None

    full_w, full_b = _attention_grads(model, x)
    part_w, part_b = _attention_grads(model, x, detach_one)
    assert not torch.allclose(part_w, full_w, rtol=1e-6, atol=0)
    assert not torch.allclose(part_b, full_b, rtol=1e-6, atol=0)


# --- shapes, determinism, export ---------------------------------------------------------

def test_forward_on_the_paper_grid() -> None:
    model = seeded(BrainAgeNet).eval()
    with torch.inference_mode():
        out = model(torch.randn(1, 1, *INPUT_SHAPE))
    assert out.shape == (1, 1)
    assert torch.isfinite(out).all()


def test_forward_on_a_small_cube() -> None:
    model = seeded(BrainAgeNet).eval()
    with torch.inference_mode():
        assert model(torch.randn(3, 1, *SMALL)).shape == (3, 1)


def test_input_that_does_not_reach_one_voxel() -> None:
    """Seven blocks halve (s + 1); 130 voxels end at 2, not 1."""
    model = BrainAgeNet(attention="none")
    with pytest.raises(ValueError, match="reach 1x1x1"):
        model(torch.randn(1, 1, 130, 8, 8))


def test_eval_is_deterministic_and_train_dropout_is_not() -> None:
    model = seeded(BrainAgeNet)
    x = torch.randn(2, 1, *SMALL)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x))


def test_traced_copy_gives_the_same_output() -> None:
    """``torch.jit.script`` cannot compile ``attention_module`` (an ``nn.Module | None``
    return), so TorchScript export goes through tracing, which fixes the module identities.
    """
    model = seeded(BrainAgeNet).eval()
    x = torch.randn(2, 1, *SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x, check_trace=False)
    other = torch.randn(2, 1, *SMALL)
    with torch.no_grad():
        assert torch.allclose(traced(other), model(other), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiled_copy_gives_the_same_output() -> None:
    """torch.compile needs a C++ compiler and about a minute on 2 cores: slow tier only."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile's inductor needs a C++ compiler")
    model = seeded(BrainAgeNet).eval()
    x = torch.randn(1, 1, *SMALL)
    compiled = torch.compile(model)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5, rtol=0)


# --- the CPU inference paths compute the same numbers ----------------------------------

@pytest.mark.parametrize(("c_in", "c_out", "k", "shape"), [
    (2, 1, 7, (9, 11, 8)),    # the attention's conv; depth larger than the kernel
    (2, 1, 7, (1, 1, 1)),     # the last block's single voxel: only the centre tap counts
    (3, 2, 3, (2, 5, 4)),     # several output channels, depth smaller than the kernel
])
def test_depth_tap_conv_equals_conv3d(c_in: int, c_out: int, k: int,
                                      shape: tuple[int, int, int]) -> None:
    tap = seeded(lambda: DepthTapConv3d(c_in, c_out, k)).double()
    plain = nn.Conv3d(c_in, c_out, k, padding=k // 2).double()
    plain.load_state_dict(tap.state_dict())
    x = torch.randn(2, c_in, *shape, dtype=torch.float64, requires_grad=True)
    out_tap, out_plain = tap(x), plain(x)
    assert out_tap.shape == out_plain.shape
    torch.testing.assert_close(out_tap, out_plain, rtol=0, atol=1e-12)
    grads_tap = torch.autograd.grad(out_tap.square().sum(), [x, tap.weight, tap.bias])
    grads_plain = torch.autograd.grad(out_plain.square().sum(), [x, plain.weight, plain.bias])
    for a, b in zip(grads_tap, grads_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_depth_tap_conv_refuses_an_even_kernel() -> None:
    with pytest.raises(ValueError, match="odd"):
        DepthTapConv3d(2, 1, 4)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("shape", [(13, 10, 9), (12, 7, 8), (1, 3, 2)])
def test_conv_block_inference_slabs_equal_the_plain_block(monkeypatch, memory_format,
                                                         shape: tuple[int, int, int]) -> None:
    """Without autograd the block runs slab by slab and pools before the ReLU: same values."""
    block = seeded(lambda: ConvBlock3d(3, 5)).double().to(memory_format=memory_format)
    x = torch.randn(2, 3, *shape, dtype=torch.float64).contiguous(memory_format=memory_format)
    with torch.enable_grad():
        expected = block(x).detach()  # the plain conv -> ReLU -> pool path
    row = 2 * 2 * 5 * (shape[1] + 1) * (shape[2] + 1) * 8  # bytes of two conv rows
    for slab_bytes in (1, 2 * row, 10**9):  # one row per slab, two rows, one slab
        monkeypatch.setattr(blocks, "SLAB_BYTES", slab_bytes)
        with torch.inference_mode():
            got = block(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_conv_block_inference_keeps_channels_last(monkeypatch) -> None:
    """The next block's oneDNN convolution wants channels-last; slabs must not undo it."""
    cl = torch.channels_last_3d
    block = seeded(lambda: ConvBlock3d(3, 5)).to(memory_format=cl)
    x = torch.randn(2, 3, 13, 10, 9).contiguous(memory_format=cl)
    monkeypatch.setattr(blocks, "SLAB_BYTES", 1)
    with torch.inference_mode():
        got = block(x)
    assert got.is_contiguous(memory_format=cl) and not got.is_contiguous()


def test_network_inference_equals_the_autograd_path_on_the_paper_grid() -> None:
    model = seeded(lambda: BrainAgeNet(attention="shared", dropout=0.0)).eval()
    x = torch.randn(2, 1, *INPUT_SHAPE)
    with torch.enable_grad():
        expected = model(x).detach()
    model.to(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        got = model(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# --- SFCN (Peng et al. 2021), the ablation's peer ----------------------------------------

def test_sfcn_parameter_count() -> None:
    """2,952,936 with the default 40 bins: the paper's "about 3 million". The global average
    pooling makes the count independent of the input size (the 91x109x91 grid included)."""
    model = SFCN()
    assert model.n_bins == 40
    assert n_parameters(model) == SFCN_PARAMETERS
    assert n_parameters(SFCN(bin_width=1.0)) == SFCN_PARAMETERS + 40 * 65


def test_sfcn_bins() -> None:
    model = SFCN(age_range=(14.0, 94.0), bin_width=2.0)
    assert model.bin_centers[0] == 15.0 and model.bin_centers[-1] == 93.0
    assert "bin_centers" in dict(model.named_buffers())
    with pytest.raises(ValueError, match="tile"):
        SFCN(age_range=(14.0, 94.0), bin_width=3.0)


def test_sfcn_shapes_on_the_paper_grid_and_a_small_cube() -> None:
    model = seeded(SFCN).eval()
    with torch.inference_mode():
        full = model(torch.randn(1, 1, *INPUT_SHAPE))
        small = torch.randn(2, 1, *SMALL)
        log_probs = model.log_probs(small)
        ages = model(small)
    assert full.shape == (1, 1)
    assert log_probs.shape == (2, 40)
    assert torch.allclose(log_probs.exp().sum(1), torch.ones(2, dtype=log_probs.dtype))
    assert ages.shape == (2, 1)
    assert ((ages > 14) & (ages < 94)).all()
    expected = log_probs.exp() @ model.bin_centers
    assert torch.allclose(ages[:, 0], expected)


def test_gaussian_soft_labels() -> None:
    centers = SFCN().bin_centers
    labels = gaussian_soft_labels(torch.tensor([40.0, 14.2, 120.0]), centers, sigma=1.0)
    assert torch.allclose(labels.sum(1), torch.ones(3, dtype=labels.dtype))
    assert math.isclose(float(labels[0] @ centers.double()), 40.0, abs_tol=1e-6)
    # Bins 38-40 and 40-42 hold N(40, 1)'s mass within 2 SD: Phi(2) - Phi(-2).
    assert math.isclose(float(labels[0, 12] + labels[0, 13]), 0.9545, abs_tol=1e-3)
    assert labels[1, 0] > 0.5  # an age at the edge stays in range
    # Beyond the range: the label of the upper edge, half a Gaussian renormalised.
    edge = gaussian_soft_labels(torch.tensor([94.0]), centers)
    assert torch.equal(labels[2], edge[0])
    assert math.isclose(float(labels[2, -1]), 0.9545, abs_tol=1e-3)


def test_soft_label_loss_is_a_kl_divergence() -> None:
    centers = SFCN().bin_centers
    ages = torch.tensor([25.0, 61.3])
    target = gaussian_soft_labels(ages, centers).float()
    exact = soft_label_loss(target.clamp_min(1e-30).log(), ages, centers)
    assert exact == pytest.approx(0.0, abs=1e-5)
    uniform = torch.full((2, 40), -math.log(40.0))
    assert soft_label_loss(uniform, ages, centers) > 0.5
    with pytest.raises(ValueError, match="do not match"):
        soft_label_loss(uniform[:, :10], ages, centers)


def test_sfcn_overfits_two_samples() -> None:
    """A few Adam steps on two 32^3 volumes must reduce the KL loss (dropout off so the
    decrease is not noise)."""
    model = seeded(lambda: SFCN(dropout=0.0)).train()
    x = torch.randn(2, 1, *SMALL)
    ages = torch.tensor([30.0, 70.0])
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model.soft_label_loss(model.log_probs(x), ages)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses
