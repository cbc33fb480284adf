"""Dense brute-force quantities of tiny networks, the ground truth of the posterior tests."""

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap


class TinyRMSNorm(nn.Module):
    """An RMSNorm written as Hugging Face's ``LlamaRMSNorm`` is (its own class, ``variance_epsilon``), in any dtype."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


LAYERS = (
    nn.Linear,
    nn.Conv2d,
    nn.Embedding,
    nn.LayerNorm,
    nn.RMSNorm,
    TinyRMSNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.GroupNorm,
)


def tiny_mlp(bias: bool, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4, bias=bias), nn.Tanh(), nn.Linear(4, classes, bias=bias)).double()


def augmented_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, C, P) Jacobian of the outputs w.r.t. every layer's row-major [W | b], layers in order."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi.unsqueeze(0),))[0]), in_dims=(None, 0))(params, x)
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, LAYERS):
            w = jac[f"{name}.weight"]  # (N, C, d_out, d_in) with d_in = C*kh*kw for Conv2d, 1 for norms
            w = w.reshape(*w.shape[:2], module.weight.shape[0], -1)
            if getattr(module, "bias", None) is not None:
                w = torch.cat([w, jac[f"{name}.bias"].unsqueeze(-1)], dim=-1)
            blocks.append(w.flatten(2))
    return torch.cat(blocks, dim=-1)


def output_hessians(model: nn.Module, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """(N, C, C) Hessians of the per-sample loss w.r.t. the outputs."""
    out = model(x).detach()
    if likelihood == "regression":
        return torch.eye(out.shape[1], dtype=out.dtype).expand(out.shape[0], -1, -1)
    p = out.softmax(-1)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def dense_ggn(model, x, likelihood):
    jac = augmented_jacobian(model, x)
    return torch.einsum("ncp,ncd,ndq->pq", jac, output_hessians(model, x, likelihood), jac)


def layer_sizes(model):
    return [
        m.weight.numel() + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
        for m in model.modules()
        if isinstance(m, LAYERS)
    ]


def targets(likelihood, n, classes=3, generator=None):
    if likelihood == "classification":
        return torch.randint(0, classes, (n,), generator=generator)
    return torch.randn(n, classes, dtype=torch.float64, generator=generator)


def tiny_cnn(image: int, classes: int = 3) -> nn.Module:
    """Conv2d(2 -> 3, 3x3) then Tanh, Flatten and a Linear head, for (N, 2, image, image) inputs."""
    torch.manual_seed(0)
    side = image - 2
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * side * side, classes)).double()
