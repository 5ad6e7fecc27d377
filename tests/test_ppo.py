"""ppo.py's pure functions against loops, numpy and hand-computed values: GAE, whitening (one and
two processes), the clipped losses, per-token rewards with the KL penalty, the k3 estimate, the KL
controllers, RLOO's and GRPO's advantages, the sequence average.

    python -m pytest -q tests/test_ppo.py
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from distributed import Dist, cleanup_distributed
from model import GPT, IGNORE_INDEX, GPTConfig
from ppo import (AdaptiveKLController, FixedKLController, gae, group_advantages, k3_kl, masked_whiten, per_token_rewards, ppo_losses, response_labels, rollout, shaped_scores)


def ragged(B=5, R=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(B, R, generator=g), torch.randn(B, R, generator=g)
    lengths = [9, 1, 4, 7, 2]
    mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths])
    return rewards, values, mask, lengths


def test_gae_equals_a_plain_loop():
    rewards, values, mask, lengths = ragged()
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        expected, running = [0.0] * n, 0.0
        for t in reversed(range(n)):  # the episode ends after token n-1: no bootstrap value there
            next_value = values[i, t + 1].item() if t + 1 < n else 0.0
            running = rewards[i, t].item() + gamma * next_value - values[i, t].item() + gamma * lam * running
            expected[t] = running
        assert advantages[i, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert (advantages[i, n:] == 0).all()
        assert returns[i, :n].tolist() == pytest.approx([a + v for a, v in zip(expected, values[i, :n].tolist())], abs=1e-5)


def test_masked_whitening_matches_numpy():
    x, _, mask, _ = ragged(seed=1)
    got = masked_whiten(x, mask)
    kept = x[mask.bool()].numpy().astype(np.float64)
    expected = (kept - kept.mean()) / np.sqrt(kept.var(ddof=1) + 1e-8)
    assert got[mask.bool()].numpy() == pytest.approx(expected, abs=1e-5)
    assert (got[~mask.bool()] == 0).all()


def _whiten_on_rank(rank, store, out):
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    x, _, mask, _ = ragged(seed=1)
    rows = slice(0, 2) if rank == 0 else slice(2, 5)  # uneven split of the batch
    def all_reduce(t):
        torch_dist.all_reduce(t)
        return t
    torch.save(masked_whiten(x[rows], mask[rows], all_reduce), f"{out}.{rank}")
    cleanup_distributed(Dist(True, rank, rank, 2, torch.device("cpu")), finished=True)  # every rank done first


def test_masked_whitening_over_two_processes_equals_one(tmp_path):
    out = str(tmp_path / "w")
    mp.spawn(_whiten_on_rank, args=(str(tmp_path / "store"), out), nprocs=2)
    x, _, mask, _ = ragged(seed=1)
    two = torch.cat([torch.load(f"{out}.0"), torch.load(f"{out}.1")])
    torch.testing.assert_close(two, masked_whiten(x, mask), rtol=0, atol=1e-6)


RATIOS = [1.5, 0.5, 0.5, 1.1, 0.9, 3.0]


PPO_INPUTS = dict(advantages=[1.0, 1.0, -2.0, 1.0, -1.0, 5.0], old_values=[0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
                  values=[0.5, 0.5, 0.9, -1.0, 0.1, 5.0], returns=[1.0, 0.0, 2.0, -2.0, 0.1, -5.0])


def test_ppo_losses_match_hand_computed_values_on_both_sides_of_the_clip_range():
    t = lambda xs: torch.tensor([xs])
    old_logprobs = t([-1.0] * 6)
    stats = ppo_losses(old_logprobs + torch.log(t(RATIOS)), old_logprobs, t(PPO_INPUTS["advantages"]),
                       t(PPO_INPUTS["values"]), t(PPO_INPUTS["old_values"]), t(PPO_INPUTS["returns"]),
                       t([1, 1, 1, 1, 1, 0]), cliprange=0.2, cliprange_value=0.3)
    got = {k: v.item() for k, v in stats.items()}
    assert got["policy_loss"] == pytest.approx(-1.2 - 0.5 + 1.6 - 1.1 + 0.9, abs=1e-5)  # -0.3
    assert got["value_loss"] == pytest.approx(0.5 * (0.49 + 0.25 + 1.21 + 2.89 + 0.0), abs=1e-5)  # 2.42
    assert got["clipfrac"] == 2 and got["vf_clipfrac"] == 2  # tokens where the clipped term was the one taken
    assert got["ratio"] == pytest.approx(1.5 + 0.5 + 0.5 + 1.1 + 0.9, abs=1e-5)
    # approx KL = 0.5 (log ratio)^2 (Schulman's k2), summed over the tokens
    assert got["approxkl"] == pytest.approx(0.5 * sum(math.log(r) ** 2 for r in RATIOS[:5]), abs=1e-5)


def test_ppo_policy_gradient_is_zero_where_the_clip_is_active():
    """A token whose ratio is clipped on its advantage's side passes no gradient (eq. 7's flat part)."""
    log_ratio = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.1]])).requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, -2.0, 1.0]])
    zeros = torch.zeros(1, 4)
    ppo_losses(log_ratio, zeros, advantages, zeros, zeros, zeros, torch.ones(1, 4), 0.2, 0.2)["policy_loss"].backward()
    # d(-A r)/d(log r) = -A r where unclipped; 0 where clipped
    assert log_ratio.grad.tolist() == [pytest.approx([0.0, -0.5, 0.0, -1.1])]


def test_response_logprobs_and_entropy_match_a_per_token_loop_at_temperature():
    """The model given response_labels: column P-1+t of its output is response token t's log-prob
    (and its step's entropy) at the temperature, as a float64 loop over the logits computes it."""
    g = torch.Generator().manual_seed(0)
    B, P, R, V, temperature = 2, 3, 4, 16, 0.7
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=8))
    input_ids = torch.randint(0, V, (B, P + R), generator=g)
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        logits = policy(input_ids, mask)
        logprobs, entropy = (x[:, P - 1:] for x in policy(input_ids, mask, labels=response_labels(input_ids, mask, P),
                                                           temperature=temperature, entropy=True))
    assert logprobs.shape == entropy.shape == (B, R)
    for b in range(B):
        for t in range(R):
            dist = (logits[b, P - 1 + t].double() / temperature).log_softmax(-1)  # column P-1+t predicts token t
            assert logprobs[b, t].item() == pytest.approx(dist[input_ids[b, P + t]].item(), abs=1e-5)
            assert entropy[b, t].item() == pytest.approx(-(dist.exp() * dist).sum().item(), abs=1e-5)
    assert (entropy > 0).all()


def test_response_labels_leave_the_prompt_and_the_padding_after_a_stop_unlabelled():
    """Labels for a left-padded prompt of 3 columns and a response that stops (token 3) before
    the end, then one that fills every column: only response tokens are labelled."""
    ids = torch.tensor([[0, 5, 6, 7, 3, 0, 0], [4, 5, 6, 8, 9, 3, 2]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    I = IGNORE_INDEX
    assert response_labels(ids, mask, 3).tolist() == [[I, I, I, 7, 3, I, I], [I, I, I, 8, 9, 3, 2]]


def test_per_token_rewards_put_the_score_on_the_last_response_token_and_charge_kl_everywhere():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -9.0, -9.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # lengths 3 and 1
    rewards, kl = per_token_rewards(torch.tensor([2.0, -1.0]), logprobs, ref_logprobs, mask, kl_coef=0.1)
    assert kl.tolist() == [pytest.approx([0.5, -1.0, 0.0]), pytest.approx([-0.5, 0.0, 0.0])]  # log pi - log pi_ref
    assert rewards.tolist() == [pytest.approx([-0.05, 0.1, 2.0]), pytest.approx([-1.0 + 0.05, 0.0, 0.0])]


def test_a_response_without_a_stop_token_loses_the_missing_eos_penalty_from_its_normalised_score():
    raw, ended = torch.tensor([3.0, 3.0, 1.0]), torch.tensor([True, False, False])
    scores = shaped_scores(raw, ended, mean=1.0, std=2.0, missing_eos_penalty=0.5)
    assert scores.tolist() == [1.0, 1.0 - 0.5, 0.0 - 0.5]  # (raw - mean) / std, less the penalty where not ended


def test_policy_equal_to_the_reference_pays_no_kl_penalty():
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=64, block_size=48, n_layer=2, n_head=2, n_embd=32)).eval()
    reference = copy.deepcopy(policy)
    r = rollout(policy, [[2, 5, 6], [2, 7], [2, 9, 10, 11]], 12, stop_ids=[3], pad_id=0, temperature=1.0,
                generator=torch.Generator().manual_seed(0))
    mask = r.response_mask.float()
    with torch.no_grad():
        labels = response_labels(r.input_ids, r.attention_mask, r.n_prompt)
        logprobs = policy(r.input_ids, r.attention_mask, labels=labels)[:, r.n_prompt - 1:]
        ref = reference(r.input_ids[[2, 0, 1]], r.attention_mask[[2, 0, 1]],
                        labels=labels[[2, 0, 1]])[:, r.n_prompt - 1:]  # another batch order
    for estimator in ("k1", "k3"):
        _, kl = per_token_rewards(torch.zeros(3), logprobs, ref[[1, 2, 0]], mask, 0.1, estimator)
        assert kl.abs().max().item() < 1e-5


def test_k3_kl_estimate_is_never_negative_and_matches_its_formula():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    _, kl = per_token_rewards(torch.zeros(1), logp, ref, torch.ones(1, 2), 0.1, "k3")
    r = (ref - logp).exp()  # pi_ref / pi
    torch.testing.assert_close(kl, (r - 1) - r.log())
    assert (kl >= 0).all()


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=64)
    assert ctl.value == 0.05


def test_adaptive_kl_controller_follows_ziegler_et_al():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, n_steps=64)  # error 9/6 - 1 = 0.5, clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    ctl.update(3.0, n_steps=100)  # error -0.5, clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000) * (1 - 0.2 * 100 / 10000))
    ctl.update(6.6, n_steps=1000)  # error 0.1, inside the clip
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000) * (1 - 0.2 * 100 / 10000) * (1 + 0.1 * 1000 / 10000))


def test_rloo_baseline_is_the_mean_of_the_other_samples_by_hand():
    rewards = torch.tensor([1.0, 2.0, 4.0, 7.0, 5.0, 5.0, 1.0, 3.0])  # two groups of 4
    expected = [1 - 13 / 3, 2 - 12 / 3, 4 - 10 / 3, 7 - 7 / 3, 5 - 3, 5 - 3, 1 - 13 / 3, 3 - 11 / 3]
    torch.testing.assert_close(group_advantages(rewards, 4, "rloo"), torch.tensor(expected), rtol=0, atol=1e-6)


def test_grpo_advantages_by_hand_and_zero_for_a_group_without_spread():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.5, 0.5, 0.5])  # groups of 3: mean 2 and unbiased std 1; no spread
    expected = [-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0]
    torch.testing.assert_close(group_advantages(rewards, 3, "grpo"), torch.tensor(expected), rtol=0, atol=1e-6)


def test_grpo_kl_in_the_loss_by_hand_and_zero_with_zero_gradient_at_the_reference():
    logp, ref = torch.log(torch.tensor([0.5, 0.2])), torch.log(torch.tensor([0.25, 0.2]))
    # k3 = r - log r - 1 with r = pi_ref / pi: 0.5 - log 0.5 - 1 for the first token, 0 for the second
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([0.5 - math.log(0.5) - 1, 0.0]), rtol=0, atol=1e-6)
    at_reference = ref.clone().requires_grad_(True)
    k3_kl(at_reference, ref).sum().backward()
    assert torch.equal(at_reference.grad, torch.zeros(2))


def test_sequence_average_is_each_responses_token_mean_then_the_mean_over_responses():
    """Two responses of 1 and 3 tokens with per-token losses l1 | l2 l3 l4 (at ratio 1 a token's
    clipped loss is -advantage; the padding holds junk that must not count): sequence gives
    (l1 / 1 + (l2 + l3 + l4) / 3) / 2 (DeepSeekMath eq. 3), token (l1 + l2 + l3 + l4) / 4."""
    from ppo import loss_weights
    per_token = [[0.7], [-1.3, 2.9, 0.4]]
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    advantages = -torch.tensor([[0.7, 5.0, -9.0], [-1.3, 2.9, 0.4]])
    logprobs = torch.log(torch.tensor([[0.3, 0.2, 0.1], [0.5, 0.4, 0.6]]))
    expected = {"sequence": sum(sum(row) / len(row) for row in per_token) / len(per_token),
                "token": sum(sum(row) for row in per_token) / sum(len(row) for row in per_token)}
    for average, want in expected.items():
        weights, count = loss_weights(mask, average)
        sums = ppo_losses(logprobs, logprobs, advantages, None, None, None, weights, 0.2, 0.2)
        assert count.item() == {"sequence": 2, "token": 4}[average]
        assert (sums["policy_loss"] / count).item() == pytest.approx(want, rel=0, abs=1e-6), average
        assert (sums["ratio"] / count).item() == pytest.approx(1.0, abs=1e-6)  # the statistics are means alike


def test_rloos_sequence_ratio_is_one_ratio_a_response_clipped_whole():
    """TRL's RLOO: ratio_i = exp(sum_t (logp - old_logp)) over response i's tokens, the clipped
    surrogate per response, summed over responses; a loop in float64 gives the same loss. At ratio
    1 its gradient on each token's log-prob is -A_i, |o_i| times the per-token form's under the
    per-response average; a response whose ratio passed 1 + eps with A > 0 gets no gradient."""
    from ppo import loss_weights, ppo_losses, sequence_ratio_losses
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    old = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    new = (old + 0.1 * torch.randn(3, 4, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([0.7, -1.2, 0.4], dtype=torch.float64)[:, None] * mask
    eps = 0.2
    sums = sequence_ratio_losses(new, old, adv, mask, eps)
    expected = 0.0
    for i in range(3):
        r = math.exp(sum((new[i, t] - old[i, t]).item() for t in range(4) if mask[i, t]))
        a = adv[i, 0].item()
        expected += max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))
    assert sums["policy_loss"].item() == pytest.approx(expected, abs=1e-12)
    # at ratio 1: -A_i on every token of response i, and |o_i| times the per-token form's gradient
    at_one = old.clone().requires_grad_()
    sequence_ratio_losses(at_one, old, adv, mask, eps)["policy_loss"].backward()
    torch.testing.assert_close(at_one.grad, -adv)
    per_token = old.clone().requires_grad_()
    weights, _ = loss_weights(mask, "sequence")
    ppo_losses(per_token, old, adv, None, None, None, weights, eps, eps)["policy_loss"].backward()
    torch.testing.assert_close(at_one.grad, per_token.grad * mask.sum(1, keepdim=True))
    # a response pushed past 1 + eps with a positive advantage is clipped whole
    pushed = old.clone()
    pushed[0, :3] += 0.1  # ratio e^0.3 > 1.2
    pushed.requires_grad_()
    sequence_ratio_losses(pushed, old, adv, mask, eps)["policy_loss"].backward()
    assert pushed.grad[0].abs().sum() == 0 and pushed.grad[1].abs().sum() > 0
