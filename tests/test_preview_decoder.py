"""The ``preview_decoder`` option: pruning previews decoded by an AutoencoderTiny, final images by the VAE.

Every case runs offline on the code-built tiny models with a random-init ``AutoencoderTiny`` of the
family's latent channels, saved to a folder and loaded through the option (the checked
``pretrained`` path). Expected images are computed here with diffusers directly, from the rule
``decode_preview`` documents (the tiny decoder's own ``scaling_factor`` / ``shift_factor``, as
diffusers' pipelines apply ``pipe.vae.config``); the saved decoders carry non-trivial factors so a
backend that used the VAE's factors, or none, fails.
"""

from __future__ import annotations

import pytest
import torch

from pro_grpo_lightning.backends import TinyFluxBackend, TinySD3Backend, TinySD15Backend
from pro_grpo_lightning.rewards import Brightness
from pro_grpo_lightning.rewards.combine import RewardSet
from pro_grpo_lightning.rollout import ExpandPruneRollout, RolloutSettings
from pro_grpo_lightning.schedules import ProGRPOSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = {  # backend, latent channels of its VAE
    "sd15": (lambda **kw: TinySD15Backend(num_steps=4, resolution=32, guidance_scale=1.0, **kw), 4),
    "sd3": (lambda **kw: TinySD3Backend(num_steps=4, resolution=32, guidance_scale=1.0, max_sequence_length=8, **kw),
            16),
    "flux": (lambda **kw: TinyFluxBackend(num_steps=4, resolution=32, max_sequence_length=8, **kw), 16),
}
SCALING, SHIFT = 1.7, 0.25  # the saved tiny decoders' own factors (the public ones carry 1 and 0)


def save_tiny_decoder(path, latent_channels: int, seed: int = 0, blocks: int = 4, **config) -> str:
    """A random-init AutoencoderTiny (8-wide, one block per stage; ``blocks`` stages: 2^(blocks-1) x
    up-sampling) written as a diffusers folder."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    cfg = dict(encoder_block_out_channels=(8,) * blocks, decoder_block_out_channels=(8,) * blocks,
               num_encoder_blocks=(1,) * blocks, num_decoder_blocks=(1,) * blocks, latent_channels=latent_channels,
               scaling_factor=SCALING, shift_factor=SHIFT)
    AutoencoderTiny(**{**cfg, **config}).save_pretrained(str(path))
    return str(path)


def expected_preview(folder: str, latents: torch.Tensor) -> torch.Tensor:
    """The tiny decoder's own decode of diffusion-space latents, by hand: z / scaling + shift."""
    from diffusers import AutoencoderTiny

    tiny = AutoencoderTiny.from_pretrained(folder).eval()
    with torch.no_grad():
        image = tiny.decode(latents / SCALING + SHIFT).sample  # [B, 3, H, W] in [-1, 1]
    return (image / 2 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_decoders")
    return {name: save_tiny_decoder(root / name, channels) for name, (_, channels) in FAMILIES.items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_previews_use_the_tiny_decoder_and_final_images_the_vae(family, decoders):
    make, _ = FAMILIES[family]
    backend = make(preview_decoder=decoders[family])
    backend.configure_model()
    plain = make()  # the same seeded model without the option
    plain.configure_model()
    x = backend.initial_latents(3, torch.Generator().manual_seed(1))  # [3, C, h, w]

    preview = backend.decode_preview(x)
    torch.testing.assert_close(preview, expected_preview(decoders[family], x), rtol=1e-5, atol=1e-6)
    assert preview.shape == (3, 3, 32, 32)  # the final images' size
    torch.testing.assert_close(backend.decode(x), plain.decode(x), rtol=0, atol=0)  # final: the VAE
    assert (preview - backend.decode(x)).abs().max() > 0.05  # a different decoder, not the VAE again
    torch.testing.assert_close(plain.decode_preview(x), plain.decode(x), rtol=0, atol=0)  # no option: VAE

    # chunked like the VAE (decode_chunk latents per call): same values
    backend.decode_chunk = 1
    torch.testing.assert_close(backend.decode_preview(x), preview, rtol=1e-5, atol=1e-6)
    backend.decode_chunk = None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rollout_scores_previews_from_the_tiny_decoder(family, decoders):
    """Spy on both decoders: the checkpoint's scores are the reward of the tiny decoder's images of
    every live row; the VAE decodes only the final rows; the survivors' images are the VAE's."""
    make, _ = FAMILIES[family]
    backend = make(preview_decoder=decoders[family])
    backend.configure_model()
    seen = {"tiny": [], "vae": []}
    backend.preview_decoder.decoder.register_forward_hook(lambda m, i, o: seen["tiny"].append(o))
    backend.vae.decoder.register_forward_hook(lambda m, i, o: seen["vae"].append(o))
    P, G = 2, 4
    rollout = ExpandPruneRollout(backend, RewardSet([Brightness()]), ProGRPOSchedule(G, [1], [2]),
                                 RolloutSettings())
    res = rollout.run(["a", "b"], torch.Generator().manual_seed(0))
    assert [o.shape[0] for o in seen["tiny"]] == [P * G]  # one preview decode of the whole live batch
    assert [o.shape[0] for o in seen["vae"]] == [P * 2]  # the final survivors only
    images = (seen["tiny"][0].float() / 2 + 0.5).clamp(0, 1)  # DecoderTiny's [-1, 1] -> [0, 1]
    torch.testing.assert_close(res.checkpoints[0].scores, Brightness()(images, [""] * (P * G)).view(P, G))
    final = backend.decode(res.latents[:, -1])  # the VAE's decode of the survivors' final latents
    torch.testing.assert_close(res.images, final, rtol=1e-5, atol=1e-6)


def test_preview_scale_resizes_the_tiny_decoders_input(decoders):
    make, _ = FAMILIES["sd3"]
    backend = make(preview_decoder=decoders["sd3"])
    backend.configure_model()
    rollout = ExpandPruneRollout(backend, RewardSet([Brightness()]), ProGRPOSchedule(4, [1], [2]),
                                 RolloutSettings(preview_scale=0.5))
    x0 = backend.initial_latents(2, torch.Generator().manual_seed(3))  # [2, 16, 4, 4]
    small = torch.nn.functional.interpolate(x0, scale_factor=0.5, mode="bilinear", antialias=True)  # [2, 16, 2, 2]
    images = rollout.preview_images(x0)
    assert images.shape == (2, 3, 16, 16)  # half the final size
    torch.testing.assert_close(images, expected_preview(decoders["sd3"], small), rtol=1e-5, atol=1e-6)


def test_preview_decoder_in_the_backend_dtype(decoders):
    make, _ = FAMILIES["sd15"]
    backend = make(preview_decoder=decoders["sd15"], dtype="bfloat16")
    backend.configure_model()
    assert {p.dtype for p in backend.preview_decoder.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in backend.preview_decoder.parameters())
    assert backend.preview_decoder not in [p for p in backend.trainable_parameters()]
    backend.train()
    assert not backend.preview_decoder.training  # frozen parts stay in eval mode
    out = backend.decode_preview(backend.initial_latents(1))
    assert out.dtype == torch.float32 and out.shape == (1, 3, 32, 32)


# ---- bad input: one line, naming the field and the value, before any model loads -----------------------
def _never_loads(monkeypatch):
    from pro_grpo_lightning.backends.base import PipelineBackend

    def boom(self):  # noqa: ANN001
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(TinySD3Backend, "load_components", boom)
    monkeypatch.setattr(PipelineBackend, "_build_preview_decoder", boom)


def test_missing_folder_fails_in_one_line_before_loading(tmp_path, monkeypatch):
    _never_loads(monkeypatch)
    missing = str(tmp_path / "no_such_decoder")
    with pytest.raises(FileNotFoundError) as err:
        TinySD3Backend(preview_decoder=missing)
    msg = str(err.value)
    assert msg.startswith(f"preview_decoder={missing!r}: no such folder") and "\n" not in msg
    with pytest.raises(FileNotFoundError, match=r"preview_decoder='pkg://pro_grpo_lightning/assets/nope'"):
        TinySD3Backend(preview_decoder="pkg://pro_grpo_lightning/assets/nope")


def test_uncached_hub_id_offline_fails_in_one_line_before_loading(monkeypatch, tmp_path):
    _never_loads(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing is downloaded
    with pytest.raises(FileNotFoundError) as err:
        TinySD3Backend(preview_decoder="madebyollin/taesd3")
    msg = str(err.value)
    assert msg.startswith("preview_decoder='madebyollin/taesd3' is not a local folder and is not in the hub cache")
    assert "\n" not in msg


def test_cli_refuses_a_bad_preview_decoder_before_loading(tmp_path, monkeypatch, capsys):
    """The YAML knob ``model.backend.init_args.preview_decoder`` through the CLI: exit status 2, one line."""
    from pro_grpo_lightning.cli import main, run_main

    _never_loads(monkeypatch)
    missing = str(tmp_path / "nothing")
    argv = ["--config", "configs/tiny_sd3.yaml", f"--model.backend.init_args.preview_decoder={missing}"]
    assert run_main(lambda a: main(a, run=False, save_config=False), argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: FileNotFoundError: preview_decoder={missing!r}: no such folder. Point it at a " \
                      f"local diffusers folder or a hub id."


def test_decoder_of_another_family_is_refused(decoders, tmp_path):
    backend = TinySD3Backend(num_steps=4, resolution=32, max_sequence_length=8, preview_decoder=decoders["sd15"])
    with pytest.raises(ValueError, match=r"preview_decoder=.*reads 4 latent channels.* writes 16"):
        backend.configure_model()
    two_x = save_tiny_decoder(tmp_path / "two_x", 16, blocks=2)  # 2x up-sampling for an 8x VAE
    backend = TinySD3Backend(num_steps=4, resolution=32, max_sequence_length=8, preview_decoder=two_x)
    with pytest.raises(ValueError, match=r"up-samples latents 2x.* 8x"):
        backend.configure_model()


def test_folder_without_a_tiny_decoder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "AutoencoderTiny", "latent_channels": 16}')
    backend = TinySD3Backend(num_steps=4, resolution=32, max_sequence_length=8, preview_decoder=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"preview_decoder=.*cannot load an AutoencoderTiny"):
        backend.configure_model()  # config but no weights: refused, not randomly initialised


# ---- the architecture table and the memory plan ---------------------------------------------------------
def test_architecture_table_builds_the_public_decoders_on_meta():
    from diffusers import AutoencoderTiny

    from pro_grpo_lightning.architectures import PIPELINES, PREVIEW_DECODER_OF, PREVIEW_DECODERS

    for hub_id, cfg in PREVIEW_DECODERS.items():
        with torch.device("meta"):
            net = AutoencoderTiny(**cfg)
        decoder = sum(p.numel() for p in net.decoder.parameters())
        # TAESD's README: 1,222,531 decoder parameters; 16 latent channels add 12 x 64 x 9 input weights
        assert decoder == 1_222_531 + (cfg["latent_channels"] - 4) * 64 * 9, hub_id
    for pipeline, decoder in PREVIEW_DECODER_OF.items():  # the tiny decoder reads that VAE's channels
        assert PREVIEW_DECODERS[decoder]["latent_channels"] == PIPELINES[pipeline]["vae"][1]["latent_channels"]


def test_plan_counts_the_preview_decoders_weights(decoders):
    from pro_grpo_lightning import plan
    from pro_grpo_lightning.module import ProGRPOModule
    from pro_grpo_lightning.update import UpdateSettings

    def planner(**kw):
        make, _ = FAMILIES["sd3"]
        module = ProGRPOModule(backend=make(**kw), rewards=[Brightness()],
                               schedule=ProGRPOSchedule(group_size=4, checkpoints=[1], keep=[2]),
                               update=UpdateSettings(train_batch_size=4))
        return plan.Planner(module, prompts_per_step=1, target="cpu")

    with_tiny, without = planner(preview_decoder=decoders["sd3"]), planner()
    from diffusers import AutoencoderTiny

    n = sum(p.numel() for p in AutoencoderTiny.from_pretrained(decoders["sd3"]).parameters())
    assert with_tiny.weights["preview_decoder"] == 4 * n  # float32
    assert "preview_decoder" not in without.weights
    assert with_tiny.resident(with_tiny.settings) - without.resident(without.settings) == 4 * n
    # the preview phases decode with it: the extrapolated figure matches a direct trace of the
    # rollout's own preview path (decode_preview), and differs from the VAE's
    for rows in (3, 6):
        est, traced = with_tiny.score(rows, None, preview=True), with_tiny.score_traced(rows, None, preview=True)
        assert abs(est - traced) <= 0.02 * traced + 16 * 1024, (rows, est, traced)
    assert with_tiny.score(6, None, preview=True) != with_tiny.score(6, None)
    assert without.score(6, None, preview=True) == without.score(6, None)  # no preview decoder: the VAE


def test_proxy_quality_compares_preview_decoders_at_toy_size(decoders, tmp_path):
    """``benchmarks.proxy_quality --preview-decoder``: the arms share trajectories (same final rewards),
    the VAE arm's overlap difference with itself is 0, a half-size preview costs a quarter of the FLOPs."""
    from benchmarks.proxy_quality import main

    argv = ["--config", "configs/tiny_sd3.yaml", "--override=--model.backend.init_args.num_steps=4",
            "--override=--model.schedule.init_args.checkpoints=[1, 2]",
            "--preview-decoder", "vae", "--preview-decoder", "vae@0.5", "--preview-decoder", decoders["sd3"],
            "--rollouts", "2", "--timed-rollouts", "1", "--repeats", "1", "--out", str(tmp_path)]
    out = main(argv)
    vae, half, tiny = (out["arms"][k] for k in ("vae", "vae@0.5", decoders["sd3"]))
    finals = [arm["per_rollout"]["final_reward"] for arm in (vae, half, tiny)]
    assert finals[0] == finals[1] == finals[2]  # the same trajectories in every arm
    assert vae["overlap_minus_vae"]["mean"] == 0.0
    assert half["flops"] * 4 == vae["flops"]  # 4x4 -> 2x2 latents: a quarter of every conv's output
    assert len(vae["proxy_corr_full"]) == 2 and 0 < vae["preview_share"]["mean"] < 1
    assert (tmp_path / "summary.md").read_text().count("\n| `") == 3


# ---- the distilled decoder shipped for the shapes model ---------------------------------------------------
SHAPES = "pkg://pro_grpo_lightning/assets/tiny_shapes_sd3"
SHAPES_PREVIEW = "pkg://pro_grpo_lightning/assets/tiny_shapes_sd3_preview_decoder"


def test_distilled_shapes_decoder_loads_from_the_package_and_decodes_close_to_the_vae():
    """Measured on these 64 held-out images (render seed 5): mean |pixel difference| 0.0084 (the VAE's
    own reconstruction error of the rendered images is 0.0118), the same shapes reward for 61 of 64.
    Bounds with margin: 0.012 and 56 of 64. Cost: 13.0 vs 66.4 MFLOPs per decode (docs/benchmarks.md)."""
    from benchmarks.measure import count_flops
    from pro_grpo_lightning.backends.sd3 import SD3Backend
    from pro_grpo_lightning.rewards.shapes import ShapesReward
    from pro_grpo_lightning.tasks.shapes import render_shapes, shapes_prompts

    backend = SD3Backend(SHAPES, num_steps=10, guidance_scale=1.0, resolution=32, max_sequence_length=12,
                         preview_decoder=SHAPES_PREVIEW)
    backend.configure_model()
    assert type(backend.preview_decoder).__name__ == "AutoencoderTiny"
    prompts = shapes_prompts("heldout", 64, seed=5)
    images = render_shapes(prompts, 32, seed=5)  # [64, 3, 32, 32] in [0, 1]
    cfg = backend.vae.config
    with torch.no_grad():
        mean = backend.vae.encode(images * 2 - 1).latent_dist.mean  # [64, 4, 16, 16]
    z = (mean - cfg.shift_factor) * cfg.scaling_factor  # diffusion-space latents
    tiny, vae = backend.decode_preview(z), backend.decode(z)
    assert (tiny - vae).abs().mean() < 0.012
    reward = ShapesReward()
    assert (reward(tiny, prompts) == reward(vae, prompts)).sum() >= 56
    assert count_flops(lambda: backend.decode_preview(z[:1])) * 4 < count_flops(lambda: backend.decode(z[:1]))


def test_distillation_script_at_toy_size(tmp_path):
    """``scripts/train_tiny_preview_decoder.py`` end to end on a few steps: its folder loads through the
    option and its log holds the held-out errors it measured."""
    import importlib.util
    import json

    from pro_grpo_lightning.backends.sd3 import SD3Backend

    spec = importlib.util.spec_from_file_location("distil", "scripts/train_tiny_preview_decoder.py")
    distil = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(distil)
    out = tmp_path / "decoder"
    log = distil.main(["--out", str(out), "--steps", "3", "--images", "64", "--preview-batches", "1",
                       "--num-steps", "2", "--eval-size", "16"])
    assert json.loads((out / "train_log.json").read_text()) == json.loads(json.dumps(log))
    assert len(log["heldout_x0_previews_by_step"]) == 2 and 0 < log["heldout_vae_latents"]["mean_abs"] < 1
    backend = SD3Backend(SHAPES, num_steps=2, guidance_scale=1.0, resolution=32, max_sequence_length=12,
                         preview_decoder=str(out))
    backend.configure_model()
    assert backend.decode_preview(backend.initial_latents(2)).shape == (2, 3, 32, 32)
