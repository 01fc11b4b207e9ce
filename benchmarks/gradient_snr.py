"""How much of one rollout's policy gradient is signal? (A diagnostic for small-scale RL.)

    python -m benchmarks.gradient_snr [--config configs/quickstart.yaml] [--rollouts 8] [--prompts 4]
                                      [--reward config|brightness] [--out DIR]

R independent rollouts of the *same* prompts (fresh sampling noise each) through the config's
module, each turned into the exact gradient the GRPO update would apply (same advantages, same
timestep subset rule, no clipping, no optimizer step). With g_i = s + n_i (s the expected
gradient, n_i zero-mean noise, independent across rollouts):

    E <g_i, g_j> = |s|^2 (i != j)          E |g_i|^2 = |s|^2 + E|n|^2

so the mean off-diagonal inner product estimates |s|^2 and the mean squared norm the total.
Reported: the mean pairwise cosine, the signal share |s|^2 / E|g|^2 (the expected squared cosine
of one rollout's gradient with s), and N_half = E|n|^2 / (3 |s|^2), the number of such rollouts
whose average points within 60 degrees of s (cosine 0.5). Same prompts every rollout is the
*favourable* case: a training run also varies the prompts. A negative |s|^2 estimate means the
signal is below what R rollouts resolve.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class GradientCapture(torch.optim.Optimizer):
    """An optimizer whose step adds the current gradients to ``total`` and changes nothing."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__(params, {})
        self.total = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, closure=None) -> None:  # noqa: ANN001 - torch's signature
        for acc, p in zip(self.total, self.param_groups[0]["params"]):
            if p.grad is not None:
                acc += p.grad

    def flat(self) -> torch.Tensor:
        return torch.cat([t.flatten() for t in self.total])


def snr_statistics(grads: torch.Tensor) -> dict[str, float]:
    """grads [R, D] (R >= 2 independent estimates of one expected gradient) -> the statistics above."""
    R = grads.shape[0]
    if R < 2:
        raise ValueError(f"need at least 2 gradients, got {R}")
    g = grads.double()
    gram = g @ g.T  # [R, R]
    off = ~torch.eye(R, dtype=torch.bool)
    signal2 = gram[off].mean().item()
    total2 = gram.diagonal().mean().item()
    norms = gram.diagonal().sqrt()
    cos = (gram / (norms[:, None] * norms[None, :]))[off]
    noise2 = total2 - signal2
    return {"rollouts": R, "pairwise_cos_mean": cos.mean().item(), "pairwise_cos_sd": cos.std().item(),
            "signal_share": signal2 / total2,
            "n_half": noise2 / (3 * signal2) if signal2 > 0 else float("inf")}


def build_module(config: str, prompts: int, reward: str, sets: Sequence[str] = ()) -> Any:
    from pro_grpo_lightning.cli import main as cli_main

    args = ["--config", config, f"--data.prompts_per_step={prompts}", "--trainer.logger=false"]
    args += [f"--{s.strip().lstrip('-')}" for s in sets]  # "model.x=1" -> "--model.x=1"
    if reward == "brightness":
        args.append('--model.rewards=[{"class_path": "pro_grpo_lightning.rewards.image_stats.Brightness"}]')
    cli = cli_main(args, run=False, save_config=False)
    cli.model.configure_model()
    return cli.model, cli.datamodule


def measure(config: str, rollouts: int, prompts: int, reward: str, seed: int = 0,
            sets: Sequence[str] = ()) -> dict[str, Any]:
    from pro_grpo_lightning.objectives import group_advantages
    from pro_grpo_lightning.update import grpo_update

    module, data = build_module(config, prompts, reward, sets)
    data.setup("fit")
    texts = list(data.prompts[:prompts])
    settings = dataclasses.replace(module.settings, max_grad_norm=None)
    params = module.backend.trainable_parameters()
    grads, spreads, means, t0 = [], [], [], time.perf_counter()
    for r in range(rollouts):
        result = module.rollout.run(texts, torch.Generator().manual_seed(seed * 10_000 + r))
        spreads.append(result.rewards.std(1, unbiased=False).mean().item())
        means.append(result.rewards.mean().item())
        a = module.advantages
        adv = group_advantages(result.rewards, std_mode=a.std, eps=a.eps, clip=a.clip)
        capture = GradientCapture(params)
        grpo_update(module.backend, result, adv.flatten(), settings, capture,
                    generator=torch.Generator().manual_seed(seed * 10_000 + r))
        grads.append(capture.flat())
    out = snr_statistics(torch.stack(grads))
    out.update(config=config, reward=reward, sets=list(sets), within_group_reward_std=sum(spreads) / len(spreads),
               reward_mean=sum(means) / len(means),
               prompts=texts, trajectories_per_rollout=int(result.rewards.numel()),
               seconds=time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gradient_snr", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/quickstart.yaml"))
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4, help="prompts per rollout (the same every rollout)")
    p.add_argument("--reward", choices=["config", "brightness"], default="config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. model.rollout.shared_initial_noise=true (repeatable)")
    p.add_argument("--tag", default="", help="suffix of the output file name")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/gradient_snr"))
    args = p.parse_args(argv)
    if args.rollouts < 2:
        p.error("--rollouts must be >= 2")
    torch.set_num_threads(args.threads)
    res = measure(args.config, args.rollouts, args.prompts, args.reward, args.seed, args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gradient_snr_{args.reward}{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"{args.reward}: {res['rollouts']} rollouts x {res['trajectories_per_rollout']} trajectories; "
          f"pairwise cos {res['pairwise_cos_mean']:.3f} +- {res['pairwise_cos_sd']:.3f}; signal share "
          f"{res['signal_share']:.4f}; reward mean {res['reward_mean']:.3f}, within-group std {res['within_group_reward_std']:.3f}; rollouts to average for cos 0.5: {res['n_half']:.0f}  -> {path}")
    return res


if __name__ == "__main__":
    main()
