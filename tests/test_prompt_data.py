"""Prompt sets with metadata: the file formats, the one-line refusals, metadata riding with each
prompt through the rollout (pruning included) to every reward and into evaluation tables, the
shapes task's metadata, and a Flow-GRPO GenEval-format ``.jsonl`` trained through the CLI."""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Sequence

import pytest
import torch

from pro_grpo_lightning.cli import main
from pro_grpo_lightning.data import PromptBatch, PromptDataModule, load_prompt_set
from pro_grpo_lightning.rewards.base import Reward
from pro_grpo_lightning.rewards.combine import RewardSet
from pro_grpo_lightning.rewards.shapes import ShapesReward
from pro_grpo_lightning.rollout import ExpandPruneRollout
from pro_grpo_lightning.schedules import ProGRPOSchedule
from pro_grpo_lightning.tasks.shapes import ShapeSpec, render_shapes, shapes_prompts
from tests.cli_runs import config_args
from tests.fakes import AffineBackend, MeanPixel
from tests.remote_rewards import ExpectsMetadata

pytestmark = pytest.mark.usefixtures("one_thread")

# Flow-GRPO's dataset/geneval/{train,test}_metadata.jsonl, line for line in its format (GenEval's
# evaluation metadata: tag, include [{class, count, color?, position?}], exclude?, prompt).
GENEVAL = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "two_object", "include": [{"class": "toilet", "count": 1}, {"class": "bicycle", "count": 1}],
     "prompt": "a photo of a toilet and a bicycle"},
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
     "prompt": "a photo of two clocks"},
    {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}], "prompt": "a photo of a red cup"},
    {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a cat right of a dog"},
    {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "blue"},
                                      {"class": "horse", "count": 1, "color": "white"}],
     "prompt": "a photo of a blue car and a white horse"},
]


def write_geneval(path) -> None:
    path.write_text("".join(json.dumps(d) + "\n" for d in GENEVAL), encoding="utf-8")


def meta_of(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "prompt"}


def test_geneval_metadata_jsonl_loads_as_is(tmp_path):
    path = tmp_path / "train_metadata.jsonl"
    write_geneval(path)
    prompts, metadata = load_prompt_set(str(path))
    assert prompts == [d["prompt"] for d in GENEVAL]
    assert metadata == [meta_of(d) for d in GENEVAL]
    assert metadata[4]["include"][1]["position"] == ["right of", 0]


def test_txt_json_csv_and_lists(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n", encoding="utf-8")
    assert load_prompt_set(str(tmp_path / "p.txt")) == (["a cat", "a dog"], None)
    (tmp_path / "p.json").write_text(json.dumps(["a cat", {"prompt": "a sign that says \"hi\"", "text": "hi"}]))
    assert load_prompt_set(str(tmp_path / "p.json")) == (["a cat", 'a sign that says "hi"'], [{}, {"text": "hi"}])
    (tmp_path / "p.csv").write_text('prompt,text,lang\na cat,,\n"a sign, red",STOP,en\n', encoding="utf-8")
    assert load_prompt_set(str(tmp_path / "p.csv")) == (["a cat", "a sign, red"], [{}, {"text": "STOP", "lang": "en"}])
    # a jsonl of prompts alone (Flow-GRPO's plain sets) has no metadata
    (tmp_path / "plain.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert load_prompt_set(str(tmp_path / "plain.jsonl")) == (["a", "b"], None)
    assert load_prompt_set(["x", {"prompt": "y", "k": 1}]) == (["x", "y"], [{}, {"k": 1}])


@pytest.mark.parametrize("name, content, expected", [
    ("set.parquet", b"PAR1", "prompts file '{p}': unsupported format '.parquet'; accepted: .txt"),
    ("noext", b"a cat\n", "prompts file '{p}': unsupported format '(no extension)'"),
    ("latin.txt", "caf\xe9\n".encode("latin-1"), "prompts file '{p}' is not UTF-8 text"),
    ("bad.jsonl", b'{"prompt": "a"}\n{"tag": "x"}\n', "{p}:2: expected an object with a string 'prompt' field, got keys ['tag']"),
    ("broken.jsonl", b'{"prompt": "a"}\n\n{"prompt": \n', "{p}:3: not valid JSON"),
    ("obj.json", b'{"prompt": "a"}', "{p}: expected a JSON list of prompts or objects, got dict"),
    ("nohead.csv", b"text\nhi\n", "{p}: expected a header with a 'prompt' column, got ['text']"),
])
def test_bad_files_are_refused_in_one_line(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_prompt_set(str(path))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(expected.format(p=path)), msg


def test_unknown_format_is_refused_by_the_cli_before_any_model_loads(tmp_path):
    path = tmp_path / "prompts.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"unsupported format '\.parquet'; accepted: \.txt .*\.jsonl .*\.json .*\.csv"):
        main([*config_args(tmp_path, "fmt", "data:\n  prompts: \"{path}\"\n", path=path.as_posix())],
             run=False, save_config=False)


class Recorder(Reward):
    """Mean pixel; records what each call received."""

    default_name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[list[str], list[dict] | None]] = []

    def score(self, images, prompts: Sequence[str], metadata=None):
        self.calls.append((list(prompts), metadata))
        return images.mean((1, 2, 3))  # [B]


def test_metadata_follows_each_row_through_pruning():
    prompts = ["a cat", "two dogs", "a red square"]
    metadata = [{"id": 0, "tag": "x"}, {"id": 1}, {"id": 2, "include": [{"class": "square"}]}]
    backend = AffineBackend(num_steps=6)
    backend.configure_model()
    recorder, legacy = Recorder(), MeanPixel()  # MeanPixel.score has no metadata parameter
    rollout = ExpandPruneRollout(backend, RewardSet([recorder, legacy]), ProGRPOSchedule(8, [1, 3], [5, 3]))
    res = rollout.run(prompts, torch.Generator().manual_seed(0), metadata=metadata)
    sizes = [len(p) for p, _ in recorder.calls]
    assert sizes == [3 * 8, 3 * 5, 3 * 3]  # two previews (before each prune), then the survivors
    for texts, meta in recorder.calls:  # every row carries its own prompt's metadata
        assert meta == [metadata[prompts.index(t)] for t in texts]
    assert res.metadata == metadata
    assert [metadata[i] for i in res.prompt_index.tolist()] == recorder.calls[-1][1]
    # without metadata: None reaches the reward, and the rollout is unchanged
    recorder.calls.clear()
    plain = rollout.run(prompts, torch.Generator().manual_seed(0))
    assert all(meta is None for _, meta in recorder.calls) and plain.metadata is None
    assert torch.equal(plain.rewards, res.rewards)


def test_reward_metadata_length_is_checked():
    with pytest.raises(ValueError, match="recorder: 2 images but 1 metadata entries"):
        Recorder()(torch.zeros(2, 3, 2, 2), ["a", "b"], [{}])


def test_training_batches_carry_their_prompts_metadata(tmp_path):
    path = tmp_path / "train_metadata.jsonl"
    write_geneval(path)
    dm = PromptDataModule(str(path), prompts_per_step=2, seed=3)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and all(isinstance(b, PromptBatch) for b in batches)
    by_prompt = {d["prompt"]: meta_of(d) for d in GENEVAL}
    assert sorted(p for b in batches for p in b.prompts) == sorted(by_prompt)
    for b in batches:
        assert b.metadata == [by_prompt[p] for p in b.prompts]
    assert list(PromptDataModule("colors", 2).train_dataloader())[0].metadata is None


def test_shapes_prompts_carry_their_attributes_and_the_reward_uses_them():
    dm = PromptDataModule("shapes", 2, val_prompts="shapes_heldout")
    for prompts, metadata in ((dm.prompts, dm.metadata), (dm.val_prompts, dm.val_metadata)):
        assert [ShapeSpec(**m) for m in metadata] == [ShapeSpec.parse(p) for p in prompts]
    reward = ShapesReward()
    truth = [ShapeSpec(2, "red", "circle", "left"), ShapeSpec(1, "blue", "square", "top")]
    images = render_shapes(truth, 32, seed=0)
    other = ["three green triangles on the right", "two yellow circles at the bottom"]
    # metadata wins over the text: the images match their metadata, not the prompts
    assert torch.equal(reward(images, other, [s.metadata() for s in truth]), torch.ones(2))
    assert (reward(images, other) < 0.5).all()  # without metadata the text is parsed
    assert torch.equal(reward(images, [s.prompt for s in truth]), torch.ones(2))


def test_unparseable_shapes_prompt_is_refused_in_one_line():
    reward = ShapesReward()
    reward.validate_prompts(shapes_prompts("train", 8), None)
    reward.validate_prompts(["anything"], [ShapeSpec(1, "red", "square", "left").metadata()])  # metadata suffices
    with pytest.raises(ValueError, match=r"^reward 'shapes', prompt 1: not a shapes prompt: 'a cat'"):
        reward.validate_prompts(["a red square on the left", "a cat"], None)
    with pytest.raises(ValueError, match=r"^reward 'shapes', prompt 0: prompt 'x': metadata .*colour must be one of"):
        reward.validate_prompts(["x"], [{"count": 1, "colour": "mauve", "shape": "square", "position": "left"}])


SHAPES_REWARD = """\
model:
  rewards:
    - class_path: pro_grpo_lightning.rewards.shapes.ShapesReward
data:
  prompts: colors
  prompts_per_step: 2
"""


def test_fit_refuses_prompts_the_shapes_reward_cannot_score_before_weights_load(tmp_path, monkeypatch):
    from pro_grpo_lightning.backends.sd15 import TinySD15Backend

    def no_weights(self):
        raise AssertionError("weights loaded before the prompts were checked")

    monkeypatch.setattr(TinySD15Backend, "configure_model", no_weights)
    with pytest.raises(ValueError, match=r"^data\.prompts: reward 'shapes', prompt \d+: not a shapes prompt: 'a "):
        main(["fit", *config_args(tmp_path, "shapes", SHAPES_REWARD)])


GENEVAL_RUN = """\
trainer:
  max_steps: 2
  num_sanity_val_steps: 0
  val_check_interval: 2
model:
  rewards:
    - class_path: tests.remote_rewards.ExpectsMetadata
      init_args: {{expected: "{path}"}}
data:
  prompts: "{path}"
  val_prompts: "{path}"
  prompts_per_step: 2
  eval_images_per_prompt: 1
"""


@pytest.mark.slow
def test_geneval_jsonl_trains_through_the_cli_with_its_metadata(tmp_path):
    path = tmp_path / "train_metadata.jsonl"
    write_geneval(path)
    ExpectsMetadata.calls, ExpectsMetadata.seen = 0, set()
    main(["fit", *config_args(tmp_path, "geneval", GENEVAL_RUN, path=path.as_posix())])
    # 2 rollouts x (1 preview + 1 final) calls, then the held-out evaluation's batch
    assert ExpectsMetadata.calls == 5 and ExpectsMetadata.seen == {d["prompt"] for d in GENEVAL}
    (table,) = glob.glob(str(tmp_path / "run" / "*" / "eval" / "val_step000002.csv"))
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt"] for r in rows] == [d["prompt"] for d in GENEVAL]
    assert [json.loads(r["metadata"]) for r in rows] == [meta_of(d) for d in GENEVAL]
