#!/usr/bin/env python
"""Held-out exact reward of a shapes run: the base model, or the policy in a training checkpoint.

    HF_HUB_OFFLINE=1 python scripts/eval_shapes.py --config configs/quickstart.yaml \
        [--ckpt logs/quickstart/version_0/checkpoints/last.ckpt] [--samples 8] [--split heldout] \
        [-- --model.backend.init_args.guidance_scale=4.5]

Builds the model from the config (the backend the run used, at its T, CFG and SDE), loads the
checkpoint's LoRA weights if given, samples ``--samples`` images per prompt of the split with the
backend's own stochastic sampler (fixed per-image seeds, ``tasks.shapes_eval.evaluate_shapes``:
the base model and any checkpoint see the same noise) and prints the mean reward parts as JSON.
Config overrides go after ``--``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--split", default="heldout", choices=["train", "heldout", "all"])
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="extra CLI arguments, e.g. --model.backend.init_args.num_steps=10")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from pro_grpo_lightning.cli import main as cli_main
    from pro_grpo_lightning.export import load_checkpoint_into
    from pro_grpo_lightning.tasks.shapes_eval import evaluate_shapes

    cli = cli_main(["--config", args.config, "--data.prompts=[unused]", "--data.prompts_per_step=1",
                    *args.overrides], run=False, save_config=False)
    module = cli.model
    module.configure_model()
    if args.ckpt:
        load_checkpoint_into(module, args.ckpt)  # the adapter; refuses another model's checkpoint
    module.backend.eval()
    result = evaluate_shapes(module.backend, args.split, samples_per_prompt=args.samples, seed=args.seed)
    result.update(config=args.config, ckpt=args.ckpt, split=args.split, samples_per_prompt=args.samples)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
