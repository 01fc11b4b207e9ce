"""The pieces ``ProGRPOModule``'s hooks call, each without a Trainer: the non-finite advantage glue
(health.py), the checkpoint record and identity checks (checkpointing.py), the end-of-run rule
(evaluation.py) and the sample-grid cadence (logs.py)."""

from __future__ import annotations

import statistics
from types import SimpleNamespace

import pytest
import torch

from pro_grpo_lightning.checkpointing import check_identity, pack_checkpoint, unpack_checkpoint
from pro_grpo_lightning.errors import ConfigError
from pro_grpo_lightning.evaluation import final_batch
from pro_grpo_lightning.health import NonFiniteError, finite_advantages
from pro_grpo_lightning.logs import SampleSettings
from pro_grpo_lightning.objectives import AdvantageSettings

NAN, INF = float("nan"), float("inf")


# ---- health.finite_advantages ----------------------------------------------------------------------
class TwoRanks:
    """A Lightning strategy's collectives as seen from rank 0 of 2; ``other`` is rank 1's rewards."""

    world_size = 2

    def __init__(self, other: torch.Tensor, other_valid: int) -> None:
        self.other, self.other_valid = other, other_valid

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.stack([t, self.other])  # [W, P, K]

    def reduce(self, t: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "sum"
        return t + self.other_valid


def test_global_std_spans_both_ranks_and_valid_counts_are_summed():
    mine = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    other = torch.tensor([[0.0, 4.0], [2.0, 2.0]])
    adv = finite_advantages(mine, AdvantageSettings(std="global", eps=0.0, clip=None), TwoRanks(other, 4))
    std = statistics.pstdev([1, 2, 3, 5, 0, 4, 2, 2])  # every rank's rewards
    torch.testing.assert_close(adv.advantages, torch.tensor([[-0.5, 0.5], [-1.0, 1.0]]) / std)
    assert adv.n_valid == 8.0
    assert adv.update_mask(world_size=2) is None  # all valid


def test_nonfinite_rewards_are_masked_and_reported():
    r = torch.tensor([[1.0, NAN, 3.0], [NAN, INF, 2.0]])  # group 1 keeps one finite reward: masked whole
    adv = finite_advantages(r, AdvantageSettings(eps=0.0, clip=None))
    torch.testing.assert_close(adv.advantages, torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    assert adv.n_valid == 2.0
    assert adv.update_mask(world_size=1).tolist() == [True, False, True, False, False, False]
    assert adv.update_mask(world_size=2) is None  # DDP: every rank runs the same backward passes
    result = SimpleNamespace(rewards=r, num_steps=4, checkpoints=[
        SimpleNamespace(step=1, scores=torch.tensor([[NAN, 1.0, INF, 0.0]])),  # a preview: 2 non-finite
        SimpleNamespace(step=4, scores=torch.tensor([[NAN]]))])  # the final selection is no preview
    bad, health = adv.report(result, steps=2.0, skipped=1.0)
    assert not bad and health == {"health/nonfinite_rewards": 3.0, "health/nonfinite_previews": 2.0,
                                  "health/masked_trajectories": 4.0, "health/skipped_updates": 1.0,
                                  "health/flat_groups": 0.0, "health/unrepresentable_groups": 0.0}
    assert adv.report(result, steps=2.0, skipped=2.0)[0]  # every optimizer step skipped: bad
    nothing = finite_advantages(torch.full((2, 3), NAN), AdvantageSettings())
    bad, health = nothing.report(result, steps=0.0, skipped=0.0)
    assert bad and nothing.n_valid == 0 and health["health/skipped_updates"] == 1.0


# ---- checkpointing: record, identity --------------------------------------------------------------
class Owner(torch.nn.Module):
    """What ``pack_checkpoint`` / ``unpack_checkpoint`` read of a module: a trainable adapter, a
    frozen base, reward statistics, counters and an identity."""

    def __init__(self) -> None:
        super().__init__()
        self.adapter = torch.nn.Linear(2, 2)
        self.base = torch.nn.Linear(2, 2).requires_grad_(False)
        self.rewards = torch.nn.Module()
        self.rewards.register_buffer("mean", torch.zeros(1))
        self.rollouts_done, self.seed, self.schedule, self.run_config = 7, 3, "plain G=4", None
        self.checked: list = []
        self.loads = 0

    def run_identity(self) -> dict:
        return {"backend": "Tiny"}

    def check_identity(self, saved: dict, path: str, resume: bool = True) -> None:
        self.checked.append((saved, path, resume))

    def configure_model(self) -> None:
        self.loads += 1


def test_checkpoint_keeps_what_training_changes_and_restores_the_counters():
    owner = Owner()
    ckpt = {"state_dict": {f"{k}": v for k, v in owner.state_dict().items()}, "global_step": 12}
    pack_checkpoint(owner, ckpt)
    assert sorted(ckpt["state_dict"]) == ["adapter.bias", "adapter.weight", "rewards.mean"]
    assert ckpt["pro_grpo"] == {"rollouts_done": 7, "seed": 3, "rng": "per-rollout (seed, rollout index)",
                                "schedule": "'plain G=4'", "identity": {"backend": "Tiny"}, "held_out": {}}
    assert unpack_checkpoint(Owner(), ckpt, resume=True) == (7, 12)
    fresh = Owner()
    unpack_checkpoint(fresh, ckpt, resume=False)
    assert fresh.checked == [({"backend": "Tiny"}, "checkpoint", False)] and fresh.loads == 1
    del ckpt["state_dict"]["adapter.bias"]
    with pytest.raises(KeyError, match="lacks 1 adapter weights of this model \\(e.g. adapter.bias\\)"):
        unpack_checkpoint(Owner(), ckpt, resume=True)
    ckpt["state_dict"]["adapter.weight"] = torch.full((2, 2), NAN)
    with pytest.raises(NonFiniteError, match="checkpoint load: tensor 'adapter.weight' has 4 non-finite"):
        unpack_checkpoint(Owner(), ckpt, resume=True)
    with pytest.raises(NonFiniteError, match="checkpoint save"):
        pack_checkpoint(owner, {"state_dict": {"adapter.weight": torch.full((2, 2), INF)}})


def test_identity_checks_name_both_values_and_resume_checks_more():
    mine = {"backend": "A", "finetune": "lora", "lora.rank": 4, "lora.alpha": 4.0, "lora.target_modules": None,
            "schedule": "G=8", "optimizer": "torch.optim.AdamW"}
    check_identity({**mine, "schedule": "G=4", "optimizer": "SGD"}, mine, "ckpt", resume=False)  # export: fine
    check_identity({"backend": "A"}, mine, "ckpt")  # fields an older checkpoint lacks are not compared
    with pytest.raises(ConfigError, match=r"^ckpt: has lora.rank=8 but this run has lora.rank=4$"):
        check_identity({**mine, "lora.rank": 8}, mine, "ckpt", resume=False)
    with pytest.raises(ConfigError, match="has schedule='G=4' but this run has schedule='G=8' .*allow_schedule"):
        check_identity({**mine, "schedule": "G=4"}, mine, "ckpt")
    check_identity({**mine, "schedule": "G=4"}, mine, "ckpt", allow_schedule_change=True)
    with pytest.raises(ConfigError, match="has optimizer='SGD'"):
        check_identity({**mine, "optimizer": "SGD"}, mine, "ckpt", allow_schedule_change=True)


# ---- evaluation.final_batch, logs.SampleSettings.due ----------------------------------------------
def trainer(max_steps=-1, global_step=0, max_epochs=None, current_epoch=0, num_training_batches=5):
    return SimpleNamespace(max_steps=max_steps, global_step=global_step, max_epochs=max_epochs,
                           current_epoch=current_epoch, num_training_batches=num_training_batches)


@pytest.mark.parametrize("t, batch_idx, last", [
    (trainer(max_steps=6, global_step=5), 0, False), (trainer(max_steps=6, global_step=6), 0, True),
    (trainer(max_epochs=2, current_epoch=1), 3, False), (trainer(max_epochs=2, current_epoch=1), 4, True),
    (trainer(max_epochs=2, current_epoch=0), 4, False), (trainer(max_epochs=-1), 4, False),
])
def test_final_batch(t, batch_idx, last):
    assert final_batch(t, batch_idx) is last


def test_sample_grid_cadence():
    assert [r for r in range(7) if SampleSettings(every_n_rollouts=3).due(r)] == [0, 3, 6]
    assert not any(SampleSettings().due(r) for r in range(5))
