"""The study: its ceiling at a huge beta is the reference, plot.py without matplotlib, a tiny
end-to-end compare.py run with every output (and every stage's TensorBoard events), and its tables (seed averages, KL-matched gold
reward, wins per seed). The frontier, the tilts and best-of-N themselves: tests/test_ceiling.py.

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
from conftest import read_metrics
from evaluate import sample_completions
from test_trackers import assert_same_rows, events, scalars_by_step
from tokenizer import Tokenizer


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
    assert gold == pytest.approx(rewards.mean().item(),
                                 abs=4 * rewards.std().item() / math.sqrt(100 * len(prompts)))


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
def test_tiny_study_writes_every_output_and_resumes(toy_study, capsys):
    out, args = toy_study
    for name in ["results.md", "results.csv", "results.json", "kl_matched.json", "frontier.png",
                 "kl_traces.png", "curves.png"]:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    methods = {r["method"] for r in rows}
    assert methods == {"SFT", "DPO", "PPO", "RLOO", "GRPO", "online DPO", "preferred-FT", "best-of-N", "optimal",
                       "optimal (all prompts)"}  # the gold-reward twins only with --gold_twins or --budget full
    # samples drawn: sample.py's k=4 for each of 64 training and 32 held-out prompts; an online DPO and a PPO run
    # sample 2 steps and a normalising batch of 32 responses, and count the reward model's pairs
    drawn = {(r["method"], r["setting"]): float(r["drawn"]) for r in rows if r["drawn"] != ""}
    assert drawn[("DPO", "beta=0.1")] == 4 * (64 + 32)
    assert drawn[("online DPO", "beta=0.1")] == drawn[("PPO", "kl_target=2.0")] == 3 * 32 + 4 * (64 + 32)
    for r in rows:
        assert math.isfinite(float(r["gold_reward"])) and math.isfinite(float(r["kl"])), r
    runs = ["sft", "dpo_beta0.1", "dpo_beta1.0", "rm", "ppo_kl2.0", "rloo_kl2.0", "grpo_c0.05", "online_dpo_beta0.1",
            "online_dpo_beta1.0", "pft"]
    for run in runs:
        assert os.path.getsize(os.path.join(out, "seed0", run, "metrics.jsonl")) > 0, run
        assert_same_rows(scalars_by_step(events(os.path.join(out, "seed0", run))),
                         read_metrics(os.path.join(out, "seed0", run)))
    with open(os.path.join(out, "results.json")) as f:
        assert all(len(r["path"]) >= 2 for r in json.load(f) if r["method"] in ("DPO", "PPO", "RLOO", "GRPO",
                                                                                "online DPO"))
    with open(os.path.join(out, "seed0", "grpo_c0.05", "config.json")) as f:
        assert json.load(f)["advantage"] == "grpo"
    capsys.readouterr()
    assert compare.main(args) == 0  # a second run reuses every finished stage, whatever --report_to
    log = capsys.readouterr().out
    assert log.count("reused") == len(runs) + 1  # + the pairs
    assert "running" not in log
    assert compare.main(args + ["--ceiling_only"]) == 0  # the ceiling alone, from the same SFT model
    assert "reused" in capsys.readouterr().out
    with open(os.path.join(out, "results.json")) as f, open(os.path.join(out, "ceiling.json")) as g:
        study_rows, ceiling_rows = ([{k: r[k] for k in ("method", "setting", "gold_reward", "kl", "reached")}
                                     for r in json.load(h) if r["method"].startswith("optimal")]
                                    for h in (f, g))
    assert ceiling_rows == study_rows and len(study_rows) == 2 * len(compare.CEILING_BETAS)


@pytest.mark.parametrize("check", [0, 9])
def test_the_ceilings_check_on_all_prompts_is_estimated_only_with_its_samples(tiny_gpt, toy_dir,
                                                                              monkeypatch, check):
    tok = Tokenizer.load(f"{toy_dir}/tokenizer.model")
    monkeypatch.setattr(compare, "CEILING_BETAS", [1.0])
    cfg = compare.Config(ceiling_prompts=1, ceiling_samples=9, ceiling_check_samples=check)
    rows = compare.ceiling_rows(cfg, tiny_gpt, tok, ["the film was", "i"], seed=0)
    expected = [("optimal", 1, 9)] + ([("optimal (all prompts)", 2, 9)] if check else [])
    assert [(r["method"], r["prompts"], r["samples"]) for r in rows] == expected


@pytest.mark.parametrize("flag", ["--ceiling_samples=8", "--ceiling_check_samples=4"])
def test_too_few_ceiling_samples_for_its_tilts_stop_before_anything_is_written(flag, tmp_path, capsys):
    assert compare.main([flag, f"--out_dir={tmp_path / 'study'}", f"--data_dir={tmp_path / 'toy'}"]) == 2
    assert "at least 9" in capsys.readouterr().err and not os.listdir(tmp_path)


def test_the_gold_reward_twins_train_each_rl_run_again_on_the_gold_reward():
    S = compare.sweeps(compare.Config(budget="tiny"), toy=True)
    alone, twins = compare.rl_runs(S, gold_twins=False), compare.rl_runs(S, gold_twins=True)
    assert [m for m, *_ in alone] == ["PPO", "RLOO", "GRPO"]
    assert [m for m, *_ in twins] == ["PPO", "PPO-GT", "RLOO", "RLOO-GT", "GRPO", "GRPO-GT"]
    for (_, setting, folder, flags), (_, gt_setting, gt_folder, gt_flags) in zip(twins[::2], twins[1::2]):
        assert flags["reward"] == "model" and gt_flags == dict(flags, reward="gold")
        assert gt_setting == setting and gt_folder == folder.replace("_", "_gt_", 1)


def test_online_dpo_runs_on_the_reward_model_at_dpos_betas_and_on_the_gold_reward_as_twins():
    S = compare.sweeps(compare.Config(budget="tiny"), toy=True)
    alone, twins = compare.online_runs(S, gold_twins=False), compare.online_runs(S, gold_twins=True)
    assert [(m, s, f) for m, s, f, _ in alone] == [("online DPO", "beta=0.1", "online_dpo_beta0.1"),
                                                   ("online DPO", "beta=1.0", "online_dpo_beta1.0")]
    assert [f for *_, f, _ in twins] == ["online_dpo_beta0.1", "online_dpo_beta1.0", "online_dpo_gt_beta0.1",
                                        "online_dpo_gt_beta1.0"]
    assert [k["reward"] for *_, k in twins] == ["model", "model", "gold", "gold"]


def test_summary_averages_over_seeds_and_reports_their_spread():
    rows = [{"method": "DPO", "setting": "beta=0.1", "gold_reward": g, "ci95": 0.02, "kl": k, "win_rate": 0.9,
             "wall_s": 10.0, "tokens": 100, "drawn": d} for g, k, d in [(0.8, 5.0, 10), (0.9, 7.0, 20)]]
    rows.append({"method": "best-of-N", "setting": "N=4", "gold_reward": 0.7, "ci95": None, "kl": 0.64,
                 "win_rate": 0.8, "wall_s": None, "tokens": None, "drawn": 1024})
    dpo, bon = compare.summarise(rows)
    assert dpo["gold_reward"] == pytest.approx(0.85) and dpo["kl"] == pytest.approx(6.0) and dpo["seeds"] == 2
    assert dpo["drawn"] == 15 and bon["drawn"] == 1024
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
    rows = [run_row("DPO", 0, [(0.0, 0.5), (2.0, 0.7)], "a"),
            run_row("DPO", 0, [(0.0, 0.5), (1.0, 0.8), (9.0, 0.9)], "b"),
            run_row("DPO", 1, [(0.0, 0.5), (2.0, 0.6), (4.0, 0.9)], "a"),
            run_row("DPO", 2, [(0.0, 0.5), (2.0, 0.7)], "a")]
    rows += [{"method": "optimal", "setting": f"beta={b}", "seed": 0, "kl": k, "gold_reward": g,
              "reached": ok, "path": []}
             for b, k, g, ok in [(1, 0.5, 0.6, True), (0.1, 3.0, 0.8, True), (0.01, 6.0, 0.95, False)]]
    dpo, optimal = compare.kl_matched(rows, n_seeds=3)
    at1 = [0.8, 0.55, 0.6]  # seed 0: setting b (0.8) beats a (0.6)
    assert dpo[1.0]["gold_reward"] == pytest.approx(sum(at1) / 3)
    sd = math.sqrt(sum((v - sum(at1) / 3) ** 2 for v in at1) / 2)
    assert dpo[1.0]["ci95"] == pytest.approx(4.303 * sd / math.sqrt(3))  # t with 2 degrees of freedom
    # seed 2 never gets there
    assert dpo[4.0]["seeds"] == 2 and dpo[4.0]["gold_reward"] == pytest.approx((0.8375 + 0.9) / 2)
    assert (dpo[8.0]["seeds"] == 1 and dpo[8.0]["gold_reward"] == pytest.approx(0.8875)
            and dpo[8.0]["ci95"] is None)
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
    assert ppo[2.0] == (1, 2)  # DPO's seed 2 stops at 1.5: PPO loses seed 0 (0.65 < 0.7), wins seed 1
                               # (0.65 > 0.6)
    assert ppo[8.0] == (0, 0)
