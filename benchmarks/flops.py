"""FLOPs of the real-size models per call, counted on the meta device (CPU, no memory, no weights),
and what they make of each schedule: how much of a rollout's arithmetic the previews are at full size.

    python -m benchmarks.flops [--steps-sd15 50 20] [--steps-flow 10] [--out DIR]

Counted with ``torch.utils.flop_counter`` on ``benchmarks.models``' full-size architectures at 512 px:
one denoiser call per trajectory (CFG: two rows; FLUX.1-dev: one, guidance embedding), the same with
the backward pass to the inputs only (frozen base weights, as under LoRA; LoRA's own few FLOPs are
left out), one VAE decode, one PickScore call (ViT-H/14 image tower at 224 px + text tower, 77
tokens: the library scores text per image), and one preview decode per preview option
(``PREVIEW_OPTIONS``: the VAE, the VAE at preview_scale 0.5, the family's public tiny decoder).
Per schedule, in units of one denoiser call (F):
    rollout  = nfe;  previews = (decode_option + reward) / F x previews;  final = (decode + reward) / F x finals;
    update   = c x pairs  with c = (forward + backward) / forward, pairs = K x the trainable steps
               (every step but a flow model's last; only the SDE window's steps under a window).
"Previews add" = previews / (rollout + final decodes and rewards), per option. The window
schedules (``schedules.window_schedules``) are counted for the flow models.
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
from torch import Tensor

from .measure import FlopModel, count_flops
from .report import ROOT, SCHEMA_VERSION, json_safe, markdown_table, new_figure, save_figure
from .models import MINI_CLIP, PICKSCORE_CLIP, arch, tiny_decoder_config
from .schedules import NamedSchedule, paper_schedules, trainable_steps_in, window_schedules


def _count(fn) -> int:
    return count_flops(fn)


#: How a pruning preview can be decoded (the final images always use the real VAE):
#:   vae      the family's VAE on the full latent (the default)
#:   vae@0.5  the same VAE on the latent resized by 0.5 (``rollout.preview_scale``: a 256 px image at 512 px)
#:   tiny     the family's public tiny decoder (``AutoencoderTiny``: TAESD / TAESD3 / TAEF1) on the full latent
PREVIEW_OPTIONS = ("vae", "vae@0.5", "tiny")


def denoiser_call(family: str, a: dict[str, Any], resolution: int,
                  batch: int = 1) -> tuple[torch.nn.Module, Any, Tensor]:
    """(net, call, x): the denoiser of ``arch`` ``a`` built on the current default device, frozen, and
    ``call(x)``, one denoiser call for ``batch`` trajectories (CFG: two rows each; FLUX.1-dev: one,
    guidance embedding) at ``resolution`` with the real sequence lengths."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    side = resolution // 8
    if family == "sd15":
        net = UNet2DConditionModel(**a["unet"]).requires_grad_(False)
        rows = 2 * batch
        x = torch.randn(rows, 4, side, side)
        inputs = dict(timestep=torch.full((rows,), 500.0),
                      encoder_hidden_states=torch.randn(rows, 77, a["unet"]["cross_attention_dim"]))
        return net, lambda h: net(h, **inputs).sample, x
    if family == "sd3":
        t = a["transformer"]
        net = SD3Transformer2DModel(**t).requires_grad_(False)
        rows = 2 * batch
        x = torch.randn(rows, 16, side, side)
        inputs = dict(timestep=torch.full((rows,), 500.0),
                      encoder_hidden_states=torch.randn(rows, 77 + a["max_sequence_length"], t["joint_attention_dim"]),
                      pooled_projections=torch.randn(rows, t["pooled_projection_dim"]))
        return net, lambda h: net(hidden_states=h, **inputs, return_dict=False)[0], x
    t = a["transformer"]
    net = FluxTransformer2DModel(**t).requires_grad_(False)
    rows, L = batch, a["max_sequence_length"]
    x = torch.randn(rows, (side // 2) ** 2, 64)
    inputs = dict(timestep=torch.full((rows,), 0.5), guidance=torch.full((rows,), 3.5),
                  pooled_projections=torch.randn(rows, t["pooled_projection_dim"]),
                  encoder_hidden_states=torch.randn(rows, L, t["joint_attention_dim"]),
                  txt_ids=torch.zeros(L, 3), img_ids=torch.zeros((side // 2) ** 2, 3))
    return net, lambda h: net(hidden_states=h, **inputs, return_dict=False)[0], x


def preview_decoders(family: str, a: dict[str, Any], resolution: int, batch: int = 1) -> dict[str, Any]:
    """Per preview option, a closure decoding ``batch`` previews (modules built on the current default device)."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    vae = AutoencoderKL(**a["vae"]).requires_grad_(False)
    tiny = AutoencoderTiny(**tiny_decoder_config(family)).requires_grad_(False)
    side, ch = resolution // 8, a["vae"]["latent_channels"]
    z = torch.randn(batch, ch, side, side)
    z_half = torch.randn(batch, ch, side // 2, side // 2)  # what preview_scale 0.5 hands the decoder
    return {"vae": lambda: vae.decode(z).sample, "vae@0.5": lambda: vae.decode(z_half).sample,
            "tiny": lambda: tiny.decode(z).sample}


def pickscore_clip(size: str = "full") -> Any:
    """PickScore's architecture (CLIP ViT-H/14) on the current default device, frozen."""
    from transformers import CLIPConfig, CLIPModel

    spec = PICKSCORE_CLIP if size == "full" else MINI_CLIP
    proj = spec["projection_dim"]
    return CLIPModel(CLIPConfig(text_config=dict(spec["text"], vocab_size=49408, projection_dim=proj),
                                vision_config=dict(spec["vision"], projection_dim=proj),
                                projection_dim=proj)).requires_grad_(False)


def reward_calls(clip: Any, batch: int = 1) -> dict[str, Any]:
    """One PickScore call for ``batch`` images: the image tower at 224 px and the text tower (77 tokens;
    the library encodes the prompt per image)."""
    pixels = torch.randn(batch, 3, 224, 224)
    ids = torch.zeros(batch, 77, dtype=torch.long)
    return {"image": lambda: clip.get_image_features(pixel_values=pixels),
            "text": lambda: clip.get_text_features(input_ids=ids)}


def unit_flops_full(family: str, resolution: int = 512, size: str = "full") -> dict[str, Any]:
    """FLOPs per trajectory for ``family`` at ``size`` (see the module docstring), on the meta device."""
    a = arch(family, size)
    with torch.device("meta"):
        net, call, x = denoiser_call(family, a, resolution)
        decoders = preview_decoders(family, a, resolution)
        reward = reward_calls(pickscore_clip(size))

    def fwd_bwd() -> None:
        h = x.clone().requires_grad_(True)
        call(h).float().sum().backward()

    fwd = _count(lambda: call(x))
    train = _count(fwd_bwd)
    preview_decode = {k: _count(fn) for k, fn in decoders.items()}
    reward_parts = {k: _count(fn) for k, fn in reward.items()}
    return {"denoiser_call": fwd, "train_pair": train, "vae_decode": preview_decode["vae"],
            "reward": sum(reward_parts.values()), "reward_parts": reward_parts, "preview_decode": preview_decode,
            "rows_per_call": int(x.shape[0]), "params": sum(p.numel() for p in net.parameters())}


def preview_units(units: dict[str, Any]) -> dict[str, float]:
    """One preview image (decode + reward) per preview option, in denoiser calls (F)."""
    decode = units.get("preview_decode") or {"vae": units["vae_decode"]}
    return {k: (d + units["reward"]) / units["denoiser_call"] for k, d in decode.items()}


def schedule_flops(family: str, T: int, units: dict[str, Any], group_scale: float = 1.0,
                   schedules: list[NamedSchedule] | None = None) -> list[dict[str, Any]]:
    """Each schedule's FLOPs per prompt in units of F (the module docstring), the first schedule the
    reference. Per preview option: the previews' FLOPs and what they add to the rest of the rollout
    (denoiser calls + final decodes and rewards, which always use the real VAE)."""
    F = units["denoiser_call"]
    c = units["train_pair"] / F
    image = (units["vae_decode"] + units["reward"]) / F  # a final image: real VAE + reward
    per_option = preview_units(units)
    out = []
    for s in schedules if schedules is not None else paper_schedules(family, T, group_scale):
        sched = s.schedule
        n_train = trainable_steps_in(family, T, s.window)
        model = FlopModel(train_cost=c, trainable_steps=n_train)
        sizes = sched.group_sizes_per_step(T)
        previews = sum(sizes[ck] for ck in sched.checkpoints) if sched.rule not in ("none", "random") else 0
        finals = sizes[-1]
        rollout = model.rollout(sched, 1, T)
        pairs = sched.final_size * n_train
        update = c * pairs
        rest = rollout + finals * image  # the rollout without its previews
        options = {k: {"units": previews * u, "share": previews * u / rest, "all_total": rest + update + previews * u}
                   for k, u in per_option.items()}
        out.append({"name": s.name, "spec": s.spec, "window": s.window, "nfe": rollout, "previews": previews,
                    "final_decodes": finals, "trainable_steps": n_train, "update_pairs": pairs,
                    "trained": sched.final_size,
                    "units": {"rollout": rollout, "previews": options["vae"]["units"], "final": finals * image,
                              "update": update},
                    "preview_share_of_rollout": options["vae"]["share"], "preview_options": options,
                    "flop_model_total": rollout + update,
                    "all_total": options["vae"]["all_total"]})
    ref = out[0]
    for r in out:
        r["flop_ratio"] = r["flop_model_total"] / ref["flop_model_total"]
        r["all_ratio"] = r["all_total"] / ref["all_total"]
        for k, o in r["preview_options"].items():  # the reference decodes its previews (if any) the same way
            o["all_ratio"] = o["all_total"] / ref["preview_options"][k]["all_total"]
    return out


def preview_option_rows(family: str, units: dict[str, Any]) -> list[list[Any]]:
    """Table rows: one preview per option (decode, decode + reward, in TFLOP and in F)."""
    F, rows = units["denoiser_call"], []
    for k, d in units["preview_decode"].items():
        rows.append([family, k, f"{d / 1e12:.3f}", f"{d / F:.3f}", f"{(d + units['reward']) / 1e12:.3f}",
                     f"{(d + units['reward']) / F:.3f}", f"{d / units['preview_decode']['vae']:.3f}"])
    return rows


def preview_targets(result: dict[str, Any], limit: float = 0.03) -> dict[str, Any]:
    """The issue's target: previews add < 3 % to a Pro-GRPO rollout's FLOPs, for every family and for
    SD1.5 at T = 20, with the cheapest option (the paper's Pro-GRPO schedules: every ``pro-*`` preset)."""
    out: dict[str, Any] = {}
    for family, b in result["backends"].items():
        for T, sched in b["schedules"].items():
            pro = [r for r in sched if r["spec"].startswith("pro:") and r["name"] != "pro-early"]
            for opt in PREVIEW_OPTIONS:
                shares = {r["name"]: r["preview_options"][opt]["share"] for r in pro}
                out.setdefault(f"{family}@T={T}", {})[opt] = {"shares": shares,
                                                              "met": all(v < limit for v in shares.values())}
    best = {key: min(v, key=lambda o: max(v[o]["shares"].values())) for key, v in out.items()}
    return {"limit": limit, "by_family_and_T": out, "best_option": best,
            "met_with_best_option": {key: out[key][best[key]]["met"] for key in out}}


#: The paper's per-epoch TFLOPs for SD3.5-M (Ge et al., CVPR 2026, arXiv 2512.15347, its FLOPs table)
#: and the speed-ups its text claims, as reported there (not measured here).
PAPER_SD35M_EPOCH_TFLOPS = {"sd35m_pickscore_flow_grpo.yaml": 453_474, "sd35m_pickscore_pro_grpo.yaml": 335_627,
                            "sd35m_pickscore_pro_grpo_flash.yaml": 267_366}
PAPER_SD35M_CLAIMED_SPEEDUP = {"sd35m_pickscore_pro_grpo.yaml": 1.26, "sd35m_pickscore_pro_grpo_flash.yaml": 1.41}
SD35M_CONFIGS = ("sd35m_pickscore_flow_grpo.yaml", "sd35m_pickscore_pro_grpo.yaml", "sd35m_pickscore_pro_grpo_flash.yaml")


def lora_train_flops(family: str, resolution: int, size: str, rank: int, alpha: float,
                     max_sequence_length: int | None = None, checkpointing: bool = False) -> dict[str, Any]:
    """One training pair under LoRA, counted on the meta device: the base forward (what the KL
    reference runs, adapters off), the adapted forward (every rollout call), and forward + backward
    with gradients for the adapter only (frozen base weights: no weight gradients; activation
    gradients through every layer above the first adapter), with gradient checkpointing if asked
    (its recomputation counted as it runs). Targets: the backend's defaults (``default_lora_targets``)."""
    from peft import LoraConfig

    from pro_grpo_lightning.backends.base import expand_lora_targets
    from pro_grpo_lightning.backends.flux import FluxBackend
    from pro_grpo_lightning.backends.sd3 import SD3Backend
    from pro_grpo_lightning.backends.sd15 import SD15Backend

    a = arch(family, size)
    if max_sequence_length is not None:
        a = dict(a, max_sequence_length=max_sequence_length)
    targets = {"sd15": SD15Backend, "sd3": SD3Backend, "flux": FluxBackend}[family].default_lora_targets
    with torch.device("meta"):
        net, call, x = denoiser_call(family, a, resolution)
        base = _count(lambda: call(x))
        net.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=expand_lora_targets(net, list(targets))))
    if checkpointing:
        net.enable_gradient_checkpointing()
    net.train(checkpointing)
    adapted = _count(lambda: call(x))

    def fwd_bwd() -> None:
        call(x).float().sum().backward()

    train = _count(fwd_bwd)
    lora_params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"base_forward": base, "lora_forward": adapted, "train_pair": train, "backward_factor": train / adapted,
            "lora_params": lora_params, "rank": rank, "checkpointing": checkpointing,
            "max_sequence_length": a.get("max_sequence_length")}


def read_config(path: Path) -> dict[str, Any]:
    """A shipped YAML config with the base it overlays (``sd35m_pickscore_base.yaml``), merged; only
    plain YAML is read (no class is imported from a name in the file)."""
    import yaml

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    cfg = yaml.safe_load(path.read_text())
    base = path.parent / "sd35m_pickscore_base.yaml"
    return merge(yaml.safe_load(base.read_text()), cfg) if path.name != base.name and base.exists() else cfg


def config_schedule(cfg: dict[str, Any]) -> Any:
    """The config's group schedule (the two schedule classes the shipped SD3.5-M configs use)."""
    from pro_grpo_lightning.schedules import PlainGRPOSchedule, ProGRPOSchedule

    spec = cfg["model"]["schedule"]
    cls = {"PlainGRPOSchedule": PlainGRPOSchedule, "ProGRPOSchedule": ProGRPOSchedule}.get(spec["class_path"].rsplit(".", 1)[-1])
    if cls is None:
        raise ValueError(f"schedule {spec['class_path']!r}: only PlainGRPOSchedule and ProGRPOSchedule are counted here")
    return cls(**spec["init_args"])


def config_flops(cfg: dict[str, Any], units: dict[str, Any], train: dict[str, Any]) -> dict[str, float]:
    """TFLOPs per prompt and iteration of a config, everything that runs counted: denoiser calls
    (adapted forward), preview decodes + rewards, final decodes + rewards, and per training pair the
    LoRA forward + backward plus the reference forward when ``kl_beta > 0``."""
    import math

    from benchmarks.measure import decoded_images

    b, u = cfg["model"]["backend"]["init_args"], cfg["model"]["update"]
    T = int(b["num_steps"])
    sched = config_schedule(cfg)
    previews, finals = decoded_images(sched, 1, T)
    n_train = T - 1  # a flow model's last step (sigma_next = 0) is never trained
    pairs = sched.final_size * math.ceil(float(u.get("timestep_fraction", 1.0)) * n_train) * int(u.get("inner_epochs", 1))
    kl = float(u.get("kl_beta", 0.0)) > 0
    image = units["vae_decode"] + units["reward"]
    parts = {"denoise": sched.nfe_per_prompt(T) * train["lora_forward"], "previews": previews * image,
             "finals": finals * image, "update": pairs * train["train_pair"],
             "kl_reference": pairs * train["base_forward"] if kl else 0.0}
    parts = {k: v / 1e12 for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    parts.update(pairs=pairs, previews_n=previews, finals_n=finals, nfe=sched.nfe_per_prompt(T), kl=kl)
    return parts


def shipped_config_table(root: Path, resolution: int = 512, size: str = "full") -> dict[str, Any]:
    """The shipped SD3.5-M configs' FLOPs per prompt and iteration next to the paper's per-epoch ratios."""
    cfgs = {name: read_config(root / "configs" / name) for name in SD35M_CONFIGS}
    b = cfgs[SD35M_CONFIGS[0]]["model"]["backend"]["init_args"]
    lora = b.get("lora") or {}
    train = lora_train_flops("sd3", resolution, size, int(lora.get("rank", 32)), float(lora.get("alpha", 64)),
                             int(b.get("max_sequence_length", 256)), bool(b.get("gradient_checkpointing", False)))
    units = unit_flops_full("sd3", resolution, size)
    rows = {name: config_flops(cfg, units, train) for name, cfg in cfgs.items()}
    ref = rows[SD35M_CONFIGS[0]]["total"]
    paper_ref = PAPER_SD35M_EPOCH_TFLOPS[SD35M_CONFIGS[0]]
    for name, r in rows.items():
        r["fewer_flops_than_flow_grpo"] = ref / r["total"]
        no_kl = r["total"] - r["kl_reference"]
        r["fewer_flops_without_kl_forward"] = (ref - rows[SD35M_CONFIGS[0]]["kl_reference"]) / no_kl
        r["paper_epoch_tflops"] = PAPER_SD35M_EPOCH_TFLOPS[name]
        r["paper_epoch_ratio"] = paper_ref / PAPER_SD35M_EPOCH_TFLOPS[name]
        r["paper_claimed"] = PAPER_SD35M_CLAIMED_SPEEDUP.get(name)
    return {"lora_train": train, "rows": rows}


def shipped_config_markdown(table: dict[str, Any]) -> str:
    t = table["lora_train"]
    head = (f"LoRA r {t['rank']} on SD3.5-M ({t['lora_params'] / 1e6:.1f} M adapter parameters, {t['max_sequence_length']} "
            f"T5 tokens, checkpointing {'on' if t['checkpointing'] else 'off'}): forward + backward = "
            f"{t['backward_factor']:.3f} x the adapted forward; the adapted forward is "
            f"{t['lora_forward'] / t['base_forward']:.4f} x the base forward (the KL reference).\n\n")
    rows = [[name, r["nfe"], r["previews_n"], r["pairs"], "yes" if r["kl"] else "no", f"{r['denoise']:.1f}",
             f"{r['previews']:.1f}", f"{r['finals']:.1f}", f"{r['update']:.1f}", f"{r['kl_reference']:.1f}",
             f"{r['total']:.1f}", f"{r['fewer_flops_than_flow_grpo']:.3f}", f"{r['fewer_flops_without_kl_forward']:.3f}",
             f"{r['paper_epoch_tflops']:,}", f"{r['paper_epoch_ratio']:.3f}",
             "-" if r["paper_claimed"] is None else f"{r['paper_claimed']:.2f}"] for name, r in table["rows"].items()]
    return head + markdown_table(["config", "denoiser calls", "previews", "training pairs", "KL", "denoise TFLOP",
                                  "previews TFLOP", "finals TFLOP", "update TFLOP", "KL forward TFLOP",
                                  "total TFLOP / prompt", "fewer FLOPs than Flow-GRPO", "same without the KL forward",
                                  "paper TFLOPs / epoch", "paper ratio", "paper claims"], rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.flops", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps-sd15", type=int, nargs="+", default=[50, 20], help="T for SD1.5 (paper 50, GPU plan 20)")
    p.add_argument("--steps-flow", type=int, nargs="+", default=[10], help="T for SD3.5-M and FLUX (paper 10)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--size", choices=("full", "mini"), default="full",
                   help="full: the real architectures; mini: the same builders at toy numbers (tests)")
    p.add_argument("--families", nargs="+", choices=("sd15", "sd3", "flux"), default=["sd15", "sd3", "flux"])
    p.add_argument("--out", default=None)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else ROOT / "results" / "flops"
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"benchmark": "flops", "schema_version": SCHEMA_VERSION, "resolution": args.resolution,
                              "size": args.size, "preview_options": list(PREVIEW_OPTIONS), "backends": {}}
    rows_units, rows_preview, rows_sched, rows_window = [], [], [], []
    for family in args.families:
        units = unit_flops_full(family, args.resolution, args.size)
        F = units["denoiser_call"]
        rows_units.append([family, f"{units['params'] / 1e9:.2f} B", f"{F / units['rows_per_call'] / 1e12:.2f}",
                           units["rows_per_call"], f"{F / 1e12:.2f}", f"{units['train_pair'] / F:.2f}",
                           f"{units['vae_decode'] / 1e12:.2f}", f"{units['reward'] / 1e12:.3f}",
                           f"{(units['vae_decode'] + units['reward']) / F:.2f}"])
        rows_preview += preview_option_rows(family, units)
        steps = args.steps_sd15 if family == "sd15" else args.steps_flow
        per_T, per_T_window = {}, {}
        for T in steps:
            sched = schedule_flops(family, T, units)
            per_T[str(T)] = sched
            for r in sched:
                po = r["preview_options"]
                rows_sched.append([family, T, r["name"], r["spec"], r["nfe"], r["previews"],
                                   f"{r['units']['previews']:.1f}",
                                   *[f"{100 * po[k]['share']:.2f}%" if r["previews"] else "-" for k in PREVIEW_OPTIONS],
                                   f"{r['flop_ratio']:.3f}", f"{r['all_ratio']:.3f}",
                                   f"{po['tiny']['all_ratio']:.3f}"])
            if family != "sd15":  # SDE windows: the flow models (Flow-GRPO-Fast, MixGRPO)
                win = schedule_flops(family, T, units, schedules=window_schedules(family, T))
                per_T_window[str(T)] = win
                for r in win:
                    po = r["preview_options"]
                    rows_window.append([family, T, r["name"], r["spec"], r["trained"], r["trainable_steps"],
                                        r["update_pairs"], r["nfe"], f"{r['units']['update']:.0f}",
                                        f"{r['flop_model_total']:.0f}", r["previews"],
                                        *[f"{100 * po[k]['share']:.2f}%" if r["previews"] else "-"
                                          for k in ("vae", "tiny")],
                                        f"{r['flop_ratio']:.3f}", f"{po['tiny']['all_ratio']:.3f}",
                                        f"{r['flop_model_total'] / win[1]['flop_model_total']:.3f}"])
        result["backends"][family] = {"unit_flops": units, "schedules": per_T, "window_schedules": per_T_window}
    result["targets"] = {"previews_add_under_3pct": preview_targets(result)}
    t_cfg = ""
    if "sd3" in args.families:
        result["sd35m_configs"] = shipped_config_table(ROOT.parent, args.resolution, args.size)
        t_cfg = shipped_config_markdown(result["sd35m_configs"])
    t1 = markdown_table(["model", "denoiser params", "TFLOP per row", "rows per call (CFG)", "F: TFLOP per call",
                         "c = fwd+bwd / fwd", "VAE decode TFLOP", "PickScore TFLOP", "preview / F"], rows_units)
    t_prev = markdown_table(["model", "preview option", "decode TFLOP", "decode / F", "decode + PickScore TFLOP",
                             "preview / F", "decode / VAE decode"], rows_preview)
    t2 = markdown_table(["model", "T", "schedule", "spec", "calls (F)", "previews", "previews (F, VAE)",
                         *[f"previews add ({k})" for k in PREVIEW_OPTIONS], "FLOPs / plain (model)",
                         "FLOPs / plain (incl. decodes, rewards; VAE previews)", "same, tiny previews"], rows_sched)
    t3 = markdown_table(["model", "T", "schedule", "spec", "trained K", "trained steps", "update pairs", "calls (F)",
                         "update (F)", "FLOP model (F)", "previews", "previews add (vae)", "previews add (tiny)",
                         "FLOPs / plain (model)", "incl. decodes+rewards, tiny previews",
                         "FLOPs / plain-w2 (model)"], rows_window) if rows_window else ""
    tab = "\n\n".join(x for x in (t1, t_prev, t2, t3, t_cfg) if x)
    print(tab)
    (out / "flops.md").write_text(tab + "\n")
    files = {"json": str(out / "flops.json"), "table": str(out / "flops.md")}
    if not args.no_plot:
        fams = list(args.families)
        plt, fig, axes = new_figure(len(fams), width=4.4 * len(fams), height=4.0)
        axes = axes if len(fams) > 1 else [axes]
        for ax, family in zip(axes, fams):
            T = str((args.steps_sd15 if family == "sd15" else args.steps_flow)[0])
            sched = result["backends"][family]["schedules"][T]
            names = [r["name"] for r in sched]
            bottom = [0.0] * len(sched)
            for key, label in (("rollout", "denoiser calls"), ("previews", "previews (VAE)"),
                               ("final", "final decode+reward"), ("update", "update")):
                vals = [r["units"][key] for r in sched]
                ax.bar(names, vals, bottom=bottom, label=label)
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.scatter(names, [r["units"]["rollout"] + r["preview_options"]["tiny"]["units"] for r in sched],
                       color="black", marker="_", s=300, zorder=3, label="top of tiny-decoder previews")
            ax.set_title(f"{family}, T={T}", fontsize=9)
            ax.tick_params(axis="x", labelrotation=25, labelsize=7)
            ax.set_ylabel("FLOPs in denoiser calls (F)", fontsize=8)
        axes[0].legend(fontsize=7)
        save_figure(plt, fig, out / "flops.png", f"FLOPs per prompt and iteration ({args.size} size, "
                                                 f"{args.resolution} px, counted on the meta device)")
        files["png"] = str(out / "flops.png")
    result["files"] = files
    (out / "flops.json").write_text(json.dumps(json_safe(result), indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
