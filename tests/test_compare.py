"""The study: the importance-weighted optimal frontier against exact enumeration, best-of-N,
plot.py without matplotlib, and a tiny end-to-end compare.py run with every output.

    python -m pytest -q tests/test_compare.py
"""
import builtins
import csv
import json
import math
import os

import pytest
import torch

import compare
import plot
from ceiling import SentimentTilt, best_of_n, completion_logprobs, mixture_log_ratio, optimal_frontier
from evaluate import sample_completions
from model import GPT, GPTConfig
from tokenizer import Tokenizer
from toy import POLARITY


def test_importance_weighted_frontier_matches_the_exact_optimal_policy():
    """A discrete reference over 6 responses: pi*(y) = p(y) exp(r(y)/beta) / Z enumerated
    exactly, against the estimate from 200000 reference samples."""
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03], dtype=torch.float64)
    r = torch.tensor([0.1, 0.3, 0.5, 0.6, 0.8, 0.95], dtype=torch.float64)
    draws = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    betas = [1.0, 0.3, 0.1, 0.05]
    estimates = optimal_frontier(r[draws][None], betas)
    for beta, (b, gold, kl, reached) in zip(betas, estimates, strict=True):
        pi = p * torch.exp(r / beta)
        pi /= pi.sum()
        exact_gold, exact_kl = (pi * r).sum().item(), (pi * (pi / p).log()).sum().item()
        assert b == beta and reached
        assert gold == pytest.approx(exact_gold, abs=0.005)
        assert kl == pytest.approx(exact_kl, rel=0.03, abs=0.002)


def test_frontier_at_large_beta_is_the_reference_and_kl_is_capped_by_log_k():
    rewards = torch.rand(3, 50, generator=torch.Generator().manual_seed(0))
    (_, gold, kl, reached), (_, _, kl_sharp, reached_sharp) = optimal_frontier(rewards, [1e6, 1e-6])
    assert gold == pytest.approx(rewards.double().mean().item(), abs=1e-6) and kl == pytest.approx(0, abs=1e-9)
    assert kl_sharp == pytest.approx(math.log(50), abs=1e-6)  # all weight on one of 50 samples
    assert reached and not reached_sharp  # effective sample size 50, then 1


def test_a_proposal_near_the_optimum_extends_the_frontier_where_reference_samples_fall_short():
    """60 responses whose reward rises as the reference makes them rarer, so pi* at small beta
    puts its mass where the reference rarely samples. Half the samples from a tilted proposal
    g ~ p exp(r / 0.02), weighted by p / (p/2 + g/2), recover the exact gold reward and KL up to
    KL 8.6; the reference's samples alone fall short there, and those points are marked."""
    n, M, K = 60, 8, 2000
    p = torch.exp(-0.12 * torch.arange(n, dtype=torch.float64))
    p /= p.sum()
    r = torch.arange(n, dtype=torch.float64) / (n - 1)
    g = p * torch.exp(r / 0.02)
    g /= g.sum()
    generator = torch.Generator().manual_seed(0)
    draw = lambda dist, k: torch.multinomial(dist, M * k, replacement=True, generator=generator).view(M, k)
    from_reference, mixed = draw(p, K), torch.cat([draw(p, K // 2), draw(g, K // 2)], dim=1)
    log_ratio = mixture_log_ratio(p.log(), torch.stack([p.log(), g.log()]))  # log p / (p/2 + g/2), (n,)
    assert torch.allclose(log_ratio, p.log() - (torch.logaddexp(p.log(), g.log()) - math.log(2)))
    betas = [1.0, 0.3, 0.1, 0.05, 0.02, 0.01]
    reference_only = optimal_frontier(r[from_reference], betas)
    with_proposal = optimal_frontier(r[mixed], betas, log_ratio=log_ratio[mixed])
    for beta, ref_point, mix_point in zip(betas, reference_only, with_proposal, strict=True):
        pi = p * torch.exp(r / beta)
        pi /= pi.sum()
        exact_gold, exact_kl = (pi * r).sum().item(), (pi * (pi / p).log()).sum().item()
        _, gold, kl, reached = mix_point
        assert reached and gold == pytest.approx(exact_gold, abs=0.006) and kl == pytest.approx(exact_kl, rel=0.02)
        _, gold, kl, reached = ref_point
        if beta <= 0.05:
            assert not reached and kl < exact_kl - 0.5  # beyond the reference samples' reach, and marked
    assert with_proposal[-1][2] > 8.5


def test_a_ladder_of_proposals_covers_the_kls_between_the_reference_and_one_far_proposal():
    """The same 60 responses with 120 samples a prompt, as the study draws. Split between the
    reference and one proposal tilted for KL 8.6, the weights at beta = 0.1 (KL 3.5) fall on a
    few samples: the estimate is low and marked. Split in equal numbers between the reference
    and proposals tilted for KL 3.5, 7.2 and 8.6, weighted against their mixture, every point
    matches exact enumeration and is reached."""
    n, M, K = 60, 64, 120
    p = torch.exp(-0.12 * torch.arange(n, dtype=torch.float64))
    p /= p.sum()
    r = torch.arange(n, dtype=torch.float64) / (n - 1)
    tilted = lambda beta: (p * torch.exp(r / beta)) / (p * torch.exp(r / beta)).sum()
    generator = torch.Generator().manual_seed(0)
    betas = [1.0, 0.3, 0.1, 0.05, 0.03, 0.02, 0.01]

    def frontier(policies):
        per_policy = K // len(policies)
        draws = torch.cat([torch.multinomial(q, M * per_policy, replacement=True, generator=generator).view(M, per_policy)
                           for q in policies], dim=1)  # (M, K), as the rewards in ceiling_study
        log_ratio = mixture_log_ratio(p.log(), torch.stack([q.log() for q in policies]))
        return optimal_frontier(r[draws], betas, log_ratio=log_ratio[draws])

    far, ladder = frontier([p, tilted(0.01)]), frontier([p, tilted(0.1), tilted(0.03), tilted(0.01)])
    for beta, (_, gold, kl, reached) in zip(betas, ladder, strict=True):
        pi = tilted(beta)
        exact_gold, exact_kl = (pi * r).sum().item(), (pi * (pi / p).log()).sum().item()
        assert reached and gold == pytest.approx(exact_gold, abs=0.008) and kl == pytest.approx(exact_kl, rel=0.02, abs=0.03)
    _, gold, _, reached = far[2]
    assert not reached and gold < (tilted(0.1) * r).sum().item() - 0.01


@pytest.fixture(scope="module")
def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


def word_signs(tok: Tokenizer, prompt: str, completion_ids: list[int]) -> list[dict[int, int]]:
    """By hand, as data.gold_reward reads words: before each completion token, the sign each
    one-token sentiment word would add to the net count (flipped inside a sentence after "not")."""
    negated = False
    for word in prompt.split():
        negated = (negated or word == "not") and word != "."
    signs = []
    for token in completion_ids:
        signs.append({tok.encode(w)[0]: -s if negated else s for w, s in POLARITY.items() if len(tok.encode(w)) == 1})
        word = tok.decode([token]).strip()
        negated = (negated or word == "not") and word != "."
    return signs


def test_tilted_logprobs_are_the_reference_logits_shifted_by_the_gold_rewards_word_signs(tiny_gpt, toy_dir):
    """log q_b(y) = sum_t log softmax(logits_t + b * sign_t - b / 2 at eos)[y_t], against a float64
    loop with the signs read word by word as the gold reward reads them; strength 0 is the reference."""
    tok = Tokenizer.load(f"{toy_dir}/tokenizer.model")
    prompts = ["the movie", "the plot was not", "i loved it . the story was"]
    completions = [tok.encode("was great . the cast was not dull .") + [tok.eos_id],
                   tok.encode("great . the acting was awful .") + [tok.eos_id],
                   tok.encode("not bad . not great")]
    prompt_ids = [tok.encode_prompt(p) for p in prompts]
    tilts = [SentimentTilt(tok, 0.0), SentimentTilt(tok, 1.5)]
    got = completion_logprobs(tiny_gpt, prompt_ids, completions, tok.pad_id, tilts=tilts)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got[0], completion_logprobs(tiny_gpt, prompt_ids, completions, tok.pad_id))
    for i, (prompt, p, c) in enumerate(zip(prompts, prompt_ids, completions)):
        with torch.no_grad():
            logits = tiny_gpt(torch.tensor([p + c]))[0].double()
        expected = 0.0
        for t, (token, signs) in enumerate(zip(c, word_signs(tok, prompt, c))):
            shifted = logits[len(p) - 1 + t].clone()
            for word_id, sign in signs.items():
                shifted[word_id] += 1.5 * sign
            shifted[tok.eos_id] -= 0.75
            expected += shifted.log_softmax(-1)[token].item()
        assert got[1, i].item() == pytest.approx(expected, rel=1e-5)


def test_generation_with_a_tilt_samples_the_tilted_distribution(tiny_gpt, toy_dir):
    """The sampler and the density the weights use must be one distribution: the share of first
    tokens that are positive words, sampled through generate's logits_processor, matches the
    tilted probability completion_logprobs gives them, after a plain prompt and a negated one
    (where the tilt favours negative words instead)."""
    tok = Tokenizer.load(f"{toy_dir}/tokenizer.model")
    tilt = SentimentTilt(tok, 2.0)
    positive = [tok.encode(w)[0] for w, s in POLARITY.items() if s > 0]
    for prompt in ["the film was", "the film was not"]:
        ids, _, _ = sample_completions(tiny_gpt, tok, [prompt] * 4000, 1, seed=0, batch_size=1000, logits_processor=tilt)
        share = sum(c[0] in positive for c in ids) / len(ids)
        logp = completion_logprobs(tiny_gpt, [tok.encode_prompt(prompt)] * len(positive), [[w] for w in positive],
                                   tok.pad_id, tilts=[tilt])[0]
        expected = logp.exp().sum().item()
        untilted = completion_logprobs(tiny_gpt, [tok.encode_prompt(prompt)] * len(positive), [[w] for w in positive],
                                       tok.pad_id).exp().sum().item()
        assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / len(ids))
        assert expected > 2 * untilted if prompt.endswith("was") else expected < untilted / 2


def test_the_ceiling_at_a_huge_beta_is_the_reference_though_most_samples_come_from_tilts(tiny_gpt, toy_dir,
                                                                                        monkeypatch):
    """At beta -> infinity pi* is the reference: weighted against the mixture of the tilts, samples
    that are 8/9 tilted must give back the reference's own mean gold reward (from plain samples)
    and KL ~ 0. A weight against the wrong density drags the estimate towards the tilts'."""
    tok = Tokenizer.load(f"{toy_dir}/tokenizer.model")
    monkeypatch.setattr(compare, "CEILING_BETAS", [1e9])
    prompts = ["the film was", "i", "the plot was not", "the cast"]
    ((_, gold, kl, reached),) = compare.ceiling_study(tiny_gpt, tok, prompts, 9 * 100, seed=0)
    _, texts, _ = sample_completions(tiny_gpt, tok, prompts * 500, 40, seed=1, batch_size=500)
    rewards = torch.tensor([compare.gold_reward(t, p) for t, p in zip(texts, prompts * 500)])
    assert reached and abs(kl) < 0.05
    assert gold == pytest.approx(rewards.mean().item(), abs=4 * rewards.std().item() / math.sqrt(100 * len(prompts)))


def test_best_of_n_keeps_the_sample_the_reward_model_ranks_first():
    gold = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    scores = torch.tensor([[0.0, -1.0, 2.0, 3.0]])  # the reward model disagrees with gold on sample 1
    rows = best_of_n(gold, scores, [1, 2, 4])
    assert [g for _, g, _ in rows] == pytest.approx([0.1, 0.1, 0.7])
    assert [kl for *_, kl in rows] == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])


def test_plot_without_matplotlib_prints_one_line(monkeypatch, capsys, tmp_path):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    plot.frontier("unused.json", str(tmp_path / "f.png"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install matplotlib" in err
    assert not (tmp_path / "f.png").exists()


def test_plot_curves_names_a_key_missing_from_a_file_and_draws_the_others(capsys, tmp_path):
    """A mistyped key gives one stderr line naming it, the file and the keys it has; a key the
    file has gives none, and the figure is still drawn."""
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / (s + 1), "eval/gold_reward": 0.1 * s}) + "\n"
                            for s in range(3)))
    plot.main(["curves", str(path), "--keys", "loss", "eval/gold_rewrd", "--out", str(tmp_path / "c.png")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "'eval/gold_rewrd'" in err and str(path) in err and "eval/gold_reward" in err
    assert (tmp_path / "c.png").exists()
    plot.main(["curves", str(path), "--keys", "loss", "eval/gold_reward", "--out", str(tmp_path / "d.png")])
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_tiny_study_writes_every_output_and_resumes(toy_dir, tmp_path, capsys):
    out = str(tmp_path / "study")
    args = ["--tiny", f"--out_dir={out}", f"--data_dir={toy_dir}", "--device=cpu", "--eval_samples=32",
            "--bon_max=4", "--ceiling_prompts=8", "--ceiling_samples=32", "--ceiling_check_samples=18"]
    assert compare.main(args) == 0
    for name in ["results.md", "results.csv", "results.json", "kl_matched.json", "frontier.png", "kl_traces.png",
                 "curves.png"]:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    methods = {r["method"] for r in rows}
    assert methods == {"SFT", "DPO", "PPO", "PPO-GT", "RLOO", "RLOO-GT", "GRPO", "GRPO-GT", "preferred-FT", "best-of-N",
                       "optimal", "optimal (all prompts)"}
    for r in rows:
        assert math.isfinite(float(r["gold_reward"])) and math.isfinite(float(r["kl"])), r
    runs = ["sft", "dpo_beta0.1", "dpo_beta1.0", "rm", "ppo_kl2.0", "ppo_gt_kl2.0", "rloo_kl2.0", "rloo_gt_kl2.0",
            "grpo_c0.05", "grpo_gt_c0.05", "pft"]
    for run in runs:
        assert os.path.getsize(os.path.join(out, "seed0", run, "metrics.jsonl")) > 0, run
    with open(os.path.join(out, "results.json")) as f:
        assert all(len(r["path"]) >= 2 for r in json.load(f) if r["method"] in ("DPO", "PPO", "RLOO-GT", "GRPO"))
    with open(os.path.join(out, "seed0", "grpo_c0.05", "config.json")) as f:
        assert json.load(f)["advantage"] == "grpo"
    capsys.readouterr()
    assert compare.main(args) == 0  # a second run reuses every finished stage
    log = capsys.readouterr().out
    assert log.count("reused") == len(runs) + 1  # + the pairs
    assert "running" not in log
    assert compare.main(args + ["--ceiling_only"]) == 0  # the ceiling alone, from the same SFT model
    assert "reused" in capsys.readouterr().out
    with open(os.path.join(out, "results.json")) as f, open(os.path.join(out, "ceiling.json")) as g:
        study_rows, ceiling_rows = ([{k: r[k] for k in ("method", "setting", "gold_reward", "kl", "reached")}
                                     for r in json.load(h) if r["method"].startswith("optimal")] for h in (f, g))
    assert ceiling_rows == study_rows and len(study_rows) == 2 * len(compare.CEILING_BETAS)


def test_summary_averages_over_seeds_and_reports_their_spread():
    rows = [{"method": "DPO", "setting": "beta=0.1", "gold_reward": g, "ci95": 0.02, "kl": k, "win_rate": 0.9,
             "wall_s": 10.0, "tokens": 100} for g, k in [(0.8, 5.0), (0.9, 7.0)]]
    rows.append({"method": "best-of-N", "setting": "N=4", "gold_reward": 0.7, "ci95": None, "kl": 0.64,
                 "win_rate": 0.8, "wall_s": None, "tokens": None})
    dpo, bon = compare.summarise(rows)
    assert dpo["gold_reward"] == pytest.approx(0.85) and dpo["kl"] == pytest.approx(6.0) and dpo["seeds"] == 2
    assert dpo["seed_std"] == pytest.approx(math.sqrt(0.005))  # sample standard deviation of 0.8 and 0.9
    assert bon["seed_std"] is None and bon["ci95"] is None and bon["seeds"] == 1


def test_gold_at_kl_interpolates_where_the_path_first_reaches_it():
    path = [(0.0, 0.5), (2.0, 0.7), (6.0, 0.9), (3.0, 0.95)]  # overshoots to 6, comes back to 3
    assert compare.gold_at_kl(path, 1.0) == pytest.approx(0.6)
    assert compare.gold_at_kl(path, 4.0) == pytest.approx(0.8)  # on the way out, not on the way back
    assert compare.gold_at_kl(path, 8.0) is None


def run_row(method, seed, path, setting="s"):
    return {"method": method, "setting": setting, "seed": seed, "path": path, "kl": path[-1][0],
            "gold_reward": path[-1][1]}


def test_kl_matched_table_takes_the_best_setting_per_seed_and_a_t_interval_over_seeds():
    rows = [run_row("DPO", 0, [(0.0, 0.5), (2.0, 0.7)], "a"), run_row("DPO", 0, [(0.0, 0.5), (1.0, 0.8), (9.0, 0.9)], "b"),
            run_row("DPO", 1, [(0.0, 0.5), (2.0, 0.6), (4.0, 0.9)], "a"), run_row("DPO", 2, [(0.0, 0.5), (2.0, 0.7)], "a")]
    rows += [{"method": "optimal", "setting": f"beta={b}", "seed": 0, "kl": k, "gold_reward": g, "reached": ok, "path": []}
             for b, k, g, ok in [(1, 0.5, 0.6, True), (0.1, 3.0, 0.8, True), (0.01, 6.0, 0.95, False)]]
    dpo, optimal = compare.kl_matched(rows, n_seeds=3)
    at1 = [0.8, 0.55, 0.6]  # seed 0: setting b (0.8) beats a (0.6)
    assert dpo[1.0]["gold_reward"] == pytest.approx(sum(at1) / 3)
    sd = math.sqrt(sum((v - sum(at1) / 3) ** 2 for v in at1) / 2)
    assert dpo[1.0]["ci95"] == pytest.approx(4.303 * sd / math.sqrt(3))  # t with 2 degrees of freedom
    assert dpo[4.0]["seeds"] == 2 and dpo[4.0]["gold_reward"] == pytest.approx((0.8375 + 0.9) / 2)  # seed 2 never gets there
    assert dpo[8.0]["seeds"] == 1 and dpo[8.0]["gold_reward"] == pytest.approx(0.8875) and dpo[8.0]["ci95"] is None
    assert optimal[2.0]["gold_reward"] == pytest.approx(0.72) and not optimal[2.0]["beyond_reach"]
    assert optimal[4.0]["beyond_reach"] and optimal[8.0]["gold_reward"] is None
    assert "(2/3 seeds)" in compare.kl_cell(dpo[4.0]) and "†" in compare.kl_cell(optimal[4.0])


def test_seeds_beating_counts_wins_only_on_seeds_where_both_methods_reach_the_kl():
    rows = [run_row("DPO", 0, [(0.0, 0.5), (4.0, 0.9)]), run_row("DPO", 1, [(0.0, 0.5), (4.0, 0.7)]),
            run_row("DPO", 2, [(0.0, 0.5), (1.5, 0.6)]),
            run_row("PPO", 0, [(0.0, 0.5), (4.0, 0.8)]), run_row("PPO", 1, [(0.0, 0.5), (4.0, 0.8)]),
            run_row("PPO", 2, [(0.0, 0.5), (4.0, 0.99)])]
    (ppo,) = compare.seeds_beating(compare.kl_matched(rows, n_seeds=3), "DPO")
    assert ppo[1.0] == (2, 3)  # at KL 1: PPO 0.575 < 0.6, 0.575 > 0.55, 0.6225 > 0.567
    assert ppo[2.0] == (1, 2)  # DPO's seed 2 stops at 1.5: PPO loses seed 0 (0.65 < 0.7), wins seed 1 (0.65 > 0.6)
    assert ppo[8.0] == (0, 0)
