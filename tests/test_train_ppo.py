"""train_ppo.py end to end on the toy task (and train_rm.py's reward model it uses): short runs of
PPO, RLOO and GRPO raise the gold reward, the first iteration's ratio is one, 2 processes equal
1, a resumed run equals the uninterrupted one, and bad settings or inputs are refused.

    python -m pytest -q tests/test_train_ppo.py          # add -m "not slow" to skip the runs
"""
import json
import math
import os

import numpy as np
import pytest
import torch

import train_ppo
import train_rm
from checkpoint import load_checkpoint
from conftest import read_metrics, run_python, run_ranks
from distributed import Dist
from model import GPT, GPTConfig
from rewards import Rewards, toy_gold_reward
from rollout import collect_rollouts, reward_statistics

GOLD = Rewards(functions=[("gold", toy_gold_reward)])  # the toy task's gold reward as the run's scorer


GROUP = dict(samples_per_prompt=4)  # rloo and grpo: 4 responses a prompt, 8 prompts an iteration


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


def test_a_reward_model_that_reads_another_template_is_handed_text_and_cannot_be_the_critic(
        sft_pairs, toy_dir, reward_ckpt, tmp_path, capsys):
    """Trained on plain text, the reward model reads the policy's Zephyr-rendered prompts as text:
    each completion is handed to it as prompt + completion, one example printed first. Its critic,
    which would read the policy's token ids, is refused in one line before anything is written."""
    args = ppo_args(sft_pairs, toy_dir, str(tmp_path / "out"), reward="model", reward_ckpt=f"{reward_ckpt}/ckpt.pt",
                    max_iters=1, eval_interval=1)
    assert train_ppo.main(args + ["--chat_template=zephyr", "--critic_init=reward"]) == 2
    assert "--critic_init reward: the critic reads the policy's token ids" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert train_ppo.main(args + ["--chat_template=zephyr"]) == 0
    out = capsys.readouterr().out
    assert "it is handed each completion as text, for example: '" in out and "<|assistant|>" not in out.split(
        "for example: ")[1].splitlines()[0]


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
            r = run_ranks(2, "train_ppo.py", *run, f"--parallel={parallel}")
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
    policy, tok = load_gpt(sft_pairs[0])
    cfg = train_ppo.Config(reward="gold", batch_size=16, gen_chunk=8, samples_per_prompt=4)
    prompts = load_prompts(f"{toy_dir}/prompts_train.jsonl")
    data, P = collect_rollouts(policy, GOLD, tok, prompts, [tok.encode_prompt(p) for p in prompts], 0, 16, cfg,
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
    policy, tok = load_gpt(sft_pairs[0])
    cfg = train_ppo.Config(reward="gold", batch_size=16, gen_chunk=8, reward_norm_batches=3)
    prompts, dist, ctx = load_prompts(f"{toy_dir}/prompts_train.jsonl"), Dist(False, 0, 0, 1, torch.device("cpu")), \
        torch.autocast("cpu", enabled=False)
    prompt_ids = [tok.encode_prompt(p) for p in prompts]
    raw = np.concatenate([collect_rollouts(policy.eval(), GOLD, tok, prompts, prompt_ids, step, 16, cfg, dist,
                                           ctx)[0]["scores"].double().numpy() for step in range(3)])
    mean, std = reward_statistics(policy, GOLD, tok, prompts, prompt_ids, 16, cfg, dist, ctx)
    assert len(raw) == 48 and mean == pytest.approx(raw.mean(), abs=1e-9) and std == pytest.approx(raw.std(), abs=1e-9)


def test_step_5_advantages_rloo_charges_the_kl_grpo_scores_alone_gae_whitens():
    """Two prompts x two responses, per-token rewards by hand: RLOO's sequence reward is the
    per-token rewards summed (score less the KL charge), GRPO's the score alone; GAE's whitened
    advantages have mean 0 and variance 1 over the response tokens and come with the returns."""
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    scores = torch.tensor([1.0, 0.0, 2.0, 2.0])
    rewards = torch.tensor([[-0.5, 1.0], [-0.5, 0.0], [2.0, 0.0], [-1.0, 2.0]])  # sums 0.5, -0.5, 2, 1
    data = {"response_mask": mask, "scores": scores}
    ref = torch.zeros(4, 2)
    rloo = train_ppo.advantages_and_targets(rewards, None, ref, data, train_ppo.Config(advantage="rloo", samples_per_prompt=2), None)
    assert set(rloo) == {"advantages"}
    torch.testing.assert_close(rloo["advantages"][:, 0], torch.tensor([1.0, -1.0, 1.0, -1.0]))  # r_i - r_j
    torch.testing.assert_close(rloo["advantages"] * mask, rloo["advantages"])  # zero past the response
    grpo = train_ppo.advantages_and_targets(rewards, None, ref, data, train_ppo.Config(advantage="grpo", samples_per_prompt=2), None)
    assert set(grpo) == {"advantages", "ref_logprobs"}
    # scores (1, 0): +-1 / (std 0.7071 + 1e-4); scores (2, 2): no preference, 0
    torch.testing.assert_close(grpo["advantages"][:, 0], torch.tensor([0.7070, -0.7070, 0.0, 0.0]), atol=1e-4, rtol=0)
    one = Dist(False, 0, 0, 1, torch.device("cpu"))
    gae = train_ppo.advantages_and_targets(rewards, torch.zeros(4, 2), ref, data, train_ppo.Config(advantage="gae"), one)
    assert set(gae) == {"old_values", "returns", "advantages"}
    real = gae["advantages"][mask.bool()]
    assert abs(real.mean().item()) < 1e-5 and real.var().item() == pytest.approx(1.0, abs=0.2)
    # whitening keeps the order: raw advantages 0.45 1 | -0.5 0 | 2 | 0.9 2, the largest row 2's, the least row 1's
    assert gae["advantages"][2, 0] == real.max() and gae["advantages"][1, 0] == real.min()
    # values 0, gamma 1, lambda 0.95: the return is the lambda-return, r_0 + 0.95 r_1 = -0.5 + 0.95
    torch.testing.assert_close(gae["returns"][0], torch.tensor([0.45, 1.0]))


def test_rloo_with_one_ratio_a_response_runs_and_is_rloos_alone(sft_pairs, toy_dir, tmp_path, capsys):
    """--ratio sequence settles --loss_average sequence (printed) and trains; with grpo it is one line."""
    args = ppo_args(sft_pairs, toy_dir, str(tmp_path / "grpo"), reward="gold", advantage="grpo", ratio="sequence",
                    **GROUP)
    assert train_ppo.main(args) == 2
    assert "--ratio sequence is RLOO's" in capsys.readouterr().err and not (tmp_path / "grpo").exists()
    out = str(tmp_path / "rloo")
    assert train_ppo.main(ppo_args(sft_pairs, toy_dir, out, reward="gold", advantage="rloo", ratio="sequence",
                                   max_iters=1, **GROUP)) == 0
    assert "loss_average" in capsys.readouterr().out
    last = read_metrics(out)[-1]
    assert math.isfinite(last["loss/policy_avg"]) and 0.5 < last["val/ratio"] < 2
    assert json.load(open(f"{out}/config.json"))["loss_average"] == "sequence"
