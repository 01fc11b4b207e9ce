"""``python -m pro_grpo_lightning predict``: images with fixed seeds from a checkpoint, an exported
LoRA folder or the base model, contact sheets, and a score table equal to the rewards of the images."""

import csv
import glob
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from pro_grpo_lightning.cli import main as cli_main
from pro_grpo_lightning.cli import run_main
from pro_grpo_lightning.evaluation import EvalItems, sample_items
from pro_grpo_lightning.predict import CAPTION_LINES, PredictionWriter, caption_tile
from pro_grpo_lightning.rewards.image_stats import Brightness, JpegCompressibility
from tests.cli_runs import CALLBACKS_WITH_EXPORT, config_args

OVERRIDE = """\
trainer:
  max_steps: 2
  num_sanity_val_steps: 0
""" + CALLBACKS_WITH_EXPORT + """\
model:
  eval_rewards:
    - class_path: pro_grpo_lightning.rewards.image_stats.JpegCompressibility
optimizer:
  class_path: torch.optim.SGD
  init_args: {{lr: 5.0}}
data:
  prompts_per_step: 2
  val_prompts: ["a red square", "a blue triangle", "a green circle"]
  eval_images_per_prompt: 2
  eval_batch_size: 4
"""
PROMPTS = ["a red square", "a blue triangle", "a green circle"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-rollout tiny SD1.5 run: checkpoint, exported LoRA, held-out evaluation table."""
    tmp = tmp_path_factory.mktemp("predict_run")
    args = config_args(tmp, "run", OVERRIDE)
    assert run_main(cli_main, ["fit", *args]) == 0
    ckpt = tmp / "ckpt" / "last.ckpt"
    (lora,) = glob.glob(str(tmp / "run" / "*" / "lora"))
    # fit's last validation (after step 2): the held-out evaluation of the checkpoint's weights
    (val_csv,) = glob.glob(str(tmp / "run" / "*" / "eval" / "val_step000002.csv"))
    return {"tmp": tmp, "args": args, "ckpt": str(ckpt), "lora": lora, "val_csv": val_csv}


def predict(run, out: Path, *extra: str) -> int:
    return run_main(cli_main, ["predict", *run["args"], "--prediction.output_dir", str(out), *extra])


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def pngs(out: Path) -> dict[str, np.ndarray]:
    """Every item PNG under ``out`` (not the contact sheets), by '<prompt folder>/<image>'."""
    return {f"{p.parent.name}/{p.name}": np.asarray(Image.open(p)) for p in sorted(out.glob("*/*.png"))}


@pytest.fixture(scope="module")
def ckpt_pred(run):
    """predict from the checkpoint, with another batch size than the evaluation's (4)."""
    out = run["tmp"] / "pred_ckpt"
    assert predict(run, out, "--ckpt_path", run["ckpt"], "--data.eval_batch_size", "5") == 0
    return out


def test_predict_from_checkpoint_writes_pngs_sheets_and_the_images_scores(ckpt_pred):
    out = ckpt_pred
    images = pngs(out)
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["000_a_red_square", "001_a_blue_triangle", "002_a_green_circle"]
    assert sorted(images) == [f"{f}/{j:02d}.png" for f in folders for j in range(2)]
    assert all(a.shape == (32, 32, 3) and a.dtype == np.uint8 for a in images.values())
    rows = read_csv(out / "scores.csv")
    # The sheets: every tile is its PNG upscaled 4x (nearest) to 128 px, captioned with its prompt and
    # the table's total score; a prompt's sheet is its tiles side by side, contact_sheet.png all rows.
    tiles = {f"{f}/{j:02d}.png": np.asarray(caption_tile(Image.fromarray(images[f"{f}/{j:02d}.png"]), r["prompt"],
                                                         f"total {float(r['total']):.3f}"))
             for f, (j, r) in zip([f for f in folders for _ in range(2)], [(int(r["image_index"]), r) for r in rows])}
    h = 128 + 8 + 18 * CAPTION_LINES
    for f in folders:
        sheet = np.asarray(Image.open(out / f"{f}.png"))
        assert sheet.shape == (h, 2 * 128, 3)
        np.testing.assert_array_equal(sheet, np.concatenate([tiles[f"{f}/00.png"], tiles[f"{f}/01.png"]], 1))
        np.testing.assert_array_equal(sheet[:128, :128], images[f"{f}/00.png"].repeat(4, 0).repeat(4, 1))
        assert (sheet[128:] < 128).any()  # dark caption text under the tiles
    full = np.asarray(Image.open(out / "contact_sheet.png"))
    assert full.shape == (3 * h, 2 * 128, 3)
    np.testing.assert_array_equal(full[h:2 * h, 128:], tiles[f"{folders[1]}/01.png"])
    # The table's JPEG scores, recomputed from the written PNGs (lossless: the same 8-bit pixels).
    items = [(p, j) for p in PROMPTS for j in range(2)]
    assert [(r["prompt"], int(r["image_index"])) for r in rows] == items
    pixels = torch.from_numpy(np.stack([images[f"{f}/{j:02d}.png"] for f in folders for j in range(2)]))
    recomputed = JpegCompressibility()(pixels.permute(0, 3, 1, 2).float() / 255, [p for p, _ in items])  # [6]
    assert [float(r["jpeg_compressibility"]) for r in rows] == pytest.approx(recomputed.tolist(), rel=1e-5)
    md = (out / "scores.md").read_text()
    assert "| a blue triangle |" in md and "(6 images, 3 prompts)" in md


def test_predict_images_are_the_held_out_evaluations(run, ckpt_pred):
    """Same checkpoint and seeds: predict's table equals the run's held-out evaluation table, though
    sampled in batches of 5 instead of 4."""
    ours, theirs = read_csv(ckpt_pred / "scores.csv"), read_csv(run["val_csv"])
    assert len(ours) == 6 and ours == theirs


def test_predict_in_python_returns_images_scored_as_written(run):
    """trainer.predict's images: Brightness recomputed on them is the table's column, exactly."""
    out = run["tmp"] / "pred_py"
    cli = cli_main([*run["args"], "--prediction.output_dir", str(out)], run=False)
    preds = cli.trainer.predict(cli.model, cli.datamodule, ckpt_path=run["ckpt"])
    images = torch.cat([p["images"] for p in preds])  # [6, 3, 32, 32]
    rows = read_csv(out / "scores.csv")
    prompts = [p for p in PROMPTS for _ in range(2)]
    assert [float(r["brightness"]) for r in rows] == pytest.approx(Brightness()(images, prompts).tolist(), rel=1e-5)
    written = torch.from_numpy(np.stack(list(pngs(out).values()))).permute(0, 3, 1, 2)  # [6, 3, 32, 32]
    torch.testing.assert_close(written, (images.clamp(0, 1) * 255).round().to(torch.uint8), rtol=0, atol=0)


def test_predict_from_base_model_is_the_reference_policy(run, ckpt_pred):
    """No ckpt_path: the adapter at init (B = 0), i.e. the base model with its adapter disabled;
    here on prompts of its own (``data.predict_prompts``), 3 images each."""
    out = run["tmp"] / "pred_base"
    assert predict(run, out, "--data.predict_prompts", '["a cat", "a dog"]',
                   "--data.predict_images_per_prompt", "3") == 0
    images = pngs(out)
    assert sorted(images) == [f"{f}/{j:02d}.png" for f in ("000_a_cat", "001_a_dog") for j in range(3)]
    assert len(read_csv(out / "scores.csv")) == 6
    cli = cli_main([*run["args"], "--data.predict_images_per_prompt", "3"], run=False)
    module = cli.model
    module.configure_model()
    items = EvalItems(["a cat", "a dog"], 3, cli.datamodule.eval_seed)  # the evaluation's seeds
    with module.backend.reference():
        reference = sample_items(module.backend, [items[k]["prompt"] for k in range(6)],
                                 [items[k]["seed"] for k in range(6)])  # [6, 3, H, W]
    written = torch.from_numpy(np.stack(list(images.values()))).permute(0, 3, 1, 2)  # [6, 3, H, W]
    torch.testing.assert_close(written, (reference.clamp(0, 1) * 255).round().to(torch.uint8), rtol=0, atol=0)


def test_predict_from_exported_lora_equals_checkpoint(run, ckpt_pred):
    from safetensors.torch import load_file

    lora = load_file(str(Path(run["lora"]) / "pytorch_lora_weights.safetensors"))
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 0  # it trained: not a no-op
    out = run["tmp"] / "pred_lora"
    assert predict(run, out, "--prediction.lora_path", run["lora"]) == 0
    a, b = pngs(ckpt_pred), pngs(out)
    assert a.keys() == b.keys() and len(a) == 6
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert read_csv(ckpt_pred / "scores.csv") == read_csv(out / "scores.csv")


def test_predict_writes_beside_its_checkpoint_and_says_where(run, capsys):
    """No output_dir: ``<run>/predict/<checkpoint name>``, printed; no logger version is created."""
    versions = sorted(p.name for p in (run["tmp"] / "run").iterdir())
    capsys.readouterr()
    assert run_main(cli_main, ["predict", *run["args"], "--ckpt_path", run["ckpt"]]) == 0
    out = run["tmp"] / "predict" / "last"  # the checkpoint is <tmp>/ckpt/last.ckpt
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == (f"predict: 6 images of 3 prompts from checkpoint {run['ckpt']} (step 2): PNGs, "
                           f"contact_sheet.png and scores.csv / scores.md in {out}")
    assert sorted(p.name for p in (run["tmp"] / "run").iterdir()) == versions  # no new logger version
    assert (out / "contact_sheet.png").is_file() and len(read_csv(out / "scores.csv")) == 6
    # again: the folder is not empty, refused before any weights load; nothing replaced
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert run_main(cli_main, ["predict", *run["args"], "--ckpt_path", run["ckpt"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: prediction.output_dir={str(out)!r}: not empty"), err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert run_main(cli_main, ["predict", *run["args"], "--ckpt_path", run["ckpt"], "--prediction.overwrite",
                               "true"]) == 0  # asked to


def test_exports_carry_a_model_card_and_digests(run):
    import hashlib
    import os

    lora = Path(run["lora"])
    card = (lora / "README.md").read_text()
    for line in ("# LoRA trained with Pro-GRPO", "- **Rollouts trained**: 2",
                 "- **Fine-tuning**: LoRA rank 4, alpha 4",
                 "Brightness (`pro_grpo_lightning.rewards.image_stats.Brightness`, weight 1.0)",
                 "| step | total | brightness | jpeg_compressibility |", "## The run's config", "load_lora_weights"):
        assert line in card, line
    import re

    assert re.search(r"\(optimizer steps \d+ and 2\):", card), card  # the last evaluation: the exported weights'
    last = [ln for ln in card.splitlines() if ln.startswith("| 2 |")]
    val = read_csv(run["val_csv"])  # the run's own held-out table at step 2: the card's row is its means
    assert len(last) == 1 and float(last[0].split("|")[2]) == pytest.approx(
        sum(float(r["total"]) for r in val) / len(val), abs=6e-5)
    sums = (lora / "SHA256SUMS").read_text().split()
    assert sums[1] == "pytorch_lora_weights.safetensors"
    assert sums[0] == hashlib.sha256((lora / sums[1]).read_bytes()).hexdigest()
    mask = os.umask(0)
    os.umask(mask)
    for p in lora.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p  # not 0600


class Loads:
    """Counts base-weight loads of the tiny SD1.5 backend."""

    def __init__(self, monkeypatch):
        from pro_grpo_lightning.backends.sd15 import TinySD15Backend

        self.calls, original = 0, TinySD15Backend.configure_model

        def counted(backend):
            self.calls += backend.unet is None
            return original(backend)
        monkeypatch.setattr(TinySD15Backend, "configure_model", counted)


def test_damaged_or_disguised_lora_folders_are_refused_before_weights_load(run, tmp_path, capsys, monkeypatch):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(run["lora"], damaged)
    data = bytearray((damaged / "pytorch_lora_weights.safetensors").read_bytes())
    data[-3] ^= 0x40  # one flipped bit in the last tensor's bytes
    (damaged / "pytorch_lora_weights.safetensors").write_bytes(bytes(data))
    disguised = tmp_path / "disguised"
    disguised.mkdir()
    torch.save({"w": torch.zeros(2)}, disguised / "pytorch_lora_weights.safetensors")  # a pickle
    loads = Loads(monkeypatch)
    for folder, message in [(damaged, "corrupted: pytorch_lora_weights.safetensors does not match its SHA-256 in "
                                      "SHA256SUMS"),
                            (disguised, "is not a safetensors file")]:
        capsys.readouterr()
        assert predict(run, tmp_path / "out", "--prediction.lora_path", str(folder)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(folder) in err[0] and message in err[0], err
    assert loads.calls == 0 and not (tmp_path / "out").exists()


def test_predict_refuses_bad_inputs_with_one_line(run, tmp_path, capsys):
    out = tmp_path / "x"
    cases = [
        (["--prediction.lora_path", str(tmp_path)], "no pytorch_lora_weights.safetensors there"),
        (["--prediction.lora_path", run["lora"], "--model.backend.init_args.lora.rank", "8"],
         "lora.rank=4 but this run has lora.rank=8"),
        (["--prediction.lora_path", run["lora"], "--ckpt_path", run["ckpt"]], "both give the weights"),
        (["--data.val_prompts", "null"], "`predict` needs prompts: set data.predict_prompts"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert predict(run, out, *extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)


def test_prediction_writer_is_a_lightning_prediction_writer():
    from pro_grpo_lightning import export, predict

    assert isinstance(PredictionWriter(), BasePredictionWriter)
    assert predict.LORA_WEIGHT_NAME is export.LORA_WEIGHT_NAME  # one name (loading.py): the file predict reads is the one export writes
