"""torch's nn.MultiheadAttention (self-attention) in the posterior, against dense brute force and its own forward."""

import pytest
import torch
from dense import targets
from torch import nn
from torch.func import functional_call, jacrev

from fastlaplace import Laplace
from fastlaplace.curvature.attention import in_projection, through_projections
from fastlaplace.optim import KFACPreconditioner


class Encoder(nn.Module):
    """Linear embedding, one nn.TransformerEncoderLayer (batch first), a mean-pooled head; ``mask`` pads keys."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        padding = x[..., 0] > 1.5  # the keys to leave out: a bool key_padding_mask (never a whole row here)
        return self.head(self.layer(self.embed(x), src_key_padding_mask=padding).mean(1))


def dense_ggn(model, x):
    """``(P, P)`` the GGN of the trainable parameters in named_parameters() order, one sample at a time."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    rows = [
        jacrev(lambda p, i=i: functional_call(model, {**p, **frozen}, (x[i : i + 1],))[0])(params)
        for i in range(len(x))
    ]
    jac = torch.stack([torch.cat([j.flatten(1) for j in row.values()], dim=-1) for row in rows])  # (N, C, P)
    p = model(x).detach().softmax(-1)
    return torch.einsum("ncp,ncd,ndq->pq", jac, torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2), jac)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func through torch's attention
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_an_encoder_layer_equals_the_dense_ggn(structure, generator):
    model = Encoder().double().eval()
    x = torch.randn(5, 6, 3, dtype=torch.float64, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure, prior_precision=1.0)
    la.fit([(x, targets("classification", 5, generator=generator))])
    assert [name for name, _ in la.layers][1:3] == ["layer.self_attn.in_proj", "layer.self_attn.out_proj"]
    ggn = dense_ggn(model, x)
    precision = ggn + torch.eye(len(ggn), dtype=torch.float64)
    if structure == "diag":
        torch.testing.assert_close(la._to_parameter_order(la.posterior_precision()), precision.diagonal())
    else:  # the posterior's [W | b] row-major order: position j holds parameter order[j]
        order = torch.cat([m.flatten() for m in la._from_parameter_order(torch.arange(len(ggn)).double())]).long()
        torch.testing.assert_close(la.posterior_precision(), precision[order][:, order])


def test_kron_fits_and_its_predictive_mean_is_the_model_output(generator):
    model = Encoder().double().eval()
    x = torch.randn(5, 6, 3, dtype=torch.float64, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit([(x, targets("classification", 5, generator=generator))])
    assert torch.isfinite(la.log_marginal_likelihood())
    torch.testing.assert_close(la.functional_variance(x)[0], model(x).detach())


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"need_weights": False},
        {"average_attn_weights": False},
        {"attn_mask": "bool"},
        {"attn_mask": "float", "key_padding_mask": True},
        {"unbatched": True},
        {"batch_first": False},
    ],
)
def test_the_forward_through_the_projections_is_torchs(options, generator):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=options.get("batch_first", True)).double().eval()
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=generator)
    kwargs = {k: v for k, v in options.items() if k in ("need_weights", "average_attn_weights")}
    if options.get("attn_mask") == "bool":
        kwargs["attn_mask"] = torch.rand(5, 5, generator=generator) > 0.7
        kwargs["attn_mask"].fill_diagonal_(False)
    elif options.get("attn_mask") == "float":
        kwargs["attn_mask"] = torch.randn(3 * 2, 5, 5, dtype=torch.float64, generator=generator)
    if options.get("key_padding_mask"):  # float, as the float attn_mask (mixed types are deprecated)
        kwargs["key_padding_mask"] = torch.tensor([[0.0] * 4 + [-torch.inf]] * 3, dtype=torch.float64)
    if options.get("unbatched"):
        x = x[0]
    expected = attention(x, x, x, **kwargs)
    with through_projections(attention, [in_projection("attention", attention)]):
        got = attention(x, x, x, **kwargs)
    assert attention.forward.__func__ is nn.MultiheadAttention.forward  # put back
    torch.testing.assert_close(got[0], expected[0])
    if expected[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], expected[1])


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention, self.head = nn.MultiheadAttention(4, 1, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.attention(x, x + 1, x + 1, need_weights=False)[0].mean(1))


def test_unsupported_attention_is_refused_by_name(generator):
    for options, message in (({"kdim": 3, "vdim": 3}, "kdim / vdim"), ({"add_bias_kv": True}, "add_bias_kv=True")):
        model = nn.Sequential(nn.MultiheadAttention(4, 1, batch_first=True, **options))
        with pytest.raises(ValueError, match=rf"layer '0' \(MultiheadAttention\) has {message}"):
            Laplace(model, "classification", subset_of_weights="all")
    la = Laplace(CrossAttention(), "classification", subset_of_weights="all", hessian_structure="diag")
    x = torch.randn(3, 5, 4, generator=generator)
    with pytest.raises(ValueError, match="different query, key or value .cross-attention."):
        la.fit([(x, targets("classification", 3, classes=2, generator=generator))])


class SequenceFirst(nn.Module):
    """An nn.TransformerEncoderLayer built with batch_first=False, fed (T, N, d) by the model, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.layer(x.transpose(0, 1)).mean(0))


def test_a_sequence_first_encoder_is_told_to_take_the_batch_first(generator):
    la = Laplace(SequenceFirst().eval(), "classification", subset_of_weights="all", hessian_structure="diag")
    x = torch.randn(4, 5, 8, generator=generator)  # 4 samples of 5 tokens
    with pytest.raises(ValueError, match=r"layer 'layer.linear1' got an input of shape \(5, 4, 8\): sequence first"):
        la.fit([(x, targets("classification", 4, classes=2, generator=generator))])


def test_kfac_leaves_the_attention_projections_their_gradients(generator):
    model = Encoder().double()
    pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=1, damping=0.1)
    assert [layer.name for layer in pre._layers] == ["embed", "layer.linear1", "layer.linear2", "head"]
    x = torch.randn(5, 6, 3, dtype=torch.float64, generator=generator)
    nn.functional.cross_entropy(model(x), targets("classification", 5, generator=generator)).backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    pre.step()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, plain[name]) == ("self_attn" in name or "norm" in name), name


def test_a_trainable_output_projection_alone_runs_through_the_module(generator):
    model = Encoder().double().eval()
    model.requires_grad_(False)
    model.layer.self_attn.out_proj.requires_grad_(True)
    x = torch.randn(5, 6, 3, dtype=torch.float64, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag", prior_precision=1.0)
    la.fit([(x, targets("classification", 5, generator=generator))])
    assert [name for name, _ in la.layers] == ["layer.self_attn.out_proj"]
    torch.testing.assert_close(la._to_parameter_order(la.posterior_precision()), dense_ggn(model, x).diagonal() + 1)
