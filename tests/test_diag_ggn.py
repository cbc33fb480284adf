"""diag_ggn: Σ_n Σ_k (g_nk ∘ g_nk)(a_n ∘ a_n)ᵀ, the diagonal GGN of Linear layers."""

import pytest
import torch
from conftest import DEVICES, INPUT_DTYPES, PRIME_SIZES, assert_matches_float64, requires_extension
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call, jacrev, vmap

import fastlaplace.ops as ops
import fastlaplace.reference as reference


@pytest.mark.parametrize("bias", [False, True])
def test_equals_diagonal_of_dense_ggn_of_a_linear_layer(bias, generator):
    """GGN = Σ_n J_nᵀ Λ_n J_n with J the output's Jacobian w.r.t. row-major [W | b]."""
    layer = torch.nn.Linear(3, 4, bias=bias, dtype=torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    params = dict(layer.named_parameters())

    def output(p, xi):
        return functional_call(layer, p, (xi,))

    jac = vmap(jacrev(output), in_dims=(None, 0))(params, x)
    flat = jac["weight"].reshape(6, 4, 4, 3)
    if bias:
        flat = torch.cat([flat, jac["bias"].unsqueeze(-1)], dim=-1)  # [W | b] per output row
    flat = flat.reshape(6, 4, -1)
    # A loss Hessian with square root L_n (4 x 2 columns): GGN_n = J_nᵀ L_n L_nᵀ J_n.
    roots = torch.randn(6, 4, 2, dtype=torch.float64, generator=generator)
    dense = sum(flat[n].T @ roots[n] @ roots[n].T @ flat[n] for n in range(6))
    output_grads = roots.transpose(1, 2)  # (N, K, d_out): backpropagated root columns
    result = ops.diag_ggn([x], [output_grads], [bias])[0]
    torch.testing.assert_close(result.reshape(-1), dense.diagonal())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_matches_reference_for_mixed_layers(device, dtype, generator):
    a = [torch.randn(9, 5, generator=generator).to(dtype), torch.randn(9, 13, generator=generator).to(dtype)]
    g = [torch.randn(9, 3, 7, generator=generator).to(dtype), torch.randn(9, 2, generator=generator).to(dtype)]
    ones = [True, False]
    exact = reference.diag_ggn([t.double() for t in a], [t.double() for t in g], ones)
    rounded = reference.diag_ggn(a, g, ones)
    result = ops.diag_ggn([t.to(device) for t in a], [t.to(device) for t in g], ones)
    for got, want, own in zip(result, exact, rounded):
        assert got.dtype == reference.accumulation_dtype(dtype)
        assert_matches_float64(got, want, own)


@given(
    samples=st.sampled_from([0, *PRIME_SIZES]),
    d_in=st.sampled_from(PRIME_SIZES),
    d_out=st.sampled_from(PRIME_SIZES),
    columns=st.sampled_from([None, 1, 3]),
    bias=st.booleans(),
    transposed=st.booleans(),
)
def test_property_odd_sizes_and_layouts(samples, d_in, d_out, columns, bias, transposed):
    a = (
        torch.randn(d_in, samples, dtype=torch.float64).T
        if transposed
        else torch.randn(samples, d_in, dtype=torch.float64)
    )
    shape = (samples, d_out) if columns is None else (samples, columns, d_out)
    g = (
        torch.randn(*shape[::-1], dtype=torch.float64).permute(*reversed(range(len(shape))))
        if transposed
        else torch.randn(*shape, dtype=torch.float64)
    )
    before = (a.clone(), g.clone())
    result = ops.diag_ggn([a], [g], [bias])[0]
    expected = reference.diag_ggn([a], [g], [bias])[0]
    assert result.shape == (d_out, d_in + bias)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(a, before[0]) and torch.equal(g, before[1])


def test_opcheck():
    requires_extension()
    args = ([torch.randn(4, 3), torch.randn(4, 2)], [torch.randn(4, 2, 5), torch.randn(4, 3)], [True, False])
    torch.library.opcheck(torch.ops.fastlaplace.diag_ggn.default, args)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"output_grads\[0\] has 3 samples but inputs\[0\] has 4"):
        ops.diag_ggn([torch.randn(4, 3)], [torch.randn(3, 2)], [True])
    with pytest.raises(ValueError, match=r"output_grads\[0\] must have 2 or 3 dimensions"):
        ops.diag_ggn([torch.randn(4, 3)], [torch.randn(4, 2, 2, 2)], [True])
    with pytest.raises(ValueError, match="one entry per layer"):
        ops.diag_ggn([torch.randn(4, 3)], [], [True])
    with pytest.raises(TypeError, match=r"inputs\[0\] must be a floating"):
        ops.diag_ggn([torch.ones(4, 3, dtype=torch.int32)], [torch.randn(4, 2)], [True])
