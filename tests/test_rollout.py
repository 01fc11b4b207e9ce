"""The expand-and-prune rollout on a transparent backend: every stored value is re-derived."""

import pytest
import torch

from pro_grpo_lightning.rewards.combine import RewardSet
from pro_grpo_lightning.rollout import ExpandPruneRollout, RolloutSettings, group_centred_corr, proxy_reward_correlation
from pro_grpo_lightning.schedules import PlainGRPOSchedule, ProGRPOSchedule, StaticOVFSchedule
from pro_grpo_lightning.selection import ovf_indices
from tests.fakes import AffineBackend, MeanPixel

PROMPTS = ["a cat", "two dogs", "a red square"]


def make(schedule, T=6):
    backend = AffineBackend(num_steps=T)
    backend.configure_model()
    return backend, ExpandPruneRollout(backend, RewardSet([MeanPixel()]), schedule)


def rescore(backend, result, n, t):
    """Re-run step t of survivor n from its stored latents: (log_prob, x0)."""
    cond = {k: v[result.prompt_index[n : n + 1]] for k, v in result.cond.items()}
    out = backend.step(result.latents[n : n + 1, t], torch.tensor([t]), cond,
                       next_latents=result.latents[n : n + 1, t + 1])
    return out.log_prob[0], out.x0


def test_pruned_rollout_keeps_consistent_trajectories():
    sched = ProGRPOSchedule(8, [1, 3], [5, 3])
    backend, rollout = make(sched)
    res = rollout.run(PROMPTS, torch.Generator().manual_seed(0))
    P, K, T = 3, 3, 6
    assert res.latents.shape == (P * K, T + 1, 2) and res.log_probs.shape == (P * K, T)
    assert res.rewards.shape == (P, K) and res.images.shape == (P * K, 3, 2, 2)
    # the denoiser ran on physically smaller batches after each checkpoint
    assert backend.call_sizes == [P * s for s in sched.group_sizes_per_step(T)]
    assert res.nfe == P * sched.nfe_per_prompt(T) and res.nfe_full == P * 8 * T
    assert res.num_previews == P * 8 + P * 5
    # every survivor's stored chain re-scores to its stored log-probs (lineage, prompts, steps)
    for n in range(P * K):
        for t in range(T):
            lp, _ = rescore(backend, res, n, t)
            torch.testing.assert_close(lp, res.log_probs[n, t], rtol=0, atol=1e-6)
    # final rewards are the reward of the survivors' final latents
    expected = torch.sigmoid(res.latents[:, T, 0]).view(P, K)
    torch.testing.assert_close(res.rewards, expected)


def test_selection_is_ovf_on_preview_scores_and_survivor_positions_match():
    sched = ProGRPOSchedule(8, [1, 3], [5, 3])
    backend, rollout = make(sched)
    res = rollout.run(PROMPTS, torch.Generator().manual_seed(1))
    P, K = 3, 3
    for ck in res.checkpoints:
        assert torch.equal(ck.kept, ovf_indices(ck.scores, ck.kept.shape[1]))
        # the proxy score recorded for each survivor is the reward of its own x0 preview
        prompt = torch.arange(P).repeat_interleave(K)
        recorded = ck.scores[prompt, ck.survivors]  # [P*K]
        for n in range(P * K):
            _, x0 = rescore(backend, res, n, ck.step)
            torch.testing.assert_close(recorded[n], torch.sigmoid(x0[0, 0]), rtol=0, atol=1e-6)


def test_survivors_have_the_largest_preview_spread_available():
    sched = ProGRPOSchedule(8, [2], [3])
    _, rollout = make(sched)
    res = rollout.run(PROMPTS, torch.Generator().manual_seed(2))
    ck = res.checkpoints[0]
    kept_var = ck.scores.gather(1, ck.kept).var(1, unbiased=False)
    # brute force over all 3-subsets of 8
    import itertools
    best = torch.stack([torch.stack([ck.scores[p, list(c)].var(unbiased=False)
                                     for c in itertools.combinations(range(8), 3)]).max() for p in range(3)])
    torch.testing.assert_close(kept_var, best)


def test_plain_grpo_and_static_ovf_are_the_same_object():
    backend, rollout = make(PlainGRPOSchedule(4))
    res = rollout.run(PROMPTS, torch.Generator().manual_seed(3))
    assert res.checkpoints == [] and res.rewards.shape == (3, 4) and res.nfe == res.nfe_full == 3 * 4 * 6
    assert backend.call_sizes == [12] * 6

    backend, rollout = make(StaticOVFSchedule(6, 3))
    res = rollout.run(PROMPTS, torch.Generator().manual_seed(3))
    assert res.nfe == 3 * 6 * 6 and res.rewards.shape == (3, 3)
    (ck,) = res.checkpoints
    assert ck.step == 6 and torch.equal(ck.kept, ovf_indices(ck.scores, 3))
    torch.testing.assert_close(res.rewards, ck.scores.gather(1, ck.kept))
    torch.testing.assert_close(res.rewards.flatten(), torch.sigmoid(res.latents[:, -1, 0]))


def test_same_seed_same_rollout_and_rule_none_needs_no_previews():
    _, rollout = make(ProGRPOSchedule(6, [2], [3], rule="none"))
    a = rollout.run(PROMPTS, torch.Generator().manual_seed(4))
    b = rollout.run(PROMPTS, torch.Generator().manual_seed(4))
    assert torch.equal(a.latents, b.latents) and a.num_previews == 0
    assert torch.equal(a.checkpoints[0].kept, torch.arange(3).expand(3, 3))


def test_audit_mode_trains_on_the_same_selection_and_measures_overlap():
    sched = ProGRPOSchedule(8, [1, 3], [5, 3])
    backend, rollout = make(sched)
    res = rollout.run(PROMPTS, torch.Generator().manual_seed(5), audit=True)
    assert backend.call_sizes == [24] * 6 and res.nfe == res.nfe_full
    assert res.rewards.shape == (3, 3)
    for n in range(9):
        for t in range(6):
            lp, _ = rescore(backend, res, n, t)
            torch.testing.assert_close(lp, res.log_probs[n, t], rtol=0, atol=1e-6)
    ov = res.audit["overlap"]
    assert 0.0 <= float(ov) <= 1.0 and (float(ov) * 9) == pytest.approx(round(float(ov) * 9))


def test_audit_correlates_previews_with_final_rewards_over_the_whole_group():
    sched = ProGRPOSchedule(8, [1, 3], [5, 3])
    _, rollout = make(sched)
    calls = []
    score = rollout.rewards.__call__

    def recording(images, texts, *args, **kw):  # every scoring call: previews at 1 and 3, then the finals
        out = score(images, texts, *args, **kw)
        calls.append(out[0].clone())
        return out
    rollout.rewards = recording
    res = rollout.run(PROMPTS, torch.Generator().manual_seed(5), audit=True)
    assert [c.numel() for c in calls] == [24, 24, 24]  # audit: every row previewed at both checkpoints
    assert res.num_previews == 48
    final = calls[-1].view(3, 8)
    for i in range(2):
        proxy = calls[i].view(3, 8)
        a, b = proxy - proxy.mean(1, keepdim=True), final - final.mean(1, keepdim=True)
        torch.testing.assert_close(res.audit[f"proxy_corr_full_{i}"], (a * b).sum() / (a.norm() * b.norm()))
    # selection still ran on the live rows' previews: checkpoint 1 scored checkpoint 0's 5 survivors
    kept0 = res.checkpoints[0].kept  # [3, 5]
    torch.testing.assert_close(res.checkpoints[1].scores, calls[1].view(3, 8).gather(1, kept0))
    # the survivors-only figure is a different number (survivors are chosen for their proxy spread)
    assert not torch.isclose(proxy_reward_correlation(res)[0], res.audit["proxy_corr_full_0"])


def test_group_centred_corr_by_hand():
    proxy = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    true = torch.tensor([[0.0, 1.0, 5.0], [1.0, 2.0, 3.0]])
    # group 2's proxy is constant: it adds 0 to the numerator and to the proxy's norm
    a, b = torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([-2.0, -1.0, 3.0, -1.0, 0.0, 1.0])
    expected = (a @ b[:3]) / (a.norm() * b.norm())
    torch.testing.assert_close(group_centred_corr(proxy, true), expected)
    assert float(group_centred_corr(torch.ones(2, 3), true)) == 0.0


def test_proxy_correlation_matches_a_hand_computation():
    _, rollout = make(ProGRPOSchedule(8, [4], [4]))
    res = rollout.run(PROMPTS, torch.Generator().manual_seed(6))
    (ck,) = res.checkpoints
    prompt = torch.arange(3).repeat_interleave(4)
    # proxy = 2 * true + a per-group offset: perfectly rank-faithful within groups -> 1
    ck.scores[prompt, ck.survivors] = (2 * res.rewards + torch.arange(3.0)[:, None]).flatten()
    (c,) = proxy_reward_correlation(res)
    torch.testing.assert_close(c, torch.tensor(1.0))
    ck.scores[prompt, ck.survivors] = -res.rewards.flatten()
    (c,) = proxy_reward_correlation(res)
    torch.testing.assert_close(c, torch.tensor(-1.0))
    # a generic case against a direct formula on group-centred values
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    ck.scores[prompt, ck.survivors] = noise.flatten()
    a = noise - noise.mean(1, keepdim=True)
    b = res.rewards - res.rewards.mean(1, keepdim=True)
    (c,) = proxy_reward_correlation(res)
    torch.testing.assert_close(c, (a * b).sum() / (a.norm() * b.norm()))


def test_preview_scale_decodes_smaller_previews_only():
    from tests.fakes import AffineBackend as _B

    class Spatial(_B):  # 4-d latents so the preview can be resized
        def initial_latents(self, batch_size, generator=None):
            return torch.randn(batch_size, 2, 4, 4, generator=generator)

        def step(self, latents, step_index, cond, *, noise=None, next_latents=None, generator=None):
            flat = latents.flatten(2).mean(2)  # [B, 2]
            out = super().step(flat, step_index, cond, noise=None if noise is None else noise.flatten(2).mean(2))
            nxt = 0.9 * latents + 0.1 * noise if next_latents is None else next_latents
            return type(out)(nxt, out.log_prob, latents, out.std, latents, latents)

        def decode(self, latents):
            self.decoded.append(tuple(latents.shape))
            return torch.sigmoid(latents[:, :1]).expand(-1, 3, -1, -1)

    b = Spatial(num_steps=4)
    b.configure_model()
    b.decoded = []
    with pytest.raises(ValueError, match="preview_scale"):
        RolloutSettings(preview_scale=0)
    r = ExpandPruneRollout(b, RewardSet([MeanPixel()]), ProGRPOSchedule(6, [1], [3]), RolloutSettings(preview_scale=0.5))
    res = r.run(PROMPTS, torch.Generator().manual_seed(0))
    assert b.decoded == [(18, 2, 2, 2), (9, 2, 4, 4)]  # preview at half size, final images at full size
    assert res.images.shape == (9, 3, 4, 4)


# ---- sample_batch_size: chunked denoiser / decode / reward calls -----------------------------------
def _tiny(family):
    from pro_grpo_lightning.backends import LoraSettings, TinyFluxBackend, TinySD3Backend, TinySD15Backend

    lora = LoraSettings(rank=2, alpha=2)
    return {"sd15": lambda: TinySD15Backend(num_steps=4, resolution=32, guidance_scale=3.0, seed=0, lora=lora),
            "sd3": lambda: TinySD3Backend(num_steps=4, resolution=32, guidance_scale=4.5, seed=0, lora=lora),
            "flux": lambda: TinyFluxBackend(num_steps=4, resolution=32, guidance_scale=3.5, seed=0, lora=lora),
            }[family]()


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_sample_batch_size_changes_call_sizes_not_results(family):
    from pro_grpo_lightning.evaluation import sample_items
    from pro_grpo_lightning.rewards.image_stats import Brightness

    backend = _tiny(family)
    backend.configure_model()
    calls: dict[str, list[int]] = {"step": [], "decode": [], "reward": []}
    step, decode = backend.step, backend.decode
    backend.step = lambda x, *a, **k: calls["step"].append(x.shape[0]) or step(x, *a, **k)
    backend.decode = lambda x: calls["decode"].append(x.shape[0]) or decode(x)
    reward = Brightness()
    forward = reward.forward
    reward.forward = lambda images, *a: calls["reward"].append(images.shape[0]) or forward(images, *a)
    sched = ProGRPOSchedule(6, [1], [3])  # 2 prompts: 12 rows, then 6

    def run(size):
        for v in calls.values():
            v.clear()
        r = ExpandPruneRollout(backend, RewardSet([reward]), sched, RolloutSettings(sample_batch_size=size))
        res = r.run(["a cat", "two dogs"], torch.Generator().manual_seed(0),
                    noise_generator=torch.Generator().manual_seed(1))
        return res, {k: list(v) for k, v in calls.items()}

    whole, whole_calls = run(None)
    chunked, chunked_calls = run(4)
    assert whole_calls["step"] == [12, 12, 6, 6] and whole_calls["decode"] == [12, 6]
    assert chunked_calls["step"] == [4, 4, 4] * 2 + [4, 2] * 2  # rows before CFG doubling
    assert chunked_calls["decode"] == [4, 4, 4, 4, 2] and chunked_calls["reward"] == [4, 4, 4, 4, 2]
    assert [c.kept.tolist() for c in chunked.checkpoints] == [c.kept.tolist() for c in whole.checkpoints]
    torch.testing.assert_close(chunked.latents, whole.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.log_probs, whole.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.rewards, whole.rewards, rtol=1e-5, atol=1e-6)
    # held-out sampling: same images in chunks of 2
    seeds = [3, 4, 5]
    torch.testing.assert_close(sample_items(backend, ["a", "b", "c"], seeds, 2),
                               sample_items(backend, ["a", "b", "c"], seeds), rtol=1e-5, atol=1e-5)


def test_sample_batch_size_is_checked_once():
    with pytest.raises(ValueError, match="rollout.sample_batch_size must be >= 1 or None, got 0"):
        RolloutSettings(sample_batch_size=0)
