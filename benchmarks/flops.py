"""FLOPs of the real-size models per call, counted on the meta device (CPU, no memory, no weights),
and what they make of each schedule: how much of a rollout's arithmetic the previews are at full size.

    python -m benchmarks.flops [--steps-sd15 50] [--out DIR]

Counted with ``torch.utils.flop_counter`` on ``benchmarks.models``' full-size architectures at 512 px:
one denoiser call per trajectory (CFG: two rows; FLUX.1-dev: one, guidance embedding), the same with
the backward pass to the inputs only (frozen base weights, as under LoRA; LoRA's own few FLOPs are
left out), one VAE decode, one PickScore call (ViT-H/14 image tower at 224 px + text tower, 77
tokens: the library scores text per image). Per schedule, in units of one denoiser call (F):
    rollout  = nfe;  previews = (decode + reward) / F x previews;  final = (decode + reward) / F x decoded finals;
    update   = c x pairs  with c = (forward + backward) / forward, every trainable step trained.
This is arithmetic only: a GPU runs convolutions at high resolution (the VAE) less efficiently than
transformer matmuls, so the measured preview share is expected above the FLOP share.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from .measure import FlopModel, count_flops
from .report import ROOT, SCHEMA_VERSION, json_safe, markdown_table, new_figure, save_figure
from .models import PICKSCORE_CLIP, arch
from .schedules import paper_schedules


def _count(fn) -> int:
    return count_flops(fn)


def unit_flops_full(family: str, resolution: int = 512) -> dict[str, float]:
    """FLOPs per trajectory for the full-size ``family`` (see the module docstring)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel

    a = arch(family, "full")
    side = resolution // 8
    with torch.device("meta"):
        if family == "sd15":
            net = UNet2DConditionModel(**a["unet"]).requires_grad_(False)
            rows = 2
            x = torch.randn(rows, 4, side, side)
            inputs = dict(timestep=torch.full((rows,), 500.0), encoder_hidden_states=torch.randn(rows, 77, 768))
            call = lambda h: net(h, **inputs).sample  # noqa: E731
        elif family == "sd3":
            net = SD3Transformer2DModel(**a["transformer"]).requires_grad_(False)
            rows = 2
            x = torch.randn(rows, 16, side, side)
            inputs = dict(timestep=torch.full((rows,), 500.0),
                          encoder_hidden_states=torch.randn(rows, 77 + a["max_sequence_length"], 4096),
                          pooled_projections=torch.randn(rows, 2048))
            call = lambda h: net(hidden_states=h, **inputs, return_dict=False)[0]  # noqa: E731
        else:
            net = FluxTransformer2DModel(**a["transformer"]).requires_grad_(False)
            rows, L = 1, a["max_sequence_length"]
            x = torch.randn(rows, (side // 2) ** 2, 64)
            inputs = dict(timestep=torch.full((rows,), 0.5), guidance=torch.full((rows,), 3.5),
                          pooled_projections=torch.randn(rows, 768), encoder_hidden_states=torch.randn(rows, L, 4096),
                          txt_ids=torch.zeros(L, 3), img_ids=torch.zeros((side // 2) ** 2, 3))
            call = lambda h: net(hidden_states=h, **inputs, return_dict=False)[0]  # noqa: E731
        vae = AutoencoderKL(**a["vae"]).requires_grad_(False)
        z = torch.randn(1, a["vae"]["latent_channels"], side, side)
        spec = PICKSCORE_CLIP
        clip = CLIPModel(CLIPConfig(text_config=dict(spec["text"], vocab_size=49408, projection_dim=1024),
                                    vision_config=dict(spec["vision"], projection_dim=1024),
                                    projection_dim=1024)).requires_grad_(False)
        pixels = torch.randn(1, 3, 224, 224)
        ids = torch.zeros(1, 77, dtype=torch.long)

    def fwd_bwd() -> None:
        h = x.clone().requires_grad_(True)
        call(h).float().sum().backward()

    fwd = _count(lambda: call(x))
    train = _count(fwd_bwd)
    decode = _count(lambda: vae.decode(z))
    reward = _count(lambda: (clip.get_image_features(pixel_values=pixels), clip.get_text_features(input_ids=ids)))
    return {"denoiser_call": fwd, "train_pair": train, "vae_decode": decode, "reward": reward,
            "rows_per_call": rows, "params": sum(p.numel() for p in net.parameters())}


def schedule_flops(family: str, T: int, units: dict[str, float], group_scale: float = 1.0) -> list[dict[str, Any]]:
    F = units["denoiser_call"]
    c = units["train_pair"] / F
    n_train = T if family == "sd15" else T - 1
    image = (units["vae_decode"] + units["reward"]) / F
    model = FlopModel(train_cost=c, trainable_steps=n_train)
    out = []
    for s in paper_schedules(family, T, group_scale):
        sched = s.schedule
        sizes = sched.group_sizes_per_step(T)
        previews = sum(sizes[ck] for ck in sched.checkpoints)
        finals = sizes[-1]
        rollout = model.rollout(sched, 1, T)
        update = model.train_cost * model.pairs(sched, 1)
        out.append({"name": s.name, "spec": s.spec, "nfe": rollout, "previews": previews, "final_decodes": finals,
                    "units": {"rollout": rollout, "previews": previews * image, "final": finals * image,
                              "update": update},
                    "preview_share_of_rollout": previews * image / (rollout + finals * image),
                    "flop_model_total": rollout + update,
                    "all_total": rollout + update + (previews + finals) * image})
    ref = out[0]
    for r in out:
        r["flop_ratio"] = r["flop_model_total"] / ref["flop_model_total"]
        r["all_ratio"] = r["all_total"] / ref["all_total"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.flops", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps-sd15", type=int, nargs="+", default=[50, 20], help="T for SD1.5 (paper 50, GPU plan 20)")
    p.add_argument("--steps-flow", type=int, nargs="+", default=[10], help="T for SD3.5-M and FLUX (paper 10)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--out", default=None)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else ROOT / "results" / "flops"
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"benchmark": "flops", "schema_version": SCHEMA_VERSION, "resolution": args.resolution,
                              "backends": {}}
    rows_units, rows_sched = [], []
    for family in ("sd15", "sd3", "flux"):
        units = unit_flops_full(family, args.resolution)
        F = units["denoiser_call"]
        rows_units.append([family, f"{units['params'] / 1e9:.2f} B", f"{F / units['rows_per_call'] / 1e12:.2f}",
                           units["rows_per_call"], f"{F / 1e12:.2f}", f"{units['train_pair'] / F:.2f}",
                           f"{units['vae_decode'] / 1e12:.2f}", f"{units['reward'] / 1e12:.3f}",
                           f"{(units['vae_decode'] + units['reward']) / F:.2f}"])
        steps = args.steps_sd15 if family == "sd15" else args.steps_flow
        per_T = {}
        for T in steps:
            sched = schedule_flops(family, T, units)
            per_T[str(T)] = sched
            for r in sched:
                rows_sched.append([family, T, r["name"], r["spec"], r["nfe"], r["previews"],
                                   f"{r['units']['previews']:.1f}", f"{100 * r['preview_share_of_rollout']:.1f}%",
                                   f"{r['flop_ratio']:.3f}", f"{r['all_ratio']:.3f}"])
        result["backends"][family] = {"unit_flops": units, "schedules": per_T}
    t1 = markdown_table(["model", "denoiser params", "TFLOP per row", "rows per call (CFG)", "F: TFLOP per call",
                           "c = fwd+bwd / fwd", "VAE decode TFLOP", "PickScore TFLOP", "preview / F"], rows_units)
    t2 = markdown_table(["model", "T", "schedule", "spec", "calls (F)", "previews", "previews (F)",
                           "previews / rollout", "FLOPs / plain (model)", "FLOPs / plain (incl. decodes, rewards)"],
                          rows_sched)
    tab = t1 + "\n\n" + t2
    print(tab)
    (out / "flops.md").write_text(tab + "\n")
    files = {"json": str(out / "flops.json"), "table": str(out / "flops.md")}
    if not args.no_plot:
        plt, fig, axes = new_figure(3, width=13, height=4.0)
        for ax, family in zip(axes, ("sd15", "sd3", "flux")):
            T = str((args.steps_sd15 if family == "sd15" else args.steps_flow)[0])
            sched = result["backends"][family]["schedules"][T]
            names = [r["name"] for r in sched]
            bottom = [0.0] * len(sched)
            for key, label in (("rollout", "denoiser calls"), ("previews", "previews"), ("final", "final decode+reward"),
                               ("update", "update")):
                vals = [r["units"][key] for r in sched]
                ax.bar(names, vals, bottom=bottom, label=label)
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_title(f"{family}, T={T}", fontsize=9)
            ax.tick_params(axis="x", labelrotation=25, labelsize=7)
            ax.set_ylabel("FLOPs in denoiser calls (F)", fontsize=8)
        axes[0].legend(fontsize=7)
        save_figure(plt, fig, out / "flops.png", f"full-size FLOPs per prompt and iteration ({args.resolution} px, counted on the meta device)")
        files["png"] = str(out / "flops.png")
    result["files"] = files
    (out / "flops.json").write_text(json.dumps(json_safe(result), indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
