"""kron_predictive_variance: Σ_l J_l P_l⁻¹ J_lᵀ against dense Jacobians of tiny networks."""

import pytest
import torch
from conftest import (
    CUDA_REASON,
    DEVICES,
    PRIME_SIZES,
    TILE,
    assert_matches_float64,
    eigen_layer,
    emulated_op,
    random_spd,
    requires_extension,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, jacrev, vmap

import fastlaplace.ops as ops
import fastlaplace.reference as reference

JACOBIAN_LAYOUTS = {  # (N, C, d_G) views of three storage orders; a batched backward gives the last
    "contiguous": lambda n, c, d: torch.randn(n, c, d, dtype=torch.float64),
    "classes_inner": lambda n, c, d: torch.randn(n, d, c, dtype=torch.float64).transpose(1, 2),
    "classes_outer": lambda n, c, d: torch.randn(c, n, d, dtype=torch.float64).transpose(0, 1),
}


class TwoLayerNet(torch.nn.Module):
    def __init__(self, d_in, hidden, classes, bias):
        super().__init__()
        self.hidden = torch.nn.Linear(d_in, hidden, bias=bias, dtype=torch.float64)
        self.out = torch.nn.Linear(hidden, classes, bias=bias, dtype=torch.float64)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def augmented_jacobian(jac, name, bias):
    """(C, d_out, d_in [+1]) Jacobian w.r.t. [W | b], flattened row-major to (C, d_G * d_A)."""
    weight = jac[f"{name}.weight"]
    if bias:
        weight = torch.cat([weight, jac[f"{name}.bias"].unsqueeze(-1)], dim=-1)
    return weight.reshape(weight.shape[0], -1)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("full", [False, True])
def test_equals_dense_jacobian_covariance_over_two_layers(bias, full, generator):
    torch.manual_seed(0)
    net = TwoLayerNet(3, 4, 2, bias)
    x = torch.randn(5, 3, dtype=torch.float64, generator=generator)
    params = {k: v.detach() for k, v in net.named_parameters()}
    jac = vmap(jacrev(lambda p, xi: functional_call(net, p, (xi,))), in_dims=(None, 0))(params, x)
    hidden_in, out_in = x, torch.tanh(net.hidden(x)).detach()
    # Output Jacobian w.r.t. the hidden pre-activation z: out.weight * tanh'(z).
    z = net.hidden(x).detach()
    b_hidden = net.out.weight.detach().unsqueeze(0) * (1 - torch.tanh(z) ** 2).unsqueeze(1)
    layers = [eigen_layer(3 + bias, 4, generator=generator, rank_a=2), eigen_layer(4 + bias, 2, generator=generator)]
    scale = torch.tensor([1.7, 0.4], dtype=torch.float64)
    delta = torch.tensor([0.5, 2.0], dtype=torch.float64)
    result = ops.kron_predictive_variance(
        [hidden_in, out_in],
        [b_hidden, None],
        *[[layer[k] for layer in layers] for k in range(4)],
        scale,
        delta,
        [bias, bias],
        full,
    )
    expected = torch.zeros(5, 2, 2, dtype=torch.float64)
    for i, (name, (qa, la, qg, lg, _, _)) in enumerate(zip(["hidden", "out"], layers)):
        a = qa @ torch.diag(la.clamp_min(0)) @ qa.T
        g = qg @ torch.diag(lg.clamp_min(0)) @ qg.T
        p = scale[i] * torch.kron(g, a) + delta[i] * torch.eye(a.shape[0] * g.shape[0], dtype=torch.float64)
        for n in range(5):
            j = augmented_jacobian({k: v[n] for k, v in jac.items()}, name, bias)
            expected[n] += j @ torch.linalg.solve(p, j.T)
    torch.testing.assert_close(result, expected if full else expected.diagonal(dim1=1, dim2=2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference(device, dtype, input_dtype, generator):
    layers = [eigen_layer(30, 20, generator=generator), eigen_layer(21, 10, generator=generator)]
    inputs = [
        torch.randn(8, 29, generator=generator).to(input_dtype),
        torch.randn(8, 21, generator=generator).to(input_dtype),
    ]
    jacobians = [torch.randn(8, 10, 20, generator=generator).to(input_dtype), None]
    scale, delta = torch.tensor([1.0, 2.0]), torch.tensor([0.1, 0.3])
    eig64 = [[layer[k] for layer in layers] for k in range(4)]
    eig = [[t.to(dtype) for t in group] for group in eig64]
    for full in (False, True):
        exact = reference.kron_predictive_variance(
            inputs, jacobians, *eig64, scale.double(), delta.double(), [True, False], full
        )
        rounded = reference.kron_predictive_variance(inputs, jacobians, *eig, scale, delta, [True, False], full)
        result = ops.kron_predictive_variance(
            [t.to(device) for t in inputs],
            [None if t is None else t.to(device) for t in jacobians],
            *[[t.to(device) for t in group] for group in eig],
            scale.to(device),
            delta.to(device),
            [True, False],
            full,
        )
        assert result.dtype == dtype
        assert_matches_float64(result, exact, rounded)


@given(
    samples=st.sampled_from([1, 2, 5]),
    d_in=st.sampled_from(PRIME_SIZES),
    d_g=st.sampled_from(PRIME_SIZES),
    classes=st.sampled_from([1, 3]),
    bias=st.booleans(),
    last_layer=st.booleans(),
    full=st.booleans(),
    transposed=st.booleans(),
    jacobian_layout=st.sampled_from(["contiguous", "classes_inner", "classes_outer"]),
)
def test_property_odd_sizes_and_layouts(
    samples, d_in, d_g, classes, bias, last_layer, full, transposed, jacobian_layout
):
    if last_layer:
        d_g = classes
    qa, la, qg, lg, *_ = eigen_layer(d_in + bias, d_g)
    a = (
        torch.randn(d_in, samples, dtype=torch.float64).T
        if transposed
        else torch.randn(samples, d_in, dtype=torch.float64)
    )
    jac = None if last_layer else JACOBIAN_LAYOUTS[jacobian_layout](samples, classes, d_g)
    args = (
        [a],
        [jac],
        [qa],
        [la],
        [qg],
        [lg],
        torch.ones(1, dtype=torch.float64),
        torch.full((1,), 0.2, dtype=torch.float64),
        [bias],
        full,
    )
    torch.testing.assert_close(ops.kron_predictive_variance(*args), reference.kron_predictive_variance(*args))


def test_variance_is_the_diagonal_of_the_covariance(generator):
    qa, la, qg, lg, *_ = eigen_layer(6, 4, generator=generator)
    a = torch.randn(3, 5, dtype=torch.float64, generator=generator)
    args = (
        [a],
        [None],
        [qa],
        [la],
        [qg],
        [lg],
        torch.ones(1, dtype=torch.float64),
        torch.ones(1, dtype=torch.float64),
        [True],
    )
    cov = ops.kron_predictive_variance(*args, True)
    torch.testing.assert_close(ops.kron_predictive_variance(*args, False), cov.diagonal(dim1=1, dim2=2))
    assert torch.all(torch.linalg.eigvalsh(cov) > 0)


def test_opcheck():
    requires_extension()
    qa, la, qg, lg, *_ = eigen_layer(4, 3, dtype=torch.float32)
    args = (
        [torch.randn(2, 3)],
        [torch.randn(2, 2, 3)],
        [qa],
        [la],
        [qg],
        [lg],
        torch.ones(1),
        torch.ones(1),
        [True],
        True,
    )
    torch.library.opcheck(torch.ops.fastlaplace.kron_predictive_variance.default, args)


def test_traces_under_torch_compile():
    requires_extension()
    qa, la, qg, lg, *_ = eigen_layer(4, 3, dtype=torch.float32)
    a = torch.randn(2, 3)

    def variance(x):
        return (
            ops.kron_predictive_variance([x], [None], [qa], [la], [qg], [lg], torch.ones(1), torch.ones(1), [True]) * 2
        )

    torch.testing.assert_close(torch.compile(variance, backend="aot_eager", fullgraph=True)(a), variance(a))


def test_bad_inputs_name_the_argument():
    qa, la, qg, lg, *_ = eigen_layer(4, 3)
    ok = (torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"inputs\[0\] has width 4 \(\+1 bias\) but eigvals_a\[0\] has 4 entries"):
        ops.kron_predictive_variance([torch.randn(2, 4)], [None], [qa], [la], [qg], [lg], *ok, [True])
    with pytest.raises(ValueError, match=r"output_jacobians\[0\] must have shape \(2, C, 3\)"):
        ops.kron_predictive_variance([torch.randn(2, 3)], [torch.randn(2, 2, 4)], [qa], [la], [qg], [lg], *ok, [True])
    q2, l2, g2, m2, *_ = eigen_layer(2, 3)
    with pytest.raises(ValueError, match="layer 1 gives 5 samples x 3 outputs but layer 0 gives 2 x 3"):
        ops.kron_predictive_variance(
            [torch.randn(2, 3), torch.randn(5, 2)],
            [None, None],
            [qa, q2],
            [la, l2],
            [qg, g2],
            [lg, m2],
            torch.ones(2, dtype=torch.float64),
            torch.ones(2, dtype=torch.float64),
            [True, False],
        )
    with pytest.raises(ValueError, match="at least one layer"):
        ops.kron_predictive_variance([], [], [], [], [], [], torch.ones(0), torch.ones(0), [])
    with pytest.raises(ValueError, match="delta must be non-negative"):
        ops.kron_predictive_variance([torch.randn(2, 3)], [None], [qa], [la], [qg], [lg], ok[0], -ok[1], [True])
    assert random_spd(2).shape == (2, 2)


# The CUDA kernel (products of the fused tile kernel, csrc/engines/tile_gram.h, and the sums of
# csrc/engines/product_sums.h) run on the host.


PAIR_OUTPUTS = 16  # variance::kMaxPairOutputs: more outputs' covariances go to the tile kernel


def emulated(*args, target_blocks):
    return emulated_op("_kron_predictive_variance_emulated", target_blocks)(*args)


@settings(deadline=None, max_examples=30)
@given(
    samples=st.sampled_from([1, 3, TILE + 2]),
    classes=st.sampled_from([1, 2, PAIR_OUTPUTS + 1, TILE + 1]),
    sizes=st.lists(
        st.tuples(st.sampled_from([1, 6, TILE + 1]), st.sampled_from([1, 4, TILE + 3])), min_size=1, max_size=3
    ),
    bias=st.lists(st.booleans(), min_size=3, max_size=3),
    last_layer=st.booleans(),
    full=st.booleans(),
    layouts=st.lists(st.sampled_from(sorted(JACOBIAN_LAYOUTS)), min_size=3, max_size=3),
    transposed_inputs=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    target_blocks=st.sampled_from([1, 10_000]),
)
def test_emulated_kernel_matches_float64_reference(
    samples, classes, sizes, bias, last_layer, full, layouts, transposed_inputs, dtype, target_blocks
):
    if last_layer:  # d_G = C for every layer
        sizes = [(d_a, classes) for d_a, _ in sizes]
    layers = [eigen_layer(d_a, d_g, rank_a=max(1, d_a // 2)) for d_a, d_g in sizes]  # clamped λ
    bias = bias[: len(sizes)]
    inputs = [
        torch.randn(d_a - b, samples, dtype=torch.float64).T
        if transposed_inputs
        else torch.randn(samples, d_a - b, dtype=torch.float64)
        for (d_a, _), b in zip(sizes, bias)
    ]
    jacobians = [
        None if last_layer else JACOBIAN_LAYOUTS[layout](samples, classes, d_g)
        for (_, d_g), layout in zip(sizes, layouts)
    ]
    eig64 = [[layer[k] for layer in layers] for k in range(4)]
    scale = torch.rand(len(sizes), dtype=torch.float64) + 0.5
    delta = torch.rand(len(sizes), dtype=torch.float64) + 0.05
    exact = reference.kron_predictive_variance(inputs, jacobians, *eig64, scale, delta, bias, full)
    cast = [[None if t is None else t.to(dtype) for t in group] for group in (inputs, jacobians, *eig64)]
    # torch.linalg.eigh's eigenvectors are column-major, as the fits pass them
    cast[2] = [q.T.contiguous().T for q in cast[2]]
    args = (*cast, scale.to(dtype), delta.to(dtype), bias, full)
    result = emulated(*args, target_blocks=target_blocks)
    assert result.dtype == dtype
    assert_matches_float64(result, exact, reference.kron_predictive_variance(*args))
    if full:
        assert torch.equal(result, result.mT)  # the upper triangle mirrored


@pytest.mark.parametrize("first", sorted(JACOBIAN_LAYOUTS))
def test_emulated_kernel_takes_a_mix_of_jacobian_layouts(first, generator):
    # The first Jacobian's (N, C) order is the workspace's; the others are read or copied in it.
    layouts = [first, *sorted(JACOBIAN_LAYOUTS)]
    layers = [eigen_layer(5, 4 + i, generator=generator) for i in range(len(layouts))]
    inputs = [torch.randn(6, 5, dtype=torch.float64, generator=generator) for _ in layouts]
    jacobians = [JACOBIAN_LAYOUTS[layout](6, 3, 4 + i) for i, layout in enumerate(layouts)]
    eig = [[layer[k] for layer in layers] for k in range(4)]
    scale = torch.rand(len(layouts), dtype=torch.float64, generator=generator) + 0.5
    delta = torch.rand(len(layouts), dtype=torch.float64, generator=generator) + 0.1
    for full in (False, True):
        args = (inputs, jacobians, *eig, scale, delta, [False] * len(layouts), full)
        torch.testing.assert_close(emulated(*args, target_blocks=1), reference.kron_predictive_variance(*args))


def test_emulated_kernel_reads_16_bit_inputs_and_zero_samples(generator):
    qa, la, qg, lg, *_ = eigen_layer(TILE + 1, 5, generator=generator)
    a = torch.randn(7, TILE, generator=generator).bfloat16()
    jac = torch.randn(7, 3, 5, generator=generator).half()
    eig = [qa.float(), la.float(), qg.float(), lg.float()]
    scale, delta = torch.tensor([2.0]), torch.tensor([0.3])
    for full in (False, True):
        args = ([a], [jac], *[[t] for t in eig], scale, delta, [True], full)
        exact = reference.kron_predictive_variance(
            [a], [jac], *[[t.double()] for t in eig], scale.double(), delta.double(), [True], full
        )
        assert_matches_float64(emulated(*args, target_blocks=1), exact, reference.kron_predictive_variance(*args))
        empty = emulated([a[:0]], [jac[:0]], *args[2:], target_blocks=1)
        assert empty.shape == ((0, 3, 3) if full else (0, 3))


def test_emulated_kernel_refuses_what_the_cuda_path_leaves_to_aten(generator):
    qa, la, qg, lg, *_ = eigen_layer(4, 3, generator=generator)
    a, jac = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 3, 3, dtype=torch.float64)
    ones = torch.ones(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="an output Jacobian for every layer or for none"):
        emulated(
            [a, a], [jac, None], [qa, qa], [la, la], [qg, qg], [lg, lg], ones, ones, [False] * 2, True, target_blocks=1
        )
    with pytest.raises(RuntimeError, match="eigenvectors of one dtype"):
        emulated(
            [a, a],
            [jac, jac],
            [qa, qa.float()],
            [la, la.float()],
            [qg, qg.float()],
            [lg, lg.float()],
            ones,
            ones,
            [False] * 2,
            True,
            target_blocks=1,
        )
    with pytest.raises(RuntimeError, match="target_blocks must be at least 1"):
        emulated([a], [jac], [qa], [la], [qg], [lg], ones[:1], ones[:1], [False], True, target_blocks=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("last_layer", [False, True])
@pytest.mark.parametrize("classes", [10, 40])  # covariances by warp sums, and by tiles
def test_cuda_kernel_agrees_with_the_emulation(dtype, last_layer, classes, generator):
    sizes = [(785, classes), (513, classes)] if last_layer else [(785, 512), (513, 10), (3, 2)]
    layers = [eigen_layer(d_a, d_g, generator=generator) for d_a, d_g in sizes]
    eig = [[t.to(dtype) for t in ts] for ts in zip(*[layer[:4] for layer in layers])]
    inputs = [torch.randn(67, d_a - 1, generator=generator).to(dtype) for d_a, _ in sizes]
    jacobians = [
        None if last_layer else torch.randn(classes, 67, d_g, generator=generator).to(dtype).transpose(0, 1)
        for _, d_g in sizes
    ]
    scale, delta = torch.rand(len(sizes), dtype=dtype) + 0.5, torch.rand(len(sizes), dtype=dtype) + 0.1
    bias = [True] * len(sizes)
    for full in (False, True):
        expected = emulated(inputs, jacobians, *eig, scale, delta, bias, full, target_blocks=528)
        on_gpu = ops.kron_predictive_variance(
            [t.cuda() for t in inputs],
            [None if t is None else t.cuda() for t in jacobians],
            *[[t.cuda() for t in ts] for ts in eig],
            scale.cuda(),
            delta.cuda(),
            bias,
            full,
        )
        relative = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(on_gpu.cpu(), expected, rtol=0, atol=relative * expected.abs().max().item())
