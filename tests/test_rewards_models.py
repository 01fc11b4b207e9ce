"""Real-model rewards on tiny random-init models of the same architectures, offline.

Each reward loads a tiny model through its ``pretrained=`` path (folders written here with
``save_pretrained``) and must return what the in-memory model gives when the test computes the
score itself. Preprocessing and the checkpoint key mappings are checked against references written
in this file (hand-computed normalisation, a known 2:1 image, PIL's bicubic, and an independent
open_clip-style forward pass).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: every model here is built locally

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pro_grpo_lightning.offline_tokenizers import byte_level_clip_tokenizer
from pro_grpo_lightning.loading import save_state_dict_file
from pro_grpo_lightning.rewards.aesthetic import LaionAesthetic
from pro_grpo_lightning.rewards.clip_common import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, RewardMLP, _features,
                                                    center_crop, clip_preprocess, resize_shortest_side)
from pro_grpo_lightning.rewards.clip_score import ClipScore
from pro_grpo_lightning.rewards.hps import (HPSv21, convert_hps_checkpoint, open_clip_to_transformers_clip,
                                            transformers_clip_to_open_clip)
from pro_grpo_lightning.rewards.image_reward import (IMAGE_REWARD_MEAN, IMAGE_REWARD_STD, ImageReward,
                                                     convert_image_reward_checkpoint,
                                                     image_reward_checkpoint_to_transformers,
                                                     transformers_to_image_reward_checkpoint)
from pro_grpo_lightning.rewards.pickscore import PickScore
from tests.tiny_models import tiny_bert_tokenizer, tiny_blip_config, tiny_clip_model

PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, " * 6]  # the second overflows 77 tokens
MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)


def _images(size: int = 64, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g)


def _ref_pixels(images: torch.Tensor, size: int, clamp: bool = True) -> torch.Tensor:
    """Square images only: torch bicubic (antialias) to size, no crop needed, CLIP normalisation."""
    x = images
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    if clamp:
        x = x.clamp(0, 1)
    return (x - MEAN) / STD


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ---- fixtures: tiny models saved like real ones ------------------------------------------------
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    model = tiny_clip_model(seed=0)
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    byte_level_clip_tokenizer().save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="module")
def blip_parts():
    from transformers import BlipForImageTextRetrieval

    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(tiny_blip_config()).eval()
    torch.manual_seed(1)
    head = RewardMLP(32).eval()
    return model, head


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory, blip_parts):
    model, head = blip_parts
    path = tmp_path_factory.mktemp("tiny_image_reward")
    model.save_pretrained(path)
    save_state_dict_file(head.state_dict(), str(path / "mlp.safetensors"))
    tiny_bert_tokenizer().save_pretrained(path)
    return str(path)


def _clip_cosine(model, images, prompts, clamp=True):
    tok = byte_level_clip_tokenizer()
    enc = tok(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = _features(model.get_image_features(pixel_values=_ref_pixels(images, 32, clamp)))
        txt = _features(model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask))
    return (_unit(img) * _unit(txt)).sum(-1)


# ---- preprocessing -----------------------------------------------------------------------------
def test_normalisation_constants_on_a_known_image():
    color = torch.tensor([0.2, 0.5, 0.9])
    images = color.view(1, 3, 1, 1).expand(2, 3, 16, 16).clone()
    out = clip_preprocess(images, 16)
    expected = [(0.2 - 0.48145466) / 0.26862954, (0.5 - 0.4578275) / 0.26130258, (0.9 - 0.40821073) / 0.27577711]
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    for c in range(3):
        torch.testing.assert_close(out[:, c], torch.full((2, 16, 16), expected[c]), atol=1e-6, rtol=0)


def test_resize_and_centre_crop_of_a_two_to_one_image():
    # 32 x 64 image: left half red, right half blue. Short side -> 16 gives 16 x 32; the centre
    # 16 x 16 crop is columns 8..23 of that: its left half red, its right half blue.
    img = torch.zeros(1, 3, 32, 64)
    img[:, 0, :, :32] = 1.0
    img[:, 2, :, 32:] = 1.0
    resized = resize_shortest_side(img, 16)
    assert resized.shape == (1, 3, 16, 32)
    out = clip_preprocess(img, 16) * STD + MEAN   # undo normalisation
    assert out.shape == (1, 3, 16, 16)
    red, blue = torch.tensor([1.0, 0, 0]).view(3, 1, 1), torch.tensor([0, 0, 1.0]).view(3, 1, 1)
    torch.testing.assert_close(out[0, :, :, :6], red.expand(3, 16, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, :, :, 10:], blue.expand(3, 16, 6), atol=1e-5, rtol=0)
    # Portrait orientation crops rows instead.
    assert clip_preprocess(img.transpose(-1, -2), 16).shape == (1, 3, 16, 16)


def test_letterbox_pads_the_short_side_with_black():
    # HPSv2's ResizeMaxSize: a white 20 x 40 image -> 8 x 16 content, 4 black rows above and below.
    img = torch.ones(1, 3, 20, 40)
    out = clip_preprocess(img, 16, mode="letterbox", clamp=False) * STD + MEAN
    assert out.shape == (1, 3, 16, 16)
    torch.testing.assert_close(out[..., :4, :], torch.zeros(1, 3, 4, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[..., 4:12, :], torch.ones(1, 3, 8, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[..., 12:, :], torch.zeros(1, 3, 4, 16), atol=1e-5, rtol=0)
    sq = torch.rand(2, 3, 64, 64)  # square: the same as the crop path
    torch.testing.assert_close(clip_preprocess(sq, 16, mode="letterbox"), clip_preprocess(sq, 16))
    with pytest.raises(ValueError, match="mode"):
        clip_preprocess(sq, 16, mode="stretch")


def test_centre_crop_offsets_match_torchvision_rounding():
    x = torch.arange(33 * 33, dtype=torch.float32).view(1, 1, 33, 33)
    # torchvision: top = int(round((33 - 16) / 2)) = round(8.5) = 8 (round half to even)
    torch.testing.assert_close(center_crop(x, 16), x[..., 8:24, 8:24])
    y = torch.rand(2, 3, 16, 32)
    torch.testing.assert_close(center_crop(resize_shortest_side(y, 16), 16), y[..., :, 8:24])  # no resize


def test_torch_bicubic_matches_pil_bicubic_on_a_smooth_image():
    from PIL import Image

    h, w = 96, 128
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([xx, yy, 0.5 + 0.4 * torch.sin(6 * xx) * torch.cos(4 * yy)])[None]  # [1, 3, 96, 128]
    ours = resize_shortest_side(img, 24)                                                  # [1, 3, 24, 32]
    pil = [np.asarray(Image.fromarray(img[0, c].numpy(), mode="F").resize((32, 24), Image.BICUBIC))
           for c in range(3)]
    torch.testing.assert_close(ours[0], torch.from_numpy(np.stack(pil)), atol=2e-2, rtol=0)


def test_features_helper_handles_all_return_types():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    t = torch.randn(2, 4)
    assert _features(t) is t
    assert _features(BaseModelOutputWithPooling(last_hidden_state=torch.zeros(2, 3, 4), pooler_output=t)) is t
    assert _features((torch.zeros(2, 3, 4), t)) is t
    with pytest.raises(TypeError):
        _features("nope")


# ---- CLIP-based rewards ------------------------------------------------------------------------
def test_pickscore_matches_in_memory_model(clip_dir):
    path, model = clip_dir
    reward = PickScore(pretrained=path, processor_pretrained=path)
    assert reward.model is None  # __init__ loads nothing
    reward.configure_model()
    loaded = reward.model
    reward.configure_model()
    assert reward.model is loaded  # idempotent
    assert not any(p.requires_grad for p in reward.parameters())
    images = _images()
    got = reward(images, PROMPTS)
    expected = model.logit_scale.exp().detach() * _clip_cosine(model, images, PROMPTS)
    assert got.shape == (2,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_clip_score_is_clamped_hundred_times_cosine(clip_dir):
    path, model = clip_dir
    reward = ClipScore(pretrained=path)
    reward.configure_model()
    images = _images(size=48, batch=4, seed=3)
    prompts = ["a red car", "xyz", "the sea", "a cat"]
    expected = (100 * _clip_cosine(model, images, prompts)).clamp_min(0)
    torch.testing.assert_close(reward(images, prompts), expected, atol=1e-4, rtol=1e-5)


def test_clip_reward_accepts_non_square_images(clip_dir):
    path, _ = clip_dir
    reward = ClipScore(pretrained=path)
    reward.configure_model()
    out = reward(torch.rand(2, 3, 40, 72), ["a", "b"])
    assert out.shape == (2,) and torch.isfinite(out).all()


def test_low_precision_dtype(clip_dir):
    path, model = clip_dir
    reward = PickScore(pretrained=path, processor_pretrained=path, dtype="bfloat16")
    reward.configure_model()
    assert {p.dtype for p in reward.model.parameters()} == {torch.bfloat16}
    images = _images()
    got = reward(images, PROMPTS)
    expected = model.logit_scale.exp().detach() * _clip_cosine(model, images, PROMPTS)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0.5, rtol=0.05)


def test_aesthetic_matches_in_memory_model(clip_dir, tmp_path):
    path, model = clip_dir
    torch.manual_seed(2)
    head = RewardMLP(16).eval()
    images = _images(seed=4)
    with torch.no_grad():
        emb = _unit(_features(model.get_image_features(pixel_values=_ref_pixels(images, 32))))
        expected = head(emb).squeeze(-1)
    for name in ("head.pth", "head.safetensors"):
        file = str(tmp_path / name)
        save_state_dict_file(head.state_dict(), file)
        reward = LaionAesthetic(head_pretrained=file, pretrained=path)
        reward.configure_model()
        torch.testing.assert_close(reward(images, ["ignored"] * 2), expected, atol=1e-5, rtol=1e-5)


def test_aesthetic_refuses_a_missing_head(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="head_pretrained"):
        LaionAesthetic(head_pretrained=str(tmp_path / "nope.pth"), pretrained=clip_dir[0])


# ---- HPSv2.1 and the open_clip key mapping -----------------------------------------------------
def _open_clip_reference(sd, images_px, input_ids, heads=2):
    """An independent open_clip-style CLIP forward from open_clip-named weights (batch first)."""

    def block(x, p, mask):
        w = x.shape[-1]
        h = F.layer_norm(x, (w,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5).transpose(0, 1)  # [L, B, W]
        a, _ = F.multi_head_attention_forward(
            h, h, h, w, heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False,
            0.0, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False,
            need_weights=False, attn_mask=mask)
        x = x + a.transpose(0, 1)
        h = F.layer_norm(x, (w,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                     sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        return x + h

    def n_blocks(prefix):
        return len({k.split(".")[len(prefix.split(".")) - 1] for k in sd if k.startswith(prefix)})

    # image tower
    w = sd["visual.conv1.weight"]
    x = F.conv2d(images_px, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)               # [B, N, W]
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5)
    for i in range(n_blocks("visual.transformer.resblocks.")):
        x = block(x, f"visual.transformer.resblocks.{i}.", None)
    img = F.layer_norm(x[:, 0], x.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-5)
    img = img @ sd["visual.proj"]
    # text tower: causal mask, pooled at the argmax token (EOT has the largest id)
    t = sd["token_embedding.weight"][input_ids] + sd["positional_embedding"][: input_ids.shape[1]]
    length = input_ids.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1)
    for i in range(n_blocks("transformer.resblocks.")):
        t = block(t, f"transformer.resblocks.{i}.", mask)
    t = F.layer_norm(t, t.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    txt = t[torch.arange(t.shape[0]), input_ids.argmax(-1)] @ sd["text_projection"]
    return img, txt


def test_open_clip_key_mapping_round_trip_and_semantics(clip_dir):
    from transformers import CLIPModel

    _, model = clip_dir
    hf_state = model.state_dict()
    oc_state = transformers_clip_to_open_clip(hf_state)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in oc_state
    assert oc_state["visual.proj"].shape == (32, 16) and oc_state["visual.class_embedding"].shape == (32,)
    ddp_style = {"module." + k: v for k, v in oc_state.items()} | {"attn_mask": torch.zeros(1)}
    back = open_clip_to_transformers_clip(ddp_style)
    assert set(back) == set(hf_state)
    fresh = CLIPModel(model.config).eval()
    fresh.load_state_dict(back, strict=True)
    images = _images(size=32)
    enc = byte_level_clip_tokenizer()(PROMPTS, padding="max_length", truncation=True, max_length=77,
                                      return_tensors="pt")
    px = _ref_pixels(images, 32)
    with torch.no_grad():
        hf_img = _features(fresh.get_image_features(pixel_values=px))
        hf_txt = _features(fresh.get_text_features(input_ids=enc.input_ids))
        oc_img, oc_txt = _open_clip_reference(oc_state, px, enc.input_ids)
    torch.testing.assert_close(hf_img, oc_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(hf_txt, oc_txt, atol=1e-5, rtol=1e-4)
    with pytest.raises(KeyError, match="no mapping"):
        open_clip_to_transformers_clip({"visual.something_new": torch.zeros(1)})


def test_hps_from_transformers_folder_and_open_clip_checkpoint(clip_dir, tmp_path):
    path, model = clip_dir
    images = _images(seed=5)
    expected = _clip_cosine(model, images, PROMPTS, clamp=False)
    ckpt_dir = tmp_path / "hps"
    ckpt_dir.mkdir()
    torch.save({"state_dict": transformers_clip_to_open_clip(model.state_dict()), "epoch": 3},
               ckpt_dir / "HPS_v2.1_compressed.pt")
    sources = [path, str(ckpt_dir), str(ckpt_dir / "HPS_v2.1_compressed.pt")]
    for source in sources:  # transformers folder, folder with the checkpoint, the checkpoint file
        reward = HPSv21(pretrained=source, processor_pretrained=path)
        reward.configure_model()
        torch.testing.assert_close(reward(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    out = tmp_path / "converted"
    convert_hps_checkpoint(str(ckpt_dir / "HPS_v2.1_compressed.pt"), str(out), config_pretrained=path)
    reward = HPSv21(pretrained=str(out), processor_pretrained=path)
    reward.configure_model()
    torch.testing.assert_close(reward(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)


# ---- ImageReward -------------------------------------------------------------------------------
def _image_reward_expected(blip_parts, images, prompts):
    model, head = blip_parts
    tok = tiny_bert_tokenizer()
    enc = tok(list(prompts), padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        img = model.vision_model(pixel_values=_ref_pixels(images, 32)).last_hidden_state
        txt = model.text_encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                 encoder_hidden_states=img,
                                 encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long))
        r = head(txt.last_hidden_state[:, 0]).squeeze(-1)
    return (r - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


def test_image_reward_from_converted_folder(blip_parts, blip_dir):
    images = _images(seed=6)
    reward = ImageReward(pretrained=blip_dir)
    reward.configure_model()
    assert not any(p.requires_grad for p in reward.parameters())
    torch.testing.assert_close(reward(images, PROMPTS), _image_reward_expected(blip_parts, images, PROMPTS),
                               atol=1e-5, rtol=1e-5)


def test_image_reward_from_original_checkpoint_layout(blip_parts, tmp_path):
    model, head = blip_parts
    original = transformers_to_image_reward_checkpoint(model.state_dict(), head.state_dict())
    assert "blip.visual_encoder.blocks.1.attn.qkv.weight" in original and "mlp.layers.7.bias" in original
    assert "blip.visual_encoder.cls_token" in original
    assert "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight" in original
    blip_back, head_back = image_reward_checkpoint_to_transformers(
        original | {"blip.text_encoder.embeddings.position_ids": torch.arange(64)[None]})
    assert set(blip_back) == set(model.state_dict()) - {k for k in model.state_dict() if k.startswith("itm_head.")}
    assert set(head_back) == set(head.state_dict())
    folder = tmp_path / "ImageReward"
    folder.mkdir()
    torch.save(original, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps({"num_attention_heads": 2, "hidden_act": "gelu",
                                                         "layer_norm_eps": 1e-12}))
    bert_dir = tmp_path / "bert"
    tiny_bert_tokenizer(with_blip_tokens=False).save_pretrained(bert_dir)  # [DEC]/[ENC] get added on load
    images = _images(seed=7)
    expected = _image_reward_expected(blip_parts, images, PROMPTS)
    reward = ImageReward(pretrained=str(folder), processor_pretrained=str(bert_dir))
    reward.configure_model()
    torch.testing.assert_close(reward(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    converted = tmp_path / "converted"
    convert_image_reward_checkpoint(str(folder / "ImageReward.pt"), str(converted), tokenizer_pretrained=str(bert_dir),
                                    med_config=str(folder / "med_config.json"))
    assert {"config.json", "model.safetensors", "mlp.safetensors"} <= set(os.listdir(converted))
    reward = ImageReward(pretrained=str(converted))
    reward.configure_model()
    torch.testing.assert_close(reward(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)


# ---- loading guards ----------------------------------------------------------------------------
def test_dummy_tokenizer_is_refused_with_the_path(clip_dir, tmp_path):
    from transformers import CLIPTokenizer

    path, _ = clip_dir
    bad = tmp_path / "dummy_tokenizer"
    CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[]).save_pretrained(bad)
    reward = PickScore(pretrained=path, processor_pretrained=str(bad))
    with pytest.raises(ValueError, match="dummy_tokenizer"):
        reward.configure_model()
    assert reward.model is None


def test_missing_sources_fail_in_init(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        PickScore(pretrained=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="hub cache"):
        ClipScore(pretrained="nobody-here/no-such-clip-model")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"")  # not empty: the processor is checked next
    with pytest.raises(FileNotFoundError, match="processor_pretrained"):
        HPSv21(pretrained=str(tmp_path / "weights"), processor_pretrained="nobody-here/no-tokenizer")


def test_model_follows_the_reward_device(clip_dir):
    path, _ = clip_dir
    reward = ClipScore(pretrained=path).to("meta")  # moved before configure_model
    reward.configure_model()
    assert {p.device.type for p in reward.model.parameters()} == {"meta"}


def test_repeated_prompts_are_encoded_once_with_the_same_scores(clip_dir):
    path, model = clip_dir
    reward = ClipScore(pretrained=path)
    reward.configure_model()
    images = _images(size=48, batch=5, seed=4)
    prompts = ["a cat", "the sea", "a cat", "a cat", "the sea"]  # a rollout's group-major layout
    calls = []
    orig = reward.model.get_text_features

    def spy(input_ids, attention_mask):
        calls.append(input_ids.shape[0])
        return orig(input_ids=input_ids, attention_mask=attention_mask)

    reward.model.get_text_features = spy
    got = reward(images, prompts)
    assert calls == [2]  # two distinct prompts
    expected = (100 * _clip_cosine(model, images, prompts)).clamp_min(0)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
