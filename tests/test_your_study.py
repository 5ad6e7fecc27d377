"""The study on your model (compare.py --model): a tiny random Qwen3-style folder with a ChatML
template, UltraFeedback pairs and a random reward-model folder of another tokenizer as the judge
run every stage at --budget tiny, and every method's row and the table come out; an interrupted
study reruns only its unfinished stage; bad settings are one line before anything is written;
and the toy study run through --model on its own exported SFT model, with the gold reward as
labeller and judge, gives the toy study's numbers.

    python -m pytest -q tests/test_your_study.py
"""
import csv
import json
import os

import pytest
import torch
import transformers

import compare
import export
import sample
from conftest import run_ranks
from test_rewards import write_reward_folder
from test_your_model import question, write_jsonl, write_user_files

pytestmark = pytest.mark.slow
METHODS = {"SFT", "DPO", "PPO", "RLOO", "GRPO", "online DPO", "best-of-N"}
RUNS = ["dpo_beta0.1", "dpo_beta1.0", "rm", "ppo_kl2.0", "rloo_kl2.0", "grpo_c0.05", "online_dpo_beta0.1",
        "online_dpo_beta1.0"]


@pytest.fixture(scope="module")
def study_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("your_study")
    write_study_files(root)
    return root


def write_study_files(root):
    """Your files: a Qwen3-style model folder (its tokenizer and ChatML template from
    test_your_model's), pairs.jsonl (64 UltraFeedback pairs), prompts.jsonl (40 questions) and a
    Qwen3 reward-model folder with a tokenizer of its own, the judge."""
    write_user_files(root)
    folder = root / "model"
    eos = json.load(open(folder / "config.json"))["eos_token_id"]
    config = transformers.Qwen3Config(vocab_size=json.load(open(folder / "config.json"))["vocab_size"], hidden_size=64,
                                      intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                                      tie_word_embeddings=True, eos_token_id=eos, bos_token_id=eos)
    torch.manual_seed(0)
    for name in os.listdir(folder):  # the Qwen2 weights give way to Qwen3's; the tokenizer stays
        if name.startswith(("model", "config", "generation")):
            os.remove(folder / name)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    write_jsonl(root / "prompts.jsonl", [{"prompt": question(i)} for i in range(300, 340)])
    write_reward_folder(str(root / "judge"), "qwen3")


def your_args(root, out, *extra):
    return [f"--model={root}/model", f"--prompts={root}/prompts.jsonl", f"--pairs={root}/pairs.jsonl",
            f"--judge={root}/judge", "--budget=tiny", f"--out_dir={out}", "--device=cpu", "--eval_samples=8",
            "--max_new_tokens=8", "--bon_max=4", *extra]


def test_the_study_on_your_model_gives_every_row_and_reruns_only_the_unfinished_stage(study_files, tmp_path,
                                                                                     capsys, monkeypatch):
    """SFT on your conversations first, every stage training LoRA adapters of rank 2. Ctrl-C in
    the middle of the last stage (online DPO beta=1.0, at its second step, after its first
    checkpoint) stops the study with the command that goes on; that command reuses the 8
    finished stages and resumes the last from its checkpoint."""
    import train_online_dpo
    out = tmp_path / "study"
    args = your_args(study_files, out, f"--sft_file={study_files}/sft.jsonl", "--lora_rank=2")
    label, calls = train_online_dpo.rollout_pairs, []

    def ctrl_c_at_the_fourth_step(*step):  # 2 steps of beta=0.1, then beta=1.0's first and second
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return label(*step)
    monkeypatch.setattr(train_online_dpo, "rollout_pairs", ctrl_c_at_the_fourth_step)
    assert compare.main(args) == 130
    captured = capsys.readouterr()
    assert "(9/9) online DPO beta=1.0: running" in captured.out and "done in" not in captured.out.split("(9/9)")[-1]
    assert "(8/9) online DPO beta=0.1: done in" in captured.out and " s left" in captured.out
    assert f"python compare.py {' '.join(args)}" in captured.err and "interrupted" in captured.err
    monkeypatch.setattr(train_online_dpo, "rollout_pairs", label)
    assert compare.main(args) == 0
    log = capsys.readouterr().out
    assert log.count("reused") == 8 and log.count("(9/9) online DPO beta=1.0: resuming") == 1
    steps = [json.loads(line)["step"] for line in open(out / "seed0" / "online_dpo_beta1.0" / "metrics.jsonl")]
    assert steps == [0, 1, 2]  # steps 0 and 1 before Ctrl-C, step 2 after: none twice

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == METHODS
    assert len([r for r in rows if r["method"] == "best-of-N"]) == 3  # N = 1, 2, 4
    for r in rows:  # a score and a KL for every method; SFT's is the reference: KL 0, win rate 0.5
        assert float(r["gold_reward"]) == float(r["gold_reward"]) and float(r["kl"]) >= -1e-6, r
    sft = next(r for r in rows if r["method"] == "SFT")
    assert float(sft["kl"]) == 0 and float(sft["win_rate"]) == 0.5 and float(sft["tokens"]) > 0
    for run in ["sft"] + RUNS:  # every stage trained adapters on the model it started from
        with open(out / "seed0" / run / "config.json") as f:
            assert json.load(f)["lora_rank"] == 2, run
    with open(out / "seed0" / "dpo_beta0.1" / "config.json") as f:
        assert json.load(f)["sft_ckpt"] == str(out / "seed0" / "sft" / "ckpt.pt")  # the SFT stage's model
    # the judge scored every run's evaluations, in the same held-out prompts: each starts at SFT's score
    for run in RUNS[:1] + RUNS[3:]:
        first = next(json.loads(line) for line in open(out / "seed0" / run / "metrics.jsonl")
                     if "eval/score" in line)
        assert first["eval/score"] == pytest.approx(float(sft["gold_reward"]), abs=1e-5), run
        assert first["eval/win_rate"] == 0.5 and "eval/gold_reward" not in first
    with open(out / "seed0" / "ppo_kl2.0" / "config.json") as f:
        config = json.load(f)
    assert config["judge_ckpt"] == f"{study_files}/judge" and config["reward_ckpt"].endswith("rm/ckpt.pt")
    results = (out / "results.md").read_text()
    assert "Judge score (judge) at matched KL" in results and "| DPO |" in results
    assert json.load(open(out / "study.json"))["score"] == "judge score (judge)"
    held_out = [json.loads(line)["prompt"] for line in open(out / "data" / "prompts_eval.jsonl")]
    assert held_out == [question(i) for i in range(332, 340)]  # the last --eval_samples of --prompts
    assert len(open(out / "data" / "pairs_val.jsonl").readlines()) == 3  # the last 5% of 64 pairs


@pytest.mark.parametrize("change, message", [
    (["--judge="], "give the judge"),
    (["--pairs=", "--labeller="], "give --pairs FILE, or a labeller"),
    (["--prompts=missing.jsonl"], "--prompts missing.jsonl: no such file or folder"),
    (["--eval_samples=39"], "1 of them for training"),
    (["--max_new_tokens=250"], "--max_new_tokens"),
    (["--labeller_fn=rewards.py:toy_gold_reward"], "with --pairs there are none to label"),
    (["--gold_twins"], "--gold_twins: the -GT twins"),
    (["--judge_fn=nowhere.py:f"], "--judge_fn nowhere.py:f"),
])
def test_a_bad_setting_of_your_study_is_one_line_and_writes_nothing(study_files, tmp_path, capsys, change, message):
    out = tmp_path / "study"
    args = your_args(study_files, out)
    for flag in change:  # a later --flag=value replaces the earlier one
        args = [a for a in args if not a.startswith(flag.split("=")[0] + "=")] + ([flag] if not flag.endswith("=")
                                                                                   else [])
    assert compare.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_the_judge_as_labeller_is_said_in_one_line(study_files, tmp_path, capsys, monkeypatch):
    """A labeller that is the judge: one warning line, then the study goes on (stopped here at its
    first stage)."""
    args = [a for a in your_args(study_files, tmp_path / "study") if not a.startswith("--pairs=")]
    monkeypatch.setattr(sample, "main", lambda args: 130)
    assert compare.main(args + [f"--labeller={study_files}/judge"]) == 130
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "the judge is also the labeller" in warnings[0]


def your_toy_study(toy_study, toy_dir, out) -> list[str]:
    """compare.py --model's arguments on the toy study's SFT model exported as a Hugging Face
    folder (beside out), with the toy prompts and the gold reward (a reward function) as labeller
    and judge, and the toy study's sizes."""
    study, args = toy_study
    folder = f"{out}_sft_hf"
    if not os.path.exists(folder):
        assert export.main([f"--ckpt={study}/seed0/sft/ckpt.pt", f"--out_dir={folder}"]) == 0
    gold = "rewards.py:toy_gold_reward"
    sizes = [a for a in args if a.startswith(("--budget", "--eval_samples", "--bon_max", "--device"))]
    return [*sizes, f"--out_dir={out}", f"--model={folder}", f"--prompts={toy_dir}/prompts_train.jsonl",
            f"--eval_prompts={toy_dir}/prompts_val.jsonl", f"--labeller_fn={gold}", f"--judge_fn={gold}"]


def rows_of(out) -> dict:
    with open(os.path.join(out, "results.json")) as f:
        return {(r["method"], r["setting"]): r for r in json.load(f)}


def test_the_toy_study_through_your_models_path_gives_the_toy_studys_numbers(toy_study, toy_dir, tmp_path):
    """One code path: the toy study at --budget tiny, then compare.py --model on its SFT model
    exported as a Hugging Face folder, with the toy prompts and the gold reward as labeller and
    judge (a reward function). Every method trains on the same pairs with the same settings and
    is scored by the same numbers, so every row the two share agrees."""
    assert compare.main(your_toy_study(toy_study, toy_dir, tmp_path / "yours")) == 0
    toy_rows, your_rows = rows_of(toy_study[0]), rows_of(tmp_path / "yours")
    shared = set(toy_rows) & set(your_rows)
    assert {m for m, _ in shared} == METHODS and len(shared) == len(your_rows)
    for name in sorted(shared):  # the judge's scores are the gold reward summed in float32
        a, b = toy_rows[name], your_rows[name]
        assert b["gold_reward"] == pytest.approx(a["gold_reward"], abs=1e-6), name
        assert (b["kl"], b["win_rate"]) == (a["kl"], a["win_rate"]), name
        assert [x for p in b["path"] for x in p] == pytest.approx([x for p in a["path"] for x in p], abs=1e-6), name
    assert len({r["gold_reward"] for r in your_rows.values()}) > 5  # the methods did move apart


def test_the_study_under_torchrun_gives_one_processs_numbers(toy_study, toy_dir, tmp_path):
    """torchrun --nproc_per_node 2 compare.py --model: every training stage on both processes (one
    process group for the study), the pairs and the study's files on rank 0; each method's
    numbers are the one-process toy study's, to the rounding of summing over two processes."""
    r = run_ranks(2, "compare.py", *your_toy_study(toy_study, toy_dir, tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("study done") == 1 and "2 process(es)" in r.stdout
    toy_rows, two_rows = rows_of(toy_study[0]), rows_of(tmp_path / "two")
    for name, b in two_rows.items():
        a = toy_rows[name]
        assert (b["gold_reward"], b["kl"]) == pytest.approx((a["gold_reward"], a["kl"]), abs=1e-4), name
