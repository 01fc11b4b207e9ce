"""The ``README.md`` beside every export: what the weights are, how they were trained, how they score.

A Hugging Face model card (YAML front matter for the hub, then Markdown): the base model, the
fine-tuning (LoRA rank / alpha / targets, or full), the rollouts and optimizer steps trained, the
rewards and the schedule, the held-out scores at the first and the last evaluation the checkpoint
records (``pro_grpo.held_out``), how to load it, the run's config, and how to check the files
(``SHA256SUMS``). Everything comes from the checkpoint and the run's config; what is not there is
said to be unknown, never guessed.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from .checkpointing import backend_identity


def _rewards(config: dict[str, Any]) -> list[str]:
    out = []
    for r in ((config.get("model") or {}).get("rewards") or []):
        if isinstance(r, dict):
            args = r.get("init_args") or {}
            cls = str(r.get("class_path", "?"))
            name = args.get("name") or cls.rsplit(".", 1)[-1]
            out.append(f"{name} (`{cls}`, weight {args.get('weight', 1.0)})")
    return out


def _held_out(record: dict[str, Any]) -> list[str]:
    history = (record.get("held_out") or {}).get("val") or {}
    if not history:
        return ["No held-out evaluation is recorded in the checkpoint (the run had no `data.val_prompts`)."]
    steps = sorted(history, key=int)
    first, last = steps[0], steps[-1]
    names = list(history[last])
    lines = [f"Mean scores on the held-out prompts, at the first and the last evaluation the checkpoint records "
             f"(optimizer steps {first} and {last}):", "",
             "| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for step in dict.fromkeys([first, last]):
        lines.append(f"| {step} | " + " | ".join(f"{history[step].get(n, float('nan')):.4f}" for n in names) + " |")
    return lines


def write_model_card(folder: str, backend: Any, record: dict[str, Any], config: dict[str, Any] | None,
                     kind: str, weights: str = "raw") -> str:
    """Write ``<folder>/README.md``; ``record``: the checkpoint's ``pro_grpo`` record (may be empty),
    ``config``: the run's config as a dict (None: unknown), ``kind``: "LoRA" or "pipeline",
    ``weights``: "raw" or "EMA". Returns the path."""
    ident = backend_identity(backend)
    base = getattr(backend, "pretrained", None) or \
        f"{ident['backend']} (seeded tiny model, seed {getattr(backend, 'seed', '?')})"
    tuning = ("full fine-tuning of the denoiser" if ident["finetune"] == "full" else
              f"LoRA rank {ident['lora.rank']}, alpha {ident['lora.alpha']:g}, "
              f"targets {ident['lora.target_modules'] or 'the backend default'}")
    rollouts = record.get("rollouts_done")
    schedule = record.get("schedule") or (record.get("identity") or {}).get("schedule")
    rewards = _rewards(config or {})
    front = {"library_name": "diffusers", "tags": ["pro-grpo", "grpo", "text-to-image", kind.lower()]}
    if getattr(backend, "pretrained", None):
        front["base_model"] = str(backend.pretrained)
    pipeline = getattr(backend, "pipeline_class", "") or "the family's pipeline"
    use = (f'pipe = {pipeline}.from_pretrained("{base}")\npipe.load_lora_weights("{os.path.basename(folder)}")'
           if kind == "LoRA" else f'pipe = {pipeline}.from_pretrained("{os.path.basename(folder)}")')
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {kind} trained with Pro-GRPO", "",
             f"- **Base model**: `{base}`", f"- **Backend**: `{ident['backend']}`",
             f"- **Fine-tuning**: {tuning}",
             f"- **Weights**: {'the EMA of the trained weights' if weights == 'EMA' else 'the trained weights'}",
             f"- **Rollouts trained**: "
             f"{rollouts if rollouts is not None else 'unknown (the checkpoint has no record)'}",
             f"- **Rewards**: {'; '.join(rewards) if rewards else 'unknown (no run config)'}",
             f"- **Schedule**: `{schedule or 'unknown'}`", "",
             "## Held-out scores", "", *_held_out(record), "",
             "## Use", "", "```python", use, "```", "",
             "## Files", "", "`SHA256SUMS` lists the SHA-256 of every weights file: check them with "
             "`sha256sum -c SHA256SUMS` (`predict` checks them before it loads a LoRA folder).", ""]
    if config:
        lines += ["## The run's config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```", ""]
    path = os.path.join(folder, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path
