"""Check the curvature of real model code against torch.func's dense GGN: torchvision and Hugging Face models.

For each model (random weights, 5 classes, float64, eval mode, BatchNorm running statistics
drawn), a handful of layers at various depths stay trainable (the first and last ones, a
grouped convolution where there is one), the rest are frozen so that the dense Jacobian
stays small. The diagonal posterior's curvature is compared with the diagonal of
``Σ_n J_nᵀ (diag(p_n) − p_n p_nᵀ) J_n`` from torch.func on two inputs, and the relative
error printed; a model fastlaplace refuses prints the refusal.

    python tools/zoo_check.py                      # every model below whose library is installed
    python tools/zoo_check.py resnet18 hf:mobilenet_v2

torchvision is not a dependency (``pip install --no-deps torchvision`` matching the torch
version). A torchvision wheel whose compiled detection operators do not load (a CUDA
build on a CPU-only torch) is imported without their fake-tensor registrations, which
classification models never use.
"""

from __future__ import annotations

import sys
import types
import warnings

import torch
from torch import nn
from torch.func import functional_call, jacrev

from fastlaplace import Laplace

TORCHVISION = [
    "resnet18",
    "resnext50_32x4d",
    "densenet121",
    "vgg11_bn",
    "squeezenet1_0",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "mnasnet0_5",
    "shufflenet_v2_x0_5",
    "regnet_x_400mf",
    "convnext_tiny",
    "vit_b_16",
]
HUGGING_FACE = ["hf:resnet", "hf:mobilenet_v2", "hf:regnet"]
CLASSES = 5


def torchvision_models():
    """``torchvision.models``, or None when torchvision is not installed."""
    try:
        import torchvision.models
    except ImportError:
        return None
    except RuntimeError:  # its compiled operators did not load: skip their fake-tensor registrations
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision.models
    return torchvision.models


def hugging_face_model(kind: str) -> nn.Module:
    """A tiny Hugging Face image classifier returning its logits: ``resnet``, ``mobilenet_v2`` or ``regnet``."""
    import transformers

    if kind == "resnet":
        config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=CLASSES)
        model = transformers.ResNetForImageClassification(config)
    elif kind == "mobilenet_v2":
        config = transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=CLASSES)
        model = transformers.MobileNetV2ForImageClassification(config)
    else:
        config = transformers.RegNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], groups_width=4, num_labels=CLASSES
        )
        model = transformers.RegNetForImageClassification(config)

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x).logits

    return Logits()


def prepared(model: nn.Module) -> nn.Module:
    """float64, eval mode, BatchNorm statistics drawn, all but a few layers frozen."""
    model = model.double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    kinds = (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention)
    layers = [
        m for m in model.modules() if isinstance(m, kinds) and next(m.parameters(recurse=False), None) is not None
    ]
    model.requires_grad_(False)
    picks = {0, 1, len(layers) // 3, len(layers) // 2, 2 * len(layers) // 3, len(layers) - 2, len(layers) - 1}
    grouped = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d) and m.groups > 1]
    picks |= {grouped[len(grouped) // 2]} if grouped else set()
    for i in picks:
        layers[i].requires_grad_(True)
    return model


def relative_error(model: nn.Module, size: int) -> tuple[float, int]:
    """The diagonal curvature's relative error against the dense GGN's diagonal, and the trainable weights."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag", prior_precision=1.0)
    la.fit([(x, torch.tensor([0, 3]))])
    trainable = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    jacobians = []
    for sample in x:
        jac = jacrev(lambda p, s=sample: functional_call(model, {**p, **frozen}, (s[None],))[0])(trainable)
        jacobians.append(torch.cat([j.flatten(1) for j in jac.values()], dim=-1))
    jac = torch.stack(jacobians)
    p = model(x).detach().softmax(-1)
    dense = torch.einsum("ncp,ncd,ndp->p", jac, torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2), jac)
    got = la._to_parameter_order(la.posterior_precision()) - 1
    return ((got - dense).norm() / dense.norm()).item(), dense.numel()


def main(names: list[str]) -> int:
    """Check the named models (all that are installed by default); print one line each."""
    warnings.filterwarnings("ignore", message="There is a performance drop")  # torch.func through attention
    tv = torchvision_models()
    names = names or [*(TORCHVISION if tv is not None else []), *HUGGING_FACE]
    for name in names:
        torch.manual_seed(0)
        try:
            if name.startswith("hf:"):
                model, size = hugging_face_model(name[3:]), 32
            else:
                model = tv.get_model(name, num_classes=CLASSES)
                size = getattr(model, "image_size", 64)  # a ViT takes its own image size
            error, weights = relative_error(prepared(model), size)
            print(f"{name}: relative error {error:.1e} over {weights:,} weights")
        except ValueError as refusal:
            print(f"{name}: refused: {refusal}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
