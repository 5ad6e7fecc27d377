"""RLHF: reward model, GAE, whitening (one and two processes), the first PPO minibatch, KL
penalty, and short end-to-end runs of train_rm.py and train_ppo.py on the toy task.

    python -m pytest -q tests/test_rlhf.py
"""
import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

import train_ppo
import train_rm
from checkpoint import load_checkpoint
from conftest import read_metrics, run_python
from model import GPT, GPTConfig
from ppo import (AdaptiveKLController, FixedKLController, PolicyAndCritic, gae, group_advantages, k3_kl, masked_whiten,
                 per_token_rewards, ppo_losses, response_logprobs, rollout, shaped_scores)
from reward_model import RewardModel, bradley_terry_loss


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
    torch_dist.destroy_process_group()


def test_masked_whitening_over_two_processes_equals_one(tmp_path):
    out = str(tmp_path / "w")
    mp.spawn(_whiten_on_rank, args=(str(tmp_path / "store"), out), nprocs=2)
    x, _, mask, _ = ragged(seed=1)
    two = torch.cat([torch.load(f"{out}.0"), torch.load(f"{out}.1")])
    torch.testing.assert_close(two, masked_whiten(x, mask), rtol=0, atol=1e-6)


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log sigmoid(d) = log(1 + e^-d): d = 1 and d = -1
    expected = [math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))]  # 0.31326, 1.31326
    assert bradley_terry_loss(chosen, rejected).tolist() == pytest.approx(expected, abs=1e-6)
    assert bradley_terry_loss(chosen, rejected, margin=0.5).tolist() == pytest.approx(
        [math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.5))], abs=1e-6)
    assert bradley_terry_loss(chosen, rejected, center_coef=0.1).tolist() == pytest.approx(
        [expected[0] + 0.1 * 9, expected[1] + 0.1 * 1], abs=1e-6)


def test_reward_model_score_is_the_value_at_the_last_real_token_whatever_the_padding_or_batch():
    torch.manual_seed(0)
    rm = RewardModel(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    seq = torch.randint(4, 64, (7,))
    with torch.no_grad():
        alone = rm(seq[None], torch.ones(1, 7, dtype=torch.long))
        right = rm(torch.cat([seq, torch.zeros(3, dtype=torch.long)])[None], torch.tensor([[1] * 7 + [0] * 3]))
        left = rm(torch.cat([torch.zeros(3, dtype=torch.long), seq])[None], torch.tensor([[0] * 3 + [1] * 7]))
        other = torch.randint(4, 64, (10,))
        batch = torch.stack([torch.cat([seq, torch.zeros(3, dtype=torch.long)]), other])
        batched = rm(batch, torch.tensor([[1] * 7 + [0] * 3, [1] * 10]))[:1]
        last_value = rm.values(seq[None])[:, -1]
    torch.testing.assert_close(alone, last_value, rtol=0, atol=0)
    for got in (right, left, batched):
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)


# Five response tokens and a masked sixth, cliprange 0.2 and cliprange_value 0.3. Per token:
#   ratio  advantage  -A*ratio  -A*clip(ratio)  policy loss      value old  new   return  value loss (x2)
#   1.5    +1         -1.5      -1.2            -1.2 (clipped)   0.0      0.5   1.0     (0.3-1)^2 = 0.49 (clipped)
#   0.5    +1         -0.5      -0.8            -0.5             0.0      0.5   0.0     (0.5-0)^2 = 0.25
#   0.5    -2          1.0       1.6             1.6 (clipped)   1.0      0.9   2.0     (0.9-2)^2 = 1.21
#   1.1    +1         -1.1      -1.1            -1.1             0.0     -1.0  -2.0     (-0.3+2)^2 = 2.89 (clipped)
#   0.9    -1          0.9       0.9             0.9             0.0      0.1   0.1     0
RATIOS = [1.5, 0.5, 0.5, 1.1, 0.9, 3.0]
PPO_INPUTS = dict(advantages=[1.0, 1.0, -2.0, 1.0, -1.0, 5.0], old_values=[0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
                  values=[0.5, 0.5, 0.9, -1.0, 0.1, 5.0], returns=[1.0, 0.0, 2.0, -2.0, 0.1, -5.0])


@pytest.mark.parametrize("tied", [True, False])
def test_every_trainable_weight_of_a_reward_model_and_a_critic_gets_a_gradient(tied):
    """DDP fails at its first step on a trainable weight without a gradient: an untied model's
    lm_head (TinyLlama, Mistral, Llama) was one in the reward model and the critic."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, norm="rmsnorm", pos="rope",
                        mlp="swiglu", bias=False, tie_embeddings=tied))
    ids, mask = torch.randint(0, 64, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    rm = RewardModel.from_gpt(gpt)
    assert ("backbone.lm_head.weight" in rm.state_dict()) == tied  # tied: it is the embedding
    torch.testing.assert_close(rm.backbone.hidden_states(ids, mask), gpt.hidden_states(ids, mask), atol=0, rtol=0)
    rm(ids, mask).sum().backward()
    assert [name for name, p in rm.named_parameters() if p.grad is None] == []
    critic = RewardModel.from_gpt(gpt)
    logits, values = PolicyAndCritic(gpt, critic)(ids, mask)
    (logits.sum() + values.sum()).backward()
    assert [name for name, p in critic.named_parameters() if p.grad is None] == []


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
    g = torch.Generator().manual_seed(0)
    B, P, R, V, temperature = 2, 3, 4, 7, 0.7
    logits = torch.randn(B, P + R, V, generator=g)
    input_ids = torch.randint(0, V, (B, P + R), generator=g)
    logprobs, entropy = response_logprobs(logits, input_ids, P, temperature)
    for b in range(B):
        for t in range(R):
            dist = (logits[b, P - 1 + t].double() / temperature).log_softmax(-1)  # column P-1+t predicts token t
            assert logprobs[b, t].item() == pytest.approx(dist[input_ids[b, P + t]].item(), abs=1e-5)
            assert entropy[b, t].item() == pytest.approx(-(dist.exp() * dist).sum().item(), abs=1e-5)
    assert (entropy > 0).all()


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
        logprobs, _ = response_logprobs(policy(r.input_ids, r.attention_mask), r.input_ids, r.n_prompt, 1.0)
        ref, _ = response_logprobs(reference(r.input_ids[[2, 0, 1]], r.attention_mask[[2, 0, 1]]),
                                   r.input_ids[[2, 0, 1]], r.n_prompt, 1.0)  # another batch order
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


# --- end to end, on the session's SFT checkpoint and pairs -------------------------------------


@pytest.fixture(scope="module")
def reward_ckpt(sft_pairs, tmp_path_factory):
    ckpt, pairs = sft_pairs
    out = str(tmp_path_factory.mktemp("rm"))
    assert train_rm.main([f"--sft_ckpt={ckpt}", "--gold_eval=true", f"--train_file={pairs}/pairs_train.jsonl",
                          f"--val_file={pairs}/pairs_val.jsonl", f"--out_dir={out}", "--device=cpu",
                          "--batch_size=32", "--max_iters=150", "--eval_interval=150"]) == 0
    return out


@pytest.mark.slow
def test_reward_model_learns_the_toy_preferences(reward_ckpt):
    """150 steps of 32 pairs: held-out accuracy above 0.7 (0.5 is chance). Seen here: 0.822."""
    end = read_metrics(reward_ckpt)[-1]
    assert end["eval/accuracy"] > 0.7
    assert end["eval/gold_agreement"] == pytest.approx(end["eval/accuracy"])  # pairs are gold-labelled


def ppo_args(sft_pairs, toy_dir, out_dir, **overrides):
    args = dict(sft_ckpt=sft_pairs[0], prompts=f"{toy_dir}/prompts_train.jsonl",
                eval_prompts=f"{toy_dir}/prompts_val.jsonl", out_dir=out_dir, device="cpu", batch_size=32,
                gen_chunk=16, max_iters=2, eval_interval=100, gold_eval=False, print_samples=0)
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["gold", "model"])
def test_short_ppo_run_raises_gold_reward(reward, sft_pairs, toy_dir, reward_ckpt, tmp_path):
    """15 iterations of 32 prompts: the mean gold reward of samples for 128 held-out prompts rises
    by at least 0.05 over the SFT model's (step 0 of the same run). Seen here: PPO-GT
    0.504 -> 0.777 (KL 2.98), PPO with the reward model 0.504 -> 0.793 (KL 3.20), both on normalised scores."""
    assert train_ppo.main(ppo_args(sft_pairs, toy_dir, str(tmp_path), reward=reward,
                                   reward_ckpt=f"{reward_ckpt}/ckpt.pt", max_iters=15, eval_interval=15,
                                   gold_eval=True, eval_samples=128)) == 0
    start, end = read_metrics(str(tmp_path))[0], read_metrics(str(tmp_path))[-1]
    assert start["eval/kl"] == 0 and start["eval/win_rate"] == 0.5
    assert end["eval/gold_reward"] > start["eval/gold_reward"] + 0.05
    assert end["eval/kl"] > 0


GROUP = dict(samples_per_prompt=4)  # rloo and grpo: 4 responses a prompt, 8 prompts an iteration


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


@pytest.mark.parametrize("advantage", ["gae", "rloo", "grpo"])
def test_first_iteration_logs_ratio_one_and_zero_kl(advantage, sft_pairs, toy_dir, reward_ckpt, tmp_path):
    """One epoch of one minibatch: the update's only minibatch sees the rollout's own policy.
    RLOO and GRPO build no critic: none is stepped or saved."""
    group = GROUP if advantage != "gae" else {}
    assert train_ppo.main(ppo_args(sft_pairs, toy_dir, str(tmp_path), reward_ckpt=f"{reward_ckpt}/ckpt.pt",
                                   max_iters=1, ppo_epochs=1, num_minibatches=1, advantage=advantage, **group)) == 0
    (log,) = [m for m in read_metrics(str(tmp_path)) if m["step"] == 1]
    assert log["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert log["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-9) and log["policy/clipfrac_avg"] == 0
    assert log["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # the policy was the reference when it sampled
    assert ("critic" in _final(str(tmp_path))) == (advantage == "gae")
    assert ("loss/value_avg" in log) == (advantage == "gae")
    if advantage == "grpo":
        assert log["loss/kl_avg"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_short_critic_free_run_raises_gold_reward(advantage, sft_pairs, toy_dir, tmp_path):
    """15 iterations of 8 prompts x 4 responses against the gold reward: the held-out gold
    reward rises by at least 0.05. Seen here: RLOO 0.504 -> 0.829 (KL 4.43), GRPO 0.504 -> 0.758 (KL 2.10)."""
    assert train_ppo.main(ppo_args(sft_pairs, toy_dir, str(tmp_path), reward="gold", advantage=advantage, max_iters=15,
                                   eval_interval=15, gold_eval=True, eval_samples=128, **GROUP)) == 0
    start, end = read_metrics(str(tmp_path))[0], read_metrics(str(tmp_path))[-1]
    assert end["eval/gold_reward"] > start["eval/gold_reward"] + 0.05 and end["eval/kl"] > 0


def test_the_evaluation_does_not_depend_on_the_training_temperature(sft_pairs, toy_dir, tmp_path):
    """Every method is evaluated at --eval_temperature; PPO's rollouts at 0.7 do not change it."""
    evals = []
    for temperature in (1.0, 0.7):
        out = str(tmp_path / str(temperature))
        assert train_ppo.main(ppo_args(sft_pairs, toy_dir, out, reward="gold", max_iters=0, temperature=temperature,
                                       gold_eval=True, eval_samples=32)) == 0
        evals.append({k: v for k, v in read_metrics(out)[0].items() if k.startswith("eval/")})
    assert evals[0] == evals[1] and len(evals[0]) == 6


def test_minibatches_that_would_skip_rollout_rows_are_refused(sft_pairs, toy_dir, tmp_path, capsys):
    """gen_chunk 30 in 4 minibatches of 7 rows would never train on 2 of every 30 rollouts."""
    assert train_ppo.main(ppo_args(sft_pairs, toy_dir, str(tmp_path / "out"), reward="gold", batch_size=30, gen_chunk=30,
                                   num_minibatches=4)) == 2
    assert "--gen_chunk a multiple of --num_minibatches" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_reward_model_that_reads_another_template_or_tokenizer_is_refused(sft_pairs, toy_dir, reward_ckpt, tmp_path,
                                                                           capsys):
    """The reward model scores the policy's token ids as they are: trained on plain text, it cannot
    read prompts rendered with the Zephyr template; trained with another tokenizer, nothing."""
    args = ppo_args(sft_pairs, toy_dir, str(tmp_path / "out"), reward="model", reward_ckpt=f"{reward_ckpt}/ckpt.pt")
    assert train_ppo.main(args + ["--chat_template=zephyr"]) == 2
    assert "another chat template" in capsys.readouterr().err and not (tmp_path / "out").exists()
    ckpt = load_checkpoint(f"{reward_ckpt}/ckpt.pt")
    ckpt["tokenizer"]["bos_id"] = 1  # as if another tokenizer's
    torch.save(ckpt, tmp_path / "other_rm.pt")
    assert train_ppo.main(ppo_args(sft_pairs, toy_dir, str(tmp_path / "out"), reward="model",
                                   reward_ckpt=str(tmp_path / "other_rm.pt"))) == 2
    assert "another tokenizer" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _final(out_dir):
    return load_checkpoint(os.path.join(out_dir, "ckpt.pt"))


@pytest.mark.slow
@pytest.mark.parametrize(("advantage", "parallels"), [("gae", ("ddp", "fsdp")), ("grpo", ("ddp",))],
                         ids=["gae", "grpo"])
def test_two_processes_equal_one_process(advantage, parallels, sft_pairs, toy_dir, reward_ckpt, tmp_path):
    """Under fsdp the policy, the critic, the reference and the reward model are all sharded,
    rollouts and the evaluation sample on the sharded policy, and the run stops after iteration
    1 and resumes (policy, critic and their optimizer state come back into the shards). grpo
    averages per response (gae covers the token average): its count of responses spans ranks too."""
    group = {**GROUP, "loss_average": "sequence"} if advantage != "gae" else {}
    args = lambda out, **kw: ppo_args(sft_pairs, toy_dir, out, reward_ckpt=f"{reward_ckpt}/ckpt.pt", advantage=advantage,
                                      gold_eval=True, eval_samples=8, eval_interval=1, lr_decay_iters=2, **group, **kw)
    one = str(tmp_path / "one")
    r = run_python("train_ppo.py", *args(one))
    assert r.returncode == 0, r.stderr
    for parallel in parallels:
        two = str(tmp_path / parallel)
        runs = [args(two, max_iters=1), args(two, resume=True)] if parallel == "fsdp" else [args(two)]
        for run in runs:
            r = run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_ppo.py", *run,
                           f"--parallel={parallel}")
            assert r.returncode == 0, r.stderr
        _assert_same_ppo_run(one, two)


def _assert_same_ppo_run(one, two):
    a, b = _final(one), _final(two)
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=1e-5, msg=name)
    for name, tensor in a.get("critic", {}).items():
        torch.testing.assert_close(b["critic"][name], tensor, rtol=0, atol=1e-5, msg=name)
    for x, y in zip(read_metrics(one), read_metrics(two), strict=True):
        assert x.keys() == y.keys()
        for k in x:
            # a clip fraction counts tokens on one side of a threshold, so float rounding that moves
            # one token across it changes the fraction by 1/(tokens in the minibatch): allow a few
            assert x[k] == pytest.approx(y[k], abs=0.01 if k.endswith("clipfrac_avg") else 1e-4), k


def test_resumed_ppo_run_equals_the_uninterrupted_one(sft_pairs, toy_dir, reward_ckpt, tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    common = dict(reward_ckpt=f"{reward_ckpt}/ckpt.pt", eval_interval=2, early_eval_interval=1, early_eval_until=2,
                  lr_decay_iters=4, adaptive_kl=True, kl_target=0.5, gold_eval=True, eval_samples=8)  # evaluations at 0, 1, 2, 4
    assert train_ppo.main(ppo_args(sft_pairs, toy_dir, whole, max_iters=4, **common)) == 0
    assert train_ppo.main(ppo_args(sft_pairs, toy_dir, split, max_iters=2, **common)) == 0
    assert train_ppo.main(ppo_args(sft_pairs, toy_dir, split, max_iters=4, resume=True, **common)) == 0
    assert read_metrics(split) == read_metrics(whole)
    assert [r["step"] for r in read_metrics(whole) if "eval/kl" in r] == [0, 1, 2, 4]
    a, b = _final(whole), _final(split)
    assert a["kl_coef"] == b["kl_coef"] != 0.05  # the adaptive controller moved, and came back on resume
    for part in ("model", "critic"):
        for name, tensor in a[part].items():
            assert torch.equal(b[part][name], tensor), name


def test_prompt_file_with_a_byte_order_mark_and_a_bad_byte_stops_on_that_line(sft_pairs, toy_dir, tmp_path):
    """Line 1 starts with a UTF-8 byte-order mark (accepted); line 2 holds a byte that is not UTF-8."""
    bad = tmp_path / "prompts.jsonl"
    bad.write_bytes(b'\xef\xbb\xbf{"prompt": "the movie"}\n{"prompt": "the \xff plot"}\n')
    out = tmp_path / "out"
    r = run_python("train_ppo.py", *ppo_args(sft_pairs, toy_dir, str(out), reward="gold", prompts=str(bad)))
    assert r.returncode == 2
    assert r.stderr == f"error: {bad}:2: invalid UTF-8 (byte 0xff at byte 17)\n"
    assert not out.exists()


def test_grpo_loss_adds_kl_coef_times_the_k3_kl_to_the_reference():
    """With zero advantages the clipped surrogate is zero and GRPO's loss is its KL term alone."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    ids = torch.randint(0, 32, (2, 8))
    mask = torch.ones(2, 5)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[:, 2:-1], -1).gather(-1, ids[:, 3:, None]).squeeze(-1)  # P = 3
    ref = logp - 0.5 * torch.arange(5.0)  # the reference less likely by 0, 0.5, 1, ... nats
    cfg = train_ppo.Config(advantage="grpo", kl_coef=0.3)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), response_mask=mask, old_logprobs=logp,
                 ref_logprobs=ref, advantages=torch.zeros(2, 5))
    loss, sums = train_ppo.ppo_batch_loss(model, batch, 3, cfg)
    r = (ref - logp).exp()
    expected = 0.3 * (r - (ref - logp) - 1).sum()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    assert sums["policy_loss"] == 0


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


def test_loss_average_sequence_changes_a_grpo_run_and_is_refused_for_gae(sft_pairs, toy_dir, tmp_path, capsys):
    """One minibatch of the whole rollout at ratio 1, responses of uneven lengths: the logged policy
    loss is -mean(A) over responses under sequence, zero because GRPO's advantages sum to zero in
    each group, and the token-weighted mean under token, which is not; the same seed's policy
    moves differently. gae has per-token advantages: refused."""
    runs = {}
    for average in ("token", "sequence"):
        out = str(tmp_path / average)
        assert train_ppo.main(ppo_args(sft_pairs, toy_dir, out, reward="gold", advantage="grpo", max_iters=1,
                                       ppo_epochs=1, num_minibatches=1, loss_average=average, **GROUP)) == 0
        (log,) = [m for m in read_metrics(out) if m["step"] == 1]
        runs[average] = log["loss/policy_avg"], _final(out)["model"]
    assert runs["sequence"][0] == pytest.approx(0.0, abs=1e-6) and abs(runs["token"][0]) > 1e-3
    assert any(not torch.equal(runs["token"][1][k], runs["sequence"][1][k]) for k in runs["token"][1])
    capsys.readouterr()
    gae = ppo_args(sft_pairs, toy_dir, str(tmp_path / "gae"), reward="gold", loss_average="sequence")
    assert train_ppo.main(gae) == 2
    assert capsys.readouterr().err.startswith("error: --loss_average sequence is for rloo and grpo")
    assert not (tmp_path / "gae").exists()


def test_a_prompts_responses_are_one_group_in_consecutive_rows(sft_pairs, toy_dir):
    from data import load_prompts
    from checkpoint import load_gpt
    from distributed import Dist
    policy, tok, _ = load_gpt(sft_pairs[0])
    cfg = train_ppo.Config(reward="gold", batch_size=16, gen_chunk=8, samples_per_prompt=4)
    prompts = load_prompts(f"{toy_dir}/prompts_train.jsonl")
    data, P = train_ppo.collect_rollouts(policy, None, tok, prompts, [tok.encode_prompt(p) for p in prompts], 0, cfg,
                                         Dist(False, 0, 0, 1, torch.device("cpu")), torch.autocast("cpu", enabled=False))
    prompts = data["input_ids"][:, :P].view(4, 4, P)  # 4 groups of 4 rows
    assert (prompts == prompts[:, :1]).all()  # the same prompt within a group
    assert len({tuple(g[0].tolist()) for g in prompts}) == 4  # a different one in each


@pytest.mark.parametrize("reward", ["gold", "model"])
def test_reward_normalisation_centres_the_sft_policys_scores(reward, sft_pairs, toy_dir, reward_ckpt, tmp_path):
    """With one normalising batch, the first iteration scores the very samples that set the mean
    and std: their normalised mean is 0, and the unnormalised run's mean score is the mean."""
    runs = {}
    for norm in (True, False):
        out = str(tmp_path / str(norm))
        assert train_ppo.main(ppo_args(sft_pairs, toy_dir, out, reward=reward, reward_ckpt=f"{reward_ckpt}/ckpt.pt", max_iters=1,
                                       reward_norm=norm, reward_norm_batches=1, missing_eos_penalty=0.0)) == 0
        runs[norm] = read_metrics(out)
    normalised, raw = runs[True], runs[False]
    assert abs(normalised[1]["objective/scores"]) < 1e-5
    assert raw[0]["reward_norm/mean"] == 0 and raw[0]["reward_norm/std"] == 1
    assert normalised[0]["reward_norm/mean"] == pytest.approx(raw[1]["objective/scores"], abs=1e-5)
    assert normalised[0]["reward_norm/std"] > 0.1


def test_reward_statistics_are_the_mean_and_std_of_the_sft_samples_in_float64(sft_pairs, toy_dir):
    from data import load_prompts
    from checkpoint import load_gpt
    from distributed import Dist
    policy, tok, _ = load_gpt(sft_pairs[0])
    cfg = train_ppo.Config(reward="gold", batch_size=16, gen_chunk=8, reward_norm_batches=3)
    prompts, dist, ctx = load_prompts(f"{toy_dir}/prompts_train.jsonl"), Dist(False, 0, 0, 1, torch.device("cpu")), \
        torch.autocast("cpu", enabled=False)
    prompt_ids = [tok.encode_prompt(p) for p in prompts]
    raw = np.concatenate([train_ppo.collect_rollouts(policy.eval(), None, tok, prompts, prompt_ids, step, cfg, dist,
                                                     ctx)[0]["scores"].double().numpy() for step in range(3)])
    mean, std = train_ppo.reward_statistics(policy, None, tok, prompts, prompt_ids, cfg, dist, ctx)
    assert len(raw) == 48 and mean == pytest.approx(raw.mean(), abs=1e-9) and std == pytest.approx(raw.std(), abs=1e-9)
