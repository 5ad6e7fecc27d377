"""train_online_dpo.py on the toy task: its loss is DPO's on the pairs it samples, with
--refresh_every the run's length it is offline DPO (train_dpo.py) on pairs sampled once, 2
processes equal 1, a run resumed between two samplings equals the uninterrupted one, a short run
raises the gold reward, and bad settings are refused before anything is written.

    python -m pytest -q tests/test_train_online_dpo.py
"""
import math
import os

import pytest
import torch

import train_dpo
import train_online_dpo
from checkpoint import load_checkpoint, load_gpt
from conftest import read_metrics, run_python, run_ranks
from data import collate
from distributed import Dist
from dpo import rollout_pairs
from rewards import Rewards, load_reward_function, toy_gold_reward
from rollout import collect_rollouts
from toy import gold_reward
from train_utils import _epoch_order

CPU = Dist(False, 0, 0, 1, torch.device("cpu"))
NO_AUTOCAST = torch.autocast("cpu", enabled=False)
# a reward that never ties: the length of the text, plus a thousandth for each later response of a call
BY_LENGTH = "def by_length(prompts, completions, **columns):\n    " \
            "return [len(c) + 1e-3 * i for i, c in enumerate(completions)]\n"


# train_online_dpo.py's main, interrupted as Ctrl-C would be when it labels its second step's pairs
STOP_AT_STEP_2 = """
import sys
import train_online_dpo
label, calls = train_online_dpo.rollout_pairs, []
def stop(*args):
    calls.append(1)
    if len(calls) == 2:
        raise KeyboardInterrupt
    return label(*args)
train_online_dpo.rollout_pairs = stop
sys.exit(train_online_dpo.main(sys.argv[1:]))
"""


def online_args(sft_pairs, toy_dir, out_dir, **overrides):
    args = dict(sft_ckpt=sft_pairs[0], prompts=f"{toy_dir}/prompts_train.jsonl", out_dir=out_dir, device="cpu",
                reward="gold", batch_size=8, gen_chunk=8, max_iters=3, eval_interval=100, gold_eval=False,
                print_samples=0, reward_norm_batches=1)
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def unpadded(data: dict, row: int, P: int) -> tuple[list[int], int]:
    """A rollout row as train_dpo.py's pairs hold it: prompt and response without padding, and the
    prompt's length (the tokens without loss)."""
    ids = data["input_ids"][row][data["attention_mask"][row] == 1].tolist()
    return ids, int(data["attention_mask"][row, :P].sum())


def as_dpo_pairs(chosen: list, rejected: list, pad_id: int) -> dict:
    """Pairs in train_dpo.py's layout: chosen and rejected right-padded to one length."""
    both = collate(chosen + rejected, pad_id)
    n = len(chosen)
    return {f"{side}_{k}": v[rows] for k, v in both.items()
            for side, rows in (("chosen", slice(0, n)), ("rejected", slice(n, None)))}


def test_online_loss_is_dpos_loss_on_the_same_pairs_chosen_by_the_higher_score(sft_pairs, toy_dir):
    """Online DPO's loss and metrics on a sampled batch equal train_dpo.py's on the same pairs
    rebuilt in its layout (right-padded, from the unpadded rows), over the pairs that carry a
    preference; each chosen response has the higher gold reward of its prompt's two."""
    policy, tok = load_gpt(sft_pairs[0])
    reference = load_gpt(sft_pairs[0])[0].eval()
    policy.eval()
    with torch.no_grad():  # a policy that is not the reference, so the loss is not ln 2 everywhere
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = train_online_dpo.Config(reward="gold", batch_size=16, gen_chunk=16, beta=0.5)
    from data import load_prompts
    prompts = load_prompts(f"{toy_dir}/prompts_train.jsonl")
    data, P = collect_rollouts(policy, Rewards(functions=[("gold", toy_gold_reward)]), tok, prompts,
                               [tok.encode_prompt(p) for p in prompts], 0, 32, cfg, CPU, NO_AUTOCAST)
    pairs, weights = rollout_pairs(data["input_ids"], data["attention_mask"], data["scores"], 2, P)
    assert 0 < weights.sum() < 16  # ties occur under the gold reward, and are left out
    kept = weights.nonzero().flatten().tolist()
    chosen, rejected = [], []
    for i in kept:
        texts = [tok.decode(data["input_ids"][2 * i + j, P:][data["response_mask"][2 * i + j] == 1].tolist())
                 for j in (0, 1)]
        prompt = tok.decode(unpadded(data, 2 * i, P)[0][:unpadded(data, 2 * i, P)[1]])
        golds = [gold_reward(t, prompt) for t in texts]
        win = int(golds[1] > golds[0])
        assert golds[win] > golds[1 - win]
        chosen.append(unpadded(data, 2 * i + win, P))
        rejected.append(unpadded(data, 2 * i + 1 - win, P))
    theirs = as_dpo_pairs(chosen, rejected, tok.pad_id)
    dpo_cfg = train_dpo.Config(beta=0.5)
    loss, sums = train_dpo.dpo_batch_loss(policy, theirs, reference, dpo_cfg)
    mine_loss, mine_sums, _ = train_online_dpo.online_dpo_loss(policy, reference, pairs, weights, cfg)
    assert mine_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    for k in sums:
        assert mine_sums[k].item() == pytest.approx(sums[k].item(), rel=1e-5, abs=1e-5), k
    assert loss.item() != pytest.approx(len(kept) * 0.6931, rel=1e-3)  # not the policy == reference case


def test_the_first_steps_gradient_is_the_mean_loss_over_the_pairs_with_a_preference(sft_pairs, toy_dir, tmp_path):
    """Step 1's logged gradient norm is that of DPO's loss averaged over the pairs that are not
    ties, recomputed here from the same samples (the run's seeds) on a fresh copy of the SFT model;
    averaged over every pair, ties included, it would be smaller by their share."""
    out = str(tmp_path / "run")
    assert train_online_dpo.main(online_args(sft_pairs, toy_dir, out, batch_size=16, max_iters=1)) == 0
    rows = read_metrics(out)
    policy, tok = load_gpt(sft_pairs[0])
    reference = load_gpt(sft_pairs[0])[0].eval()
    policy.eval()
    from data import load_prompts
    from ppo import shaped_scores
    prompts = load_prompts(f"{toy_dir}/prompts_train.jsonl")
    cfg = train_online_dpo.Config(batch_size=16, gen_chunk=8)
    data, P = collect_rollouts(policy, Rewards(functions=[("gold", toy_gold_reward)]), tok, prompts,
                               [tok.encode_prompt(p) for p in prompts], 0, 32, cfg, CPU, NO_AUTOCAST)
    scores = shaped_scores(data["scores"], data["ended"], rows[0]["reward_norm/mean"], rows[0]["reward_norm/std"], 1.0)
    pairs, weights = rollout_pairs(data["input_ids"], data["attention_mask"], scores, 2, P)
    assert 0 < weights.sum() < len(weights)
    loss_sum, _, _ = train_online_dpo.online_dpo_loss(policy, reference, pairs, weights, cfg)
    (loss_sum / weights.sum()).backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in policy.parameters() if p.grad is not None)).item()
    assert rows[1]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert rows[1]["pairs/ties"] == pytest.approx(1 - weights.sum().item() / len(weights))


def test_refresh_every_the_run_length_is_offline_dpo_on_pairs_sampled_once(sft_pairs, toy_dir, tmp_path, monkeypatch):
    """With --refresh_every = --max_iters every pair is sampled by the SFT model before the first
    step: train_dpo.py on those pairs (rebuilt in its layout, ordered so that its data order
    yields them step by step) logs the same training metrics and ends at the same weights."""
    steps, B = 4, 8
    reward_file = tmp_path / "by_length.py"
    reward_file.write_text(BY_LENGTH)
    common = dict(lr=3e-4, warmup_iters=1, min_lr=3e-5, weight_decay=0.0, log_interval=1, beta=0.2)
    online = str(tmp_path / "online")
    assert train_online_dpo.main(online_args(
        sft_pairs, toy_dir, online, reward="functions", reward_fn=f"{reward_file}:by_length", reward_norm=False,
        missing_eos_penalty=0.0, refresh_every=steps, max_iters=steps, batch_size=B, gen_chunk=16,
        eval_interval=steps, **common)) == 0

    # the pairs sampled once, by the SFT model, with the seeds of each step
    sft, tok = load_gpt(sft_pairs[0])
    from data import load_prompts
    prompts = load_prompts(f"{toy_dir}/prompts_train.jsonl")
    cfg = train_online_dpo.Config(batch_size=B, gen_chunk=16)
    scorer = Rewards(functions=[("by_length", load_reward_function(f"{reward_file}:by_length")[1])])
    chosen, rejected = [], []
    for t in range(steps):
        data, P = collect_rollouts(sft.eval(), scorer, tok, prompts, [tok.encode_prompt(p) for p in prompts], t, 2 * B,
                                   cfg, CPU, NO_AUTOCAST)
        for i in range(0, 2 * B, 2):
            win = int(data["scores"][i + 1] > data["scores"][i])
            chosen.append(unpadded(data, i + win, P))
            rejected.append(unpadded(data, i + 1 - win, P))
    pool = as_dpo_pairs(chosen, rejected, tok.pad_id)
    order = _epoch_order(len(chosen), 1337, 0)  # train_dpo's first epoch: step t takes order[tB:(t+1)B]
    train_data = {k: torch.empty_like(v) for k, v in pool.items()}
    for k, v in pool.items():
        train_data[k][order] = v
    monkeypatch.setattr(train_dpo, "load_pairs", lambda cfg, tok_, *a: (train_data, None, train_data, tok_))
    offline = str(tmp_path / "offline")
    pairs_dir = sft_pairs[1]
    assert train_dpo.main([f"--sft_ckpt={sft_pairs[0]}", f"--train_file={pairs_dir}/pairs_train.jsonl",
                           f"--val_file={pairs_dir}/pairs_val.jsonl", f"--out_dir={offline}", "--device=cpu",
                           f"--batch_size={B}", f"--max_iters={steps}", f"--eval_interval={steps}", "--gold_eval=false",
                           *[f"--{k}={v}" for k, v in common.items()]]) == 0

    mine, theirs = read_metrics(online), read_metrics(offline)
    trained = [r for r in theirs if "loss" in r]
    assert [r["step"] for r in trained] == list(range(1, steps + 1))
    for ours, dpo in zip([r for r in mine if "loss" in r], trained, strict=True):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                  "logps/chosen", "logps/rejected", "grad_norm", "learning_rate"):
            assert ours[k] == pytest.approx(dpo[k], rel=1e-4, abs=1e-5), (ours["step"], k)
    assert mine[-1]["pairs/ties"] == 0 and mine[-1]["samples"] == steps * 2 * B
    a, b = load_checkpoint(f"{online}/ckpt.pt")["model"], load_checkpoint(f"{offline}/ckpt.pt")["model"]
    moved = max((a[n] - load_checkpoint(sft_pairs[0])["model"][n]).abs().max().item() for n in a)
    assert moved > 1e-4
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one(parallel, sft_pairs, toy_dir, tmp_path):
    """Semi-online (a window of 2 steps, then one of 1) on the gold reward, with ties: 2 processes,
    each sampling its chunk, log the same metrics and end at the same weights as 1; under FSDP
    too, stopped at step 1, between two samplings, and resumed."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    extra = dict(refresh_every=2, batch_size=16, eval_interval=3, early_eval_interval=1, early_eval_until=2)
    assert train_online_dpo.main(online_args(sft_pairs, toy_dir, one, **extra)) == 0
    args = online_args(sft_pairs, toy_dir, two, parallel=parallel, **extra)
    if parallel == "fsdp":  # Ctrl-C on both ranks at step 2's labelling, after step 1's checkpoint, then resumed
        r = run_ranks(2, "-c", STOP_AT_STEP_2, *args)
        assert r.returncode == 130 and load_checkpoint(f"{two}/ckpt.pt")["step"] == 1, r.stderr
        args.append("--resume")
    r = run_ranks(2, "train_online_dpo.py", *args)
    assert r.returncode == 0, r.stderr
    a, b = load_checkpoint(f"{one}/ckpt.pt"), load_checkpoint(f"{two}/ckpt.pt")
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=1e-5, msg=name)
    rows = read_metrics(one)
    assert rows[1]["pairs/ties"] > 0  # ties are left out: the first step's loss, the policy still the
    assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # reference, is ln 2 over the pairs kept
    for x, y in zip(rows, read_metrics(two), strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], abs=1e-4), k


def test_a_run_resumed_between_two_samplings_equals_the_uninterrupted_one(sft_pairs, toy_dir, tmp_path, monkeypatch):
    """Stopped after step 2 of a 3-step window, the resumed run samples steps 3 with the weights of
    step 0, as the uninterrupted run did, and ends at the same weights and metrics."""
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    extra = dict(refresh_every=3, max_iters=4, eval_interval=2)
    assert train_online_dpo.main(online_args(sft_pairs, toy_dir, whole, **extra)) == 0
    calls = []

    def stop_at_step_3(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return rollout_pairs(*args)
    monkeypatch.setattr(train_online_dpo, "rollout_pairs", stop_at_step_3)
    assert train_online_dpo.main(online_args(sft_pairs, toy_dir, split, **extra)) == 128 + 2
    assert load_checkpoint(f"{split}/ckpt.pt")["step"] == 2
    monkeypatch.undo()
    assert train_online_dpo.main(online_args(sft_pairs, toy_dir, split, resume=True, **extra)) == 0
    assert read_metrics(split) == read_metrics(whole)
    a, b = load_checkpoint(f"{whole}/ckpt.pt"), load_checkpoint(f"{split}/ckpt.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(b["model"][name], tensor), name


@pytest.mark.parametrize("case", ["refresh_every changed", "window_weights missing", "reward_norm damaged"])
def test_a_resume_that_cannot_sample_its_window_as_before_is_one_line_and_changes_nothing(case, sft_pairs, toy_dir,
                                                                                          tmp_path, capsys):
    """A checkpoint written at a window's end, resumed at another --refresh_every that puts it
    inside one, has no weights to sample the rest with; a damaged one lacks them or its reward
    normalisation. Each is one line naming the flag or field, status 2, the folder as it was."""
    out = str(tmp_path / "run")
    extra = dict(max_iters=2, eval_interval=2)
    assert train_online_dpo.main(online_args(sft_pairs, toy_dir, out, **extra)) == 0  # --refresh_every 1
    path = os.path.join(out, "ckpt.pt")
    flags = dict(extra, max_iters=4, resume=True, refresh_every=3)
    if case != "refresh_every changed":
        ckpt = torch.load(path, weights_only=True)
        ckpt["config"]["refresh_every"] = 3  # as if written inside a window of 3
        if case == "reward_norm damaged":
            ckpt["reward_norm"] = [0.5, 0.0]
        torch.save(ckpt, path)
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    capsys.readouterr()
    assert train_online_dpo.main(online_args(sft_pairs, toy_dir, out, **flags)) == 2
    err = capsys.readouterr().err
    expected = {"refresh_every changed": "--refresh_every 3: the run in", "window_weights missing":
                "'window_weights' is missing", "reward_norm damaged": "'reward_norm' is not a mean"}[case]
    assert expected in err and err.count("\n") == 1, err
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before


@pytest.mark.slow
def test_short_online_dpo_run_raises_the_gold_reward(sft_pairs, toy_dir, tmp_path):
    """20 steps of 32 prompts on the gold reward: the mean gold reward of samples for 128 held-out
    prompts rises by at least 0.05 over the SFT model's (step 0 of the same run)."""
    out = str(tmp_path / "run")
    assert train_online_dpo.main(online_args(sft_pairs, toy_dir, out, batch_size=32, gen_chunk=32, max_iters=20,
                                             eval_interval=20, gold_eval=True, eval_samples=128, lr=3e-4,
                                             eval_prompts=f"{toy_dir}/prompts_val.jsonl")) == 0
    rows = [r for r in read_metrics(out) if "eval/gold_reward" in r]
    assert rows[-1]["eval/gold_reward"] > rows[0]["eval/gold_reward"] + 0.05, rows
    assert rows[-1]["eval/kl"] > 0


@pytest.mark.parametrize("flags, message", [
    (["--refresh_every=0"], "--refresh_every 0: at least 1"),
    (["--samples_per_prompt=1"], "--samples_per_prompt must be 2 or more"),
    (["--batch_size=10"], "--batch_size x --samples_per_prompt must be a multiple of --gen_chunk"),
    (["--beta=0"], "--beta 0.0: must be a finite number above 0"),
    (["--reward=functions"], "--reward functions: give the functions"),
    (["--reward_norm_batches=0"], "--reward_norm_batches must be at least 1"),
])
def test_bad_settings_are_one_line_before_anything_is_written(flags, message, sft_pairs, toy_dir, tmp_path):
    out = tmp_path / "out"
    r = run_python("train_online_dpo.py", *online_args(sft_pairs, toy_dir, str(out)), *flags)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists()


def test_help_explains_every_flag():
    r = run_python("train_online_dpo.py", "--help")
    assert r.returncode == 0
    for flag in ("--refresh_every", "--samples_per_prompt", "--beta", "--reward_ckpt", "--reward_fn"):
        assert flag in r.stdout
