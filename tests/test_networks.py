"""Where networks come from (``networks.NetworkSource``): pretrained, random on a device, or empty.

The same backend and reward classes build their networks from the chosen source through public
methods (``use_networks``); nothing outside them replaces a loader.
"""

from __future__ import annotations

import pytest
import torch

from pro_grpo_lightning.backends import SD3Backend, SD15Backend, TinySD3Backend
from pro_grpo_lightning.backends.sd3 import save_tiny_sd3_pipeline
from pro_grpo_lightning.loading import source_checks_skipped
from pro_grpo_lightning.module import ProGRPOModule
from pro_grpo_lightning.networks import EMPTY, NetworkSource, UnknownArchitecture
from pro_grpo_lightning.rewards import Brightness, ClipScore, PickScore
from pro_grpo_lightning.schedules import ProGRPOSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(module):
    return {n: p for n, p in module.named_parameters()}


def test_a_folder_builds_its_architecture_with_seeded_random_weights(tmp_path):
    """From a diffusers folder's config files only: the architecture of the pretrained model, not
    its weights; the same seed gives the same weights, another seed others; it samples and trains."""
    folder = save_tiny_sd3_pipeline(str(tmp_path / "sd3"), resolution=32)
    pretrained = SD3Backend(folder, num_steps=3, resolution=32, max_sequence_length=16)
    pretrained.configure_model()

    def random(seed):
        b = SD3Backend(folder, num_steps=3, resolution=32, max_sequence_length=16)
        b.use_networks(NetworkSource("random", "cpu", seed))
        b.configure_model()
        return b

    a, same, other = random(1), random(1), random(2)
    want = {n: p.shape for n, p in _params(pretrained).items()}
    assert {n: p.shape for n, p in _params(a).items()} == want  # the adapter included
    frozen = [n for n, p in _params(pretrained).items() if not p.requires_grad and "transformer" in n]
    assert any(not torch.equal(_params(a)[n], _params(pretrained)[n]) for n in frozen)  # not the weights
    assert all(torch.equal(_params(a)[n], _params(same)[n]) for n in want)
    assert any(not torch.equal(_params(a)[n], _params(other)[n]) for n in frozen)
    cond = a.encode_prompts(["a red square"])  # stand-in tokenizers pad to the real lengths
    assert {k: tuple(v.shape) for k, v in cond.items()} == \
        {k: tuple(v.shape) for k, v in pretrained.encode_prompts(["a red square"]).items()}
    x = a.initial_latents(2, torch.Generator().manual_seed(0))
    out = a.step(x, torch.zeros(2, dtype=torch.long), {k: v.expand(2, *v.shape[1:]) for k, v in cond.items()})
    out.log_prob.sum().backward()
    assert all(p.grad is not None for p in a.trainable_parameters())


def test_a_hub_id_builds_empty_on_meta_with_the_adapter_there():
    """A hub id that is not downloaded: its architecture from ``architectures.py``, on the meta
    device (no storage), the LoRA adapter too; the SD1.5 UNet has the real 859.5 M parameters."""
    with source_checks_skipped():
        b = SD15Backend("runwayml/stable-diffusion-v1-5", num_steps=4, resolution=64)
    b.use_networks(EMPTY)
    b.configure_model()
    assert all(p.is_meta for p in b.parameters())
    lora = b.trainable_parameters()
    assert lora and all(p.is_meta and p.dtype == torch.float32 for p in lora)
    frozen = sum(p.numel() for p in b.unet.parameters() if not p.requires_grad)
    assert abs(frozen - 859.52e6) < 2e-3 * 859.52e6
    with pytest.raises(RuntimeError, match="already built"):
        b.use_networks(NetworkSource())


def test_an_unknown_architecture_is_refused_by_name():
    with source_checks_skipped():
        b = SD3Backend("nobody/unknown-model")
    b.use_networks(EMPTY)
    with pytest.raises(UnknownArchitecture, match="nobody/unknown-model"):
        b.configure_model()


def test_code_built_models_build_their_code_where_the_source_says():
    b = TinySD3Backend(num_steps=3, resolution=32)
    b.use_networks(EMPTY)
    b.configure_model()
    assert all(p.is_meta for p in b.parameters())
    assert b.sigmas is not None and not b.sigmas.is_meta  # the scheduler's tables are real (CPU)


def test_the_preview_decoder_follows_the_source():
    assets = "pkg://pro_grpo_lightning/assets/"
    b = SD3Backend(assets + "tiny_shapes_sd3", num_steps=3, resolution=32, max_sequence_length=12,
                   preview_decoder=assets + "tiny_shapes_sd3_preview_decoder")
    b.use_networks(EMPTY)
    b.configure_model()
    assert b.preview_decoder is not None and all(p.is_meta for p in b.preview_decoder.parameters())
    assert all(p.is_meta for p in b.parameters())


def test_rewards_declare_their_architecture():
    """PickScore's CLIP-H from the table (986 M parameters, meta); a reward without a network
    ignores the choice; a whole run chooses at once (``ProGRPOModule.use_networks``)."""
    with source_checks_skipped():
        pick = PickScore()
    module = ProGRPOModule(backend=TinySD3Backend(num_steps=3, resolution=32), rewards=[pick, Brightness()],
                           schedule=ProGRPOSchedule(group_size=4, checkpoints=[1], keep=[2]))
    module.use_networks(EMPTY)
    pick.configure_model()
    assert all(p.is_meta for p in pick.parameters())
    assert abs(sum(p.numel() for p in pick.model.parameters()) - 986.1e6) < 5e-3 * 986.1e6
    module.backend.configure_model()
    assert all(p.is_meta for p in module.backend.parameters())


def test_a_reward_from_a_local_folder_scores_with_random_weights(tmp_path):
    from tests.tiny_models import tiny_clip_model

    tiny_clip_model().save_pretrained(tmp_path / "clip")
    reward = ClipScore(pretrained=str(tmp_path / "clip"))
    reward.use_networks(NetworkSource("random", "cpu", 0))
    reward.configure_model()
    scores = reward(torch.rand(3, 3, 32, 32), ["a", "b", "c"])
    assert scores.shape == (3,) and torch.isfinite(scores).all()


def test_offloading_is_a_public_switch():
    """With offloading the text encoders move for each encode; switched off, they never move. The
    plan's fake tensors cannot move at all, which is why it switches offloading off. Twice: the
    second build's fakes are made after identical ones (fake tensors share one dispatch cache per
    process), and must refuse to move all the same (the suite once ran this after other fakes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pro_grpo_lightning.networks import fake_tensors

    for _ in range(2):
        b = TinySD3Backend(num_steps=3, resolution=32, offload_text_encoders=True)
        b.use_networks(EMPTY)
        b.configure_model()
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_tensors(b, mode)
        with mode, torch.no_grad(), pytest.raises(RuntimeError, match="swap"):
            b.encode_prompts(["a"])  # offloading moves the (fake) encoders
        b.set_offload_text_encoders(False)
        with mode, torch.no_grad():
            cond = b.encode_prompts(["a"])
        assert cond["prompt_embeds"].shape[0] == 1
