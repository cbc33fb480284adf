"""HuggingFace models as users pass them: GPT-2 Conv1D, ModelOutput / dict / tuple outputs, dict batches, LoRA."""

import copy
import subprocess
import sys

import pytest
import torch
from dense import targets
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.func import functional_call, jacrev, vmap
from transformers import GPT2Config, GPT2ForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.pytorch_utils import Conv1D

from fastlaplace import Laplace
from fastlaplace.curvature import statistics
from fastlaplace.optim import KFACPreconditioner


def parameter_jacobian(model: nn.Module, x) -> torch.Tensor:
    """(N, C, P) Jacobian of the outputs w.r.t. the trainable parameters, named_parameters() order, row-major."""
    trainable = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}

    def output(params, xi):
        return functional_call(model, {**params, **frozen}, (xi.unsqueeze(0),))[0]

    jac = vmap(jacrev(output), in_dims=(None, 0))(trainable, x)
    return torch.cat([j.flatten(2) for j in jac.values()], dim=-1)


def dense_glm_covariance(model, x_train, likelihood, x_test, prior_precision=1.0, structure="full"):
    """J P⁻¹ Jᵀ at x_test with P = GGN(x_train) + δ (its diagonal for "diag"), all in named_parameters() order."""
    jac = parameter_jacobian(model, x_train)
    out = model(x_train).detach()
    if likelihood == "regression":
        hessians = torch.eye(out.shape[1], dtype=out.dtype).expand(out.shape[0], -1, -1)
    else:
        p = out.softmax(-1)
        hessians = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    ggn = torch.einsum("ncp,ncd,ndq->pq", jac, hessians, jac)
    if structure == "diag":
        ggn = torch.diag(ggn.diagonal())
    precision = ggn + prior_precision * torch.eye(ggn.shape[0], dtype=ggn.dtype)
    test_jac = parameter_jacobian(model, x_test)
    return test_jac @ torch.linalg.solve(precision, test_jac.transpose(1, 2)), ggn


class Flatten(nn.Module):
    def forward(self, x):
        return x.mean(1)


def conv1d_model(tokens: bool = False) -> nn.Module:
    """Conv1D(3 -> 4), Tanh, [mean over tokens], Conv1D(4 -> 2): GPT-2's transposed Linear layers."""
    torch.manual_seed(0)
    layers = [Conv1D(4, 3), nn.Tanh(), *([Flatten()] if tokens else []), Conv1D(2, 4)]
    for layer in layers:
        if isinstance(layer, Conv1D):
            nn.init.normal_(layer.weight, std=0.7)
            nn.init.normal_(layer.bias, std=0.3)
    return nn.Sequential(*layers).double()


def as_linear(model: nn.Module) -> nn.Module:
    """The same network with every Conv1D replaced by the nn.Linear of the transposed weight."""
    layers = []
    for layer in model:
        if isinstance(layer, Conv1D):
            linear = nn.Linear(layer.nx, layer.nf).double()
            linear.weight.data.copy_(layer.weight.data.T)
            linear.bias.data.copy_(layer.bias.data)
            layer = linear
        layers.append(layer)
    return nn.Sequential(*layers)


def test_conv1d_parameter_order_is_the_stored_weights(generator):
    model = conv1d_model()
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    torch.testing.assert_close(la._to_parameter_order(la.layer_weights()), flat)
    for block in la._from_parameter_order(flat):
        assert block.shape in ((4, 4), (2, 5))  # (d_out, d_in + bias), as the equivalent Linear's


@pytest.mark.parametrize("structure", ["diag", "full", "lowrank"])
@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_conv1d_exact_structures_equal_the_dense_ggn(structure, tokens, likelihood, generator):
    model = conv1d_model(tokens)
    shape = (5, 6, 3) if tokens else (5, 3)
    x = torch.randn(*shape, dtype=torch.float64, generator=generator)
    x_test = torch.randn(2, *shape[1:], dtype=torch.float64, generator=generator)
    options = {"low_rank": 26} if structure == "lowrank" else {}  # rank = P: the sketch is exact
    la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure, **options)
    la.fit([(x[:3], targets(likelihood, 3, 2, generator)), (x[3:], targets(likelihood, 2, 2, generator))])
    covariance, ggn = dense_glm_covariance(model, x, likelihood, x_test, structure=structure)
    torch.testing.assert_close(la.functional_variance(x_test)[1], covariance)
    if structure == "diag":  # the diagonal itself, in named_parameters() order
        torch.testing.assert_close(la._to_parameter_order(la.posterior_precision()), ggn.diagonal() + 1)


def test_conv1d_kron_is_exact_for_one_layer_and_one_datum(generator):
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(2, 3)).double()
    x, x_test = torch.randn(1, 3, dtype=torch.float64, generator=generator), torch.randn(3, 3, dtype=torch.float64)
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="kron")
    la.fit([(x, targets("regression", 1, 2, generator))])
    covariance, _ = dense_glm_covariance(model, x, "regression", x_test)
    torch.testing.assert_close(la.functional_variance(x_test)[1], covariance)


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_conv1d_gets_the_kron_posterior_of_the_equivalent_linear(kfac_approx, generator):
    model = conv1d_model(tokens=True)
    linear = as_linear(model)
    x = torch.randn(6, 4, 3, dtype=torch.float64, generator=generator)
    batches = [(x[:4], targets("classification", 4, 2, generator)), (x[4:], targets("classification", 2, 2, generator))]
    posteriors = []
    for network in (model, linear):
        la = Laplace(
            network, "classification", subset_of_weights="all", hessian_structure="kron", kfac_approx=kfac_approx
        )
        la.fit(batches)
        posteriors.append(la)
    conv, reference = posteriors
    for mine, theirs in zip(
        conv.curvature.input_factors + conv.curvature.output_factors,
        reference.curvature.input_factors + reference.curvature.output_factors,
    ):
        torch.testing.assert_close(mine, theirs)
    torch.testing.assert_close(conv.log_marginal_likelihood(), reference.log_marginal_likelihood())
    torch.testing.assert_close(conv(x), reference(x))
    draws = [la(x, pred_type="nn", n_samples=5, generator=torch.Generator().manual_seed(3)) for la in posteriors]
    torch.testing.assert_close(draws[0], draws[1])  # samples land on the stored (transposed) weights


def test_a_subnetwork_of_conv1d_weights_counts_the_stored_order(generator):
    model = conv1d_model()
    x, x_test = torch.randn(5, 3, dtype=torch.float64, generator=generator), torch.randn(2, 3, dtype=torch.float64)
    indices = torch.tensor([1, 4, 5, 13, 17, 20])  # weight entries (0, 1), (1, 0), (1, 1), biases, second weight
    la = Laplace(
        model, "regression", subset_of_weights="subnetwork", hessian_structure="full", subnetwork_indices=indices
    )
    la.fit([(x, targets("regression", 5, 2, generator))])
    jac, test_jac = parameter_jacobian(model, x)[..., indices], parameter_jacobian(model, x_test)[..., indices]
    precision = torch.einsum("ncp,ncq->pq", jac, jac) + torch.eye(len(indices), dtype=torch.float64)
    torch.testing.assert_close(la.functional_variance(x_test)[1], test_jac @ torch.linalg.solve(precision, test_jac.mT))


def test_conv1d_is_recognised_without_importing_transformers():
    script = (
        "import sys, torch; from torch import nn; from fastlaplace import Laplace\n"
        "m = nn.Sequential(nn.Linear(3, 2)); la = Laplace(m, 'classification', subset_of_weights='all')\n"
        "la.fit([(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]); la(torch.randn(2, 3))\n"
        "assert 'transformers' not in sys.modules, 'fastlaplace imported transformers'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


class Returning(nn.Module):
    """A network whose forward returns its logits inside a ModelOutput, a dict, a tuple, or an unreadable set."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.kind = nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Linear(4, 3), kind

    def forward(self, x):
        logits = self.head(self.body(x))
        wrapped = {
            "tensor": lambda: logits,
            "model_output": lambda: SequenceClassifierOutput(logits=logits),
            "dict": lambda: {"loss": logits.sum(), "logits": logits},
            "tuple": lambda: (logits, logits.sum()),
            "set": lambda: {1},
        }
        return wrapped[self.kind]()


@pytest.mark.parametrize("kind", ["model_output", "dict", "tuple"])
@pytest.mark.parametrize(
    "subset, structure, options",
    [
        ("all", "kron", {}),
        ("all", "lowrank", {"low_rank": 4}),
        ("last_layer", "diag", {"last_layer_name": "head"}),
        ("last_layer", "kron", {}),
    ],
)
def test_outputs_are_read_through_their_logits(kind, subset, structure, options, generator):
    x = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    batches = [(x[:4], targets("classification", 4, generator=generator)), (x[4:], targets("classification", 2))]
    posteriors = []
    for network in (Returning("tensor").double(), Returning(kind).double()):
        la = Laplace(network, "classification", subset_of_weights=subset, hessian_structure=structure, **options)
        la.fit(batches)
        posteriors.append(la)
    reference, la = posteriors
    torch.testing.assert_close(la.log_marginal_likelihood(), reference.log_marginal_likelihood())
    torch.testing.assert_close(la(x), reference(x))
    draws = [p(x, pred_type="nn", n_samples=3, generator=torch.Generator().manual_seed(2)) for p in posteriors]
    torch.testing.assert_close(draws[1], draws[0])
    # the sampled predictive leaves the model's own parameters in place (a named last layer included)
    head = la.layers[-1][1]
    assert all(isinstance(getattr(head, k), nn.Parameter) for k in ("weight", "bias"))
    torch.testing.assert_close(la(x), reference(x))


def test_an_unreadable_output_is_refused_by_its_type(generator):
    la = Laplace(Returning("set").double(), "classification", subset_of_weights="all")
    with pytest.raises(TypeError, match="logits from the model's output of type set"):
        la.fit([(torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1]))])


def tiny_gpt2(classes: int = 3) -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16, num_labels=classes, pad_token_id=0,
        bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    return GPT2ForSequenceClassification(config).double().eval()


def padded_batch(generator, n: int = 4, length: int = 6) -> dict:
    """Right-padded token ids (pad 0) and their attention mask, sequences of 2 to ``length`` tokens."""
    ids = torch.randint(1, 50, (n, length), generator=generator)
    lengths = torch.randint(2, length + 1, (n,), generator=generator)
    lengths[0] = 2
    mask = (torch.arange(length) < lengths.unsqueeze(1)).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_gpt2_last_layer_reads_the_last_real_token(structure, generator):
    model = tiny_gpt2()
    x, y = padded_batch(generator), torch.tensor([0, 1, 2, 1])
    logits = model(**x).logits.detach()
    la = Laplace(model, "classification", hessian_structure=structure, last_layer_name="score",
                 feature_reduction="pick_last")  # fmt: skip
    la.fit([(x, y)])  # labels apart
    torch.testing.assert_close(la.functional_variance(x)[0], logits)
    labelled = Laplace(model, "classification", hessian_structure=structure, last_layer_name="score",
                       feature_reduction="pick_last")  # fmt: skip
    labelled.fit([{**x, "labels": y}])  # labels under dict_key_y: not given to the model
    torch.testing.assert_close(labelled.log_marginal_likelihood(), la.log_marginal_likelihood())
    torch.testing.assert_close(labelled(x), la(x))
    # the posterior of the score layer applied to the features HF's pooling picked
    features = model.transformer(**x).last_hidden_state.detach()
    picked = features[torch.arange(4), x["attention_mask"].sum(1) - 1]
    head = nn.Sequential(nn.Linear(16, 3, bias=False)).double()
    head[0].weight.data.copy_(model.score.weight.data)
    reference = Laplace(head, "classification", hessian_structure=structure)
    reference.fit([(picked, y)])
    torch.testing.assert_close(la.log_marginal_likelihood(), reference.log_marginal_likelihood())
    torch.testing.assert_close(la(x), reference(picked))


@pytest.mark.parametrize("reduction", ["pick_first", "average"])
def test_the_other_reductions_keep_to_the_masked_tokens(reduction, generator):
    model = tiny_gpt2()
    x = padded_batch(generator)
    la = Laplace(model, "classification", last_layer_name="score", feature_reduction=reduction)
    la.fit([(x, torch.tensor([0, 1, 2, 1]))])
    features = model.transformer(**x).last_hidden_state.detach()
    mask = x["attention_mask"].unsqueeze(-1).double()
    reduced = features[:, 0] if reduction == "pick_first" else (features * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(la.functional_variance(x)[0], model.score(reduced))
    bad = {**x, "attention_mask": x["attention_mask"][:, :3]}
    with pytest.raises(ValueError, match=r"attention_mask has shape \(4, 3\), not \(N, T\) = \(4, 6\)"):
        la(bad)


def test_gpt2_all_weights_diag_equals_the_dense_ggn(generator):
    model = tiny_gpt2()
    model.transformer.wte.weight.requires_grad_(False)  # keeps the dense Jacobian small
    x = padded_batch(generator)
    x["position_ids"] = torch.arange(6).expand(4, 6)  # one row per sample: the position embedding gets curvature
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit([(x, torch.tensor([0, 1, 2, 1]))])
    assert any(name.endswith("c_attn") for name, _ in la.layers)

    def logits(params, ids, mask, positions):
        frozen = {k: v for k, v in model.named_parameters() if not v.requires_grad}
        inputs = {"input_ids": ids[None], "attention_mask": mask[None], "position_ids": positions[None]}
        return functional_call(model, {**params, **frozen}, (), inputs).logits[0]

    trainable = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    # one sample at a time: HF's mask code branches on the data, which vmap cannot batch
    per_sample = [jacrev(logits)(trainable, *(x[k][n] for k in ("input_ids", "attention_mask", "position_ids")))
                  for n in range(4)]  # fmt: skip
    jac = torch.stack([torch.cat([j.flatten(1) for j in sample.values()], dim=-1) for sample in per_sample])
    p = model(**x).logits.detach().softmax(-1)
    ggn_diagonal = torch.einsum("ncp,ncd,ndp->p", jac, torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2), jac)
    torch.testing.assert_close(la._to_parameter_order(la.posterior_precision()), ggn_diagonal + 1)
    torch.testing.assert_close(
        la.functional_variance(x)[1], torch.einsum("ncp,p,ndp->ncd", jac, 1 / (ggn_diagonal + 1), jac)
    )


def test_gpt2_with_lora_on_its_conv1d_attention(generator):
    model = tiny_gpt2()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="SEQ_CLS")
    peft_model = get_peft_model(model, config).double().eval()
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3, generator=generator)  # LoRA starts at B = 0: a zero Jacobian for A
    x, y = padded_batch(generator), torch.tensor([0, 1, 2, 1])
    x["position_ids"] = torch.arange(6).expand(4, 6)
    la = Laplace(peft_model, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit([(x, y)])
    names = [name for name, _ in la.layers]
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert not any("base_layer" in n or "c_proj" in n for n in names)  # frozen bases are left out
    probs = la(x)
    assert probs.shape == (4, 3) and torch.allclose(probs.sum(-1), torch.ones(4, dtype=torch.float64))
    assert torch.isfinite(la.log_marginal_likelihood())
    full = Laplace(peft_model, "classification", subset_of_weights="all", hessian_structure="full")
    full.fit([(x, y)])
    torch.testing.assert_close(full.functional_variance(x)[0], peft_model(**x).logits.detach())


@pytest.mark.parametrize("damping_mode", ["eigen", "factored", "ekfac"])
@pytest.mark.parametrize("tokens", [False, True])
def test_kfac_preconditions_conv1d_as_the_equivalent_linear(damping_mode, tokens, generator):
    conv1d = conv1d_model(tokens)
    linear = as_linear(conv1d)
    shape = (8, 5, 3) if tokens else (8, 3)
    steps = []
    for model in (conv1d, linear):
        pre = KFACPreconditioner(model, damping_mode=damping_mode, inv_update_steps=2)
        updates = []
        for seed in range(3):
            batch = torch.Generator().manual_seed(seed)
            x = torch.randn(shape, dtype=torch.float64, generator=batch)
            model.zero_grad()
            nn.functional.cross_entropy(model(x), torch.randint(0, 2, (8,), generator=batch)).backward()
            pre.step()
            updates.append([p.grad.clone() for p in model.parameters()])
        steps.append(updates)
    for conv1d_grads, linear_grads in zip(*steps, strict=True):
        for a, b in zip(conv1d_grads, linear_grads, strict=True):
            torch.testing.assert_close(a, b.T if a.shape != b.shape else b, rtol=1e-9, atol=1e-12)


class MeanPooledClassifier(nn.Module):
    """A BERT encoder mean-pooled over the attention mask under a Linear head (a sentence classifier)."""

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.config.hidden_size, classes).double()

    def forward(self, batch: dict) -> torch.Tensor:
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_a_bert_encoder_with_lora_under_a_pooled_head(structure, generator):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])
    model = MeanPooledClassifier(get_peft_model(BertModel(config), lora).double().eval(), 3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3, generator=generator)
    x, y = padded_batch(generator), torch.tensor([0, 1, 2, 1])
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
    la.fit([(x, y)])
    names = [name for name, _ in la.layers]
    assert sum("lora_" in n for n in names) == 4 and names[-1] == "head"
    trainable = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def logits(params, ids, mask):
        frozen = {k: v for k, v in model.named_parameters() if not v.requires_grad}
        return functional_call(model, {**params, **frozen}, ({"input_ids": ids[None], "attention_mask": mask[None]},))[
            0
        ]

    per_sample = [jacrev(logits)(trainable, x["input_ids"][n], x["attention_mask"][n]) for n in range(4)]
    jac = torch.stack([torch.cat([j.flatten(1) for j in sample.values()], dim=-1) for sample in per_sample])
    p = model(x).detach().softmax(-1)
    ggn = torch.einsum("ncp,ncd,ndq->pq", jac, torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2), jac)
    if structure == "diag":  # exact: the GGN's diagonal
        torch.testing.assert_close(la._to_parameter_order(la.posterior_precision()), ggn.diagonal() + 1)
    torch.testing.assert_close(la.functional_variance(x)[0], model(x).detach())  # the mean is the model's logits


def test_a_gpt2_built_from_its_config_is_in_training_mode_and_its_dropout_is_named(generator):
    model = tiny_gpt2().train()  # nn.Module's default mode; from_pretrained would have called eval()
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    x, y = padded_batch(generator), torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"\(Dropout, p=0.1\) is in training mode: .* call model.eval\(\)"):
        la.fit([(x, y)])
    model.eval()
    la.fit([(x, y)])
    assert torch.equal(la(x), la(x))


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_gpt2_lora_curvature_is_the_same_in_plain_backwards_per_column(structure, generator, monkeypatch):
    """From PLAIN_BACKWARD_ROWS token rows GPT-2 (LayerNorm, GELU, attention fall back) goes column by column."""
    model = tiny_gpt2()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="SEQ_CLS")
    peft_model = get_peft_model(model, config).double().eval()
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3, generator=generator)
    x, y = padded_batch(generator), torch.tensor([0, 1, 2, 1])

    def fit(rows: int):
        monkeypatch.setattr(statistics, "PLAIN_BACKWARD_ROWS", rows)
        la = Laplace(peft_model, "classification", subset_of_weights="all", hessian_structure=structure)
        la.fit([(x, y)])
        return la

    _, parts = statistics.layer_statistic_parts(peft_model, x, y, "classification")
    assert len(list(parts)) == 1  # 4 sequences of 6 tokens: 24 rows, batched
    monkeypatch.setattr(statistics, "PLAIN_BACKWARD_ROWS", 24)
    _, parts = statistics.layer_statistic_parts(peft_model, x, y, "classification")
    assert len(list(parts)) == 2  # C - 1 columns, one plain backward each
    plain, batched = fit(24), fit(10**9)
    for got, want in zip(plain._curvature_tensors(), batched._curvature_tensors(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0, max_position_embeddings=16,
    )  # fmt: skip
    model = LlamaForSequenceClassification(config).double().eval()
    model.model.embed_tokens.weight.requires_grad_(False)
    with torch.no_grad():  # away from the ones of the initialisation
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.weight.uniform_(0.5, 1.5)
    return model


def test_llama_rms_norms_get_the_curvature_of_torch_rms_norms(generator):
    model = tiny_llama()
    x, y = padded_batch(generator), torch.tensor([0, 1, 2, 1])
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit([(x, y)])
    names = [n for n, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert la.unitwise_curvature.names == names and len(names) == 5
    # the same model with torch's RMSNorm in their places, whose curvature the dense tests check
    model = copy.deepcopy(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        hf = model.get_submodule(name)
        torch_norm = nn.RMSNorm(hf.weight.shape[0], eps=hf.variance_epsilon).double()
        torch_norm.weight.data.copy_(hf.weight.data)
        setattr(model.get_submodule(parent), child, torch_norm)
    expected = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    expected.fit([(x, y)])
    # LlamaRMSNorm normalises in float32 even in a float64 model: equal to float32's rounding
    for got, want in zip(la.unitwise_curvature.blocks, expected.unitwise_curvature.blocks, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(la.log_marginal_likelihood(), expected.log_marginal_likelihood(), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        la(x, pred_type="glm", link_approx="probit"), expected(x, pred_type="glm", link_approx="probit")
    )


def test_a_per_token_head_without_feature_reduction_is_told_about_it(generator):
    data = [(padded_batch(generator), torch.tensor([0, 1, 2, 1]))]
    la = Laplace(tiny_gpt2(), "classification", hessian_structure="kron")  # the head found by the first batch
    with pytest.raises(ValueError, match=r"'score' does not produce the model's output.*feature_reduction='pick_last'"):
        la.fit(data)
    named = Laplace(tiny_gpt2(), "classification", hessian_structure="kron", last_layer_name="score")
    with pytest.raises(ValueError, match=r"'score' gets features of shape \(4, 6, 16\), one per token.*'pick_last'"):
        named.fit(data)


def test_llama_all_weights_diag_equals_the_dense_ggn(generator):
    """RMSNorm, rotary positions, the SiLU-gated MLP and grouped-query attention, against torch.func."""
    model = tiny_llama()
    x, y = padded_batch(generator), torch.tensor([0, 1, 2, 1])
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit([(x, y)])
    got = torch.cat([d.flatten() for d in la.curvature.diagonals])  # no bias anywhere: the weights' own order
    trainable = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}

    def logits(params, ids, mask):  # one sequence: the attention mask's code paths do not vmap
        return functional_call(model, {**params, **frozen}, (), {"input_ids": ids[None], "attention_mask": mask[None]})

    jacobians = []
    for ids, mask in zip(x["input_ids"], x["attention_mask"], strict=True):
        jac = jacrev(lambda p, ids=ids, mask=mask: logits(p, ids, mask).logits[0])(trainable)
        jacobians.append(torch.cat([j.flatten(1) for j in jac.values()], dim=-1))
    jac = torch.stack(jacobians)
    p = model(**x).logits.detach().softmax(-1)
    expected = torch.einsum("ncp,ncd,ndp->p", jac, torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2), jac)
    assert [n for n, _ in la.layers] == [k.removesuffix(".weight") for k in trainable]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)  # RMSNorm normalises in float32


def test_a_vit_names_its_raw_embedding_parameters_and_without_them_equals_the_dense_ggn(generator):
    """Hugging Face's ViT: a strided Conv2d patch embedding, LayerNorm, attention and GELU."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, num_labels=3,
    )  # fmt: skip
    model = ViTForImageClassification(config).double().eval()
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64, generator=generator)
    y = torch.randint(0, 3, (5,), generator=generator)
    with pytest.raises(ValueError, match=r"'vit.embeddings' \(ViTEmbeddings\).*\['cls_token', 'position_embeddings'\]"):
        Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    model.vit.embeddings.cls_token.requires_grad_(False)
    model.vit.embeddings.position_embeddings.requires_grad_(False)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit([(x[:3], y[:3]), (x[3:], y[3:])])
    got = torch.cat([d.flatten() for d in la.curvature.diagonals])  # per layer [W | b] rows
    jac = parameter_jacobian(LogitsOf(model), x)  # named_parameters() order: each weight, then its bias
    p = model(x).logits.softmax(-1).detach()
    ggn = torch.einsum("ncp,ncd,ndp->p", jac, torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2), jac)
    expected, start = [], 0
    for _, module in la.layers:
        d_out, size = module.weight.shape[0], module.weight.numel()
        weight, bias = ggn[start : start + size], ggn[start + size : start + size + d_out]
        expected.append(torch.cat([weight.view(d_out, -1), bias.view(d_out, 1)], dim=1).flatten())
        start += size + d_out
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-10, atol=1e-14)


class LogitsOf(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_a_layer_that_runs_but_does_not_reach_the_output_has_zero_curvature(structure, generator):
    """All of a BERT under a mean-pooled head: its pooler runs in the forward, its output is dropped."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = MeanPooledClassifier(BertModel(config).double().eval(), 3)
    x, y = padded_batch(generator), torch.tensor([0, 1, 2, 1])
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
    la.fit([(x, y)])
    names = [name for name, _ in la.layers]
    assert "encoder.pooler.dense" in names
    trainable = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def logits(params, ids, mask):
        return functional_call(model, params, ({"input_ids": ids[None], "attention_mask": mask[None]},))[0]

    per_sample = [jacrev(logits)(trainable, x["input_ids"][n], x["attention_mask"][n]) for n in range(4)]
    jac = torch.stack([torch.cat([j.flatten(1) for j in sample.values()], dim=-1) for sample in per_sample])
    p = model(x).detach().softmax(-1)
    ggn = torch.einsum("ncp,ncd,ndp->p", jac, torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2), jac)
    pooler = torch.cat([torch.full((v.numel(),), "pooler" in k) for k, v in trainable.items()])
    assert pooler.sum() == 16 * 16 + 16 and ggn[pooler].abs().max() == 0
    if structure == "diag":  # exact, with the pooler's entries 0
        torch.testing.assert_close(la._to_parameter_order(la.posterior_precision()), ggn + 1)
    else:  # the pooler's output factor G is 0: its block is the prior's
        linear = [name for name, module in la.layers if isinstance(module, nn.Linear)]
        assert la.curvature.output_factors[linear.index("encoder.pooler.dense")].abs().max() == 0
    torch.testing.assert_close(la.functional_variance(x)[0], model(x).detach())


def hugging_face_convnet(kind: str) -> nn.Module:
    """Hugging Face's ResNet (BatchNorm, ``hidden_state += residual``), MobileNetV2 (depthwise Conv2d, ReLU6) or
    RegNet (grouped Conv2d, squeeze-excitation): tiny configurations, float64, eval mode, read through ``.logits``.
    """
    import transformers

    torch.manual_seed(0)
    if kind == "resnet":
        config = transformers.ResNetConfig(embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1], num_labels=3)
        model = transformers.ResNetForImageClassification(config)
    elif kind == "mobilenet_v2":
        config = transformers.MobileNetV2Config(image_size=16, depth_multiplier=0.25, num_labels=3)
        model = transformers.MobileNetV2ForImageClassification(config)
    else:
        config = transformers.RegNetConfig(
            embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1], groups_width=4, num_labels=3
        )
        model = transformers.RegNetForImageClassification(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return LogitsOf(model.double().eval())


@pytest.mark.parametrize("kind", ["resnet", "mobilenet_v2", "regnet"])
def test_hugging_face_convnets_diag_equals_the_dense_ggn(kind, generator):
    model = hugging_face_convnet(kind)
    if kind == "mobilenet_v2":  # 242k weights: the dense Jacobian of its first and last blocks only
        layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d | nn.Linear)]
        for module in layers[6:-6]:
            module.requires_grad_(False)
    grouped = any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.weight.requires_grad for m in model.modules())
    assert grouped == (kind != "resnet")
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit([(x, torch.tensor([0, 1, 2]))])
    jac = torch.stack([parameter_jacobian(model, x[n : n + 1])[0] for n in range(3)])  # HF's code does not vmap
    p = model(x).detach().softmax(-1)
    ggn = torch.einsum("ncp,ncd,ndp->p", jac, torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2), jac)
    torch.testing.assert_close(la._to_parameter_order(la.posterior_precision()), ggn + 1)
