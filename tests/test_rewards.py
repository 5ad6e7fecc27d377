"""Rewards from anywhere: downloaded reward models (transformers' XForSequenceClassification
folders) scored as transformers scores them, reward models exported for transformers, and the
refusals of folders that are not reward models.

    python -m pytest -q tests/test_rewards.py
"""
import json
import os
import shutil

import pytest
import torch
import transformers

from checkpoint import load_reward_model
from files import DataError
from conftest import run_python
from hf import load_folder, load_reward_folder
from test_hf import CORPUS, FAMILIES, padded_batch, train_bpe_tokenizer_json, write_model

REWARD_FAMILIES = ["llama_gqa_untied", "qwen2", "qwen3", "gemma3", "gpt2"]


def write_reward_folder(folder, family: str, pad_token_id=0, seed=0):
    """A random transformers XForSequenceClassification with one label, its norms and biases moved
    off their initial values, and a byte-level tokenizer."""
    config = FAMILIES[family]()
    config.num_labels, config.pad_token_id = 1, pad_token_id
    model = write_model(folder, config, seed, auto=transformers.AutoModelForSequenceClassification)
    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(CORPUS * 40))
    train_bpe_tokenizer_json(folder, corpus, bos_template=False)
    os.remove(corpus)
    return model


@pytest.fixture(scope="module")
def reward_folders(tmp_path_factory):
    out = {}
    for family in REWARD_FAMILIES:
        folder = str(tmp_path_factory.mktemp(f"rm_{family}"))
        out[family] = (folder, write_reward_folder(folder, family))
    return out


@pytest.mark.parametrize("family", REWARD_FAMILIES)
@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_a_downloaded_reward_model_scores_as_transformers_does(reward_folders, family, pad_side):
    folder, reference = reward_folders[family]
    model, _ = load_reward_model(folder)  # as every script reads --reward_ckpt
    ids, mask, positions = padded_batch(pad_side)
    ids = ids.masked_fill(mask == 0, 0)  # pads carry the pad id, as a tokenizer's padding does
    with torch.no_grad():
        ours = model.eval()(ids, mask)
        theirs = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, 0]
    assert theirs.abs().max() > 0.05
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_a_text_ending_in_the_pad_id_is_scored_before_it_as_transformers_does(reward_folders):
    """transformers reads the score at the last token that is not pad_token_id, a real one or not
    (where pad is also eos, a text ending in eos is scored at the token before it)."""
    folder, reference = reward_folders["qwen2"]
    model, _ = load_reward_model(folder)
    ids = torch.tensor([[5, 17, 42, 99, 0], [8, 21, 33, 7, 9]])
    with torch.no_grad():
        ours = model.eval()(ids, torch.ones_like(ids))
        theirs = reference(input_ids=ids).logits[:, 0]
        before = model(ids[:, :4], torch.ones_like(ids[:, :4]))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert ours[0] == pytest.approx(before[0].item(), abs=1e-5)


def test_a_reward_folder_is_not_a_language_model_nor_the_other_way(reward_folders, tmp_path):
    folder, _ = reward_folders["qwen2"]
    with pytest.raises(DataError, match="a reward model .sequence classification., not a language model"):
        load_folder(folder)
    config = json.load(open(os.path.join(folder, "config.json")))
    bad = str(tmp_path / "two_labels")
    shutil.copytree(folder, bad)
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump({**config, "id2label": {"0": "bad", "1": "good"}}, f)
    with pytest.raises(DataError, match="field 'id2label': a reward model scores with one label, not 2"):
        load_reward_folder(bad)


def scores_both_ways(folder, ids, mask):
    """This project's reward model and transformers' of one folder, on one batch."""
    ours, _ = load_reward_model(folder)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return ours.eval()(ids, mask), theirs(input_ids=ids, attention_mask=mask).logits[:, 0]


def test_a_reward_model_trained_here_exports_as_a_sequence_classifier_transformers_scores_alike(
        sft_pairs, toy_dir, tmp_path):
    """train_rm.py's checkpoint (the toy GPT, written as GPT2ForSequenceClassification) and a
    downloaded Qwen3 reward model written back: transformers loads each and gives our scores."""
    import export
    import train_rm
    _, pairs = sft_pairs
    rm = tmp_path / "rm"
    assert train_rm.main([f"--sft_ckpt={sft_pairs[0]}", f"--train_file={pairs}/pairs_train.jsonl",
                          f"--val_file={pairs}/pairs_val.jsonl", f"--out_dir={rm}", "--device=cpu", "--max_iters=2",
                          "--batch_size=8", "--eval_interval=2", "--lr=1e-3", "--warmup_iters=0"]) == 0
    assert export.main([f"--ckpt={rm}/ckpt.pt", f"--out_dir={tmp_path}/rm_hf"]) == 0
    model, tok = load_reward_model(f"{rm}/ckpt.pt")
    texts = ["the plot was great . i loved it .", "a dull film ."]
    rows = [tok.encode_prompt(t) for t in texts]
    ids = torch.zeros(2, max(map(len, rows)), dtype=torch.long) + tok.pad_id
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):  # right-padded with the tokenizer's pad id
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        trained = model.eval()(ids, mask)
    exported, theirs = scores_both_ways(f"{tmp_path}/rm_hf", ids, mask)
    bias = float(model.head.proj.bias.detach())  # left out: transformers' score has no bias
    torch.testing.assert_close(exported, trained - bias, atol=1e-6, rtol=0)
    torch.testing.assert_close(theirs, trained - bias, atol=1e-4, rtol=0)
    assert json.load(open(f"{tmp_path}/rm_hf/config.json"))["architectures"] == ["GPT2ForSequenceClassification"]


def test_a_downloaded_reward_model_written_back_scores_alike(reward_folders, tmp_path):
    from hf import save_folder
    folder, reference = reward_folders["qwen3"]
    model, tok = load_reward_folder(folder)
    save_folder(model, tok, str(tmp_path))
    ids, mask, _ = padded_batch("right")
    ids = ids.masked_fill(mask == 0, 0)
    ours, theirs = scores_both_ways(str(tmp_path), ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(theirs, reference(input_ids=ids, attention_mask=mask).logits[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert not os.path.exists(tmp_path / "generation_config.json")


# -----------------------------------------------------------------------------
# Scores from a reward model of another tokenizer, and from reward functions


def test_the_text_handoff_gives_the_reward_models_own_score_of_the_text(reward_folders, tok):
    """A policy of the toy tokenizer, a reward model of a byte-level one: the completion is decoded,
    put after its prompt (or rendered with the prompt by the reward model's template) and encoded
    by the reward model's tokenizer; the score is the reward model's of exactly that text."""
    from rewards import Rewards, TextHandoff
    from test_your_model import CHATML  # Qwen2.5's, shortened
    from tokenizer import Tokenizer
    folder, _ = reward_folders["qwen3"]
    model, reward_tok = load_reward_folder(folder)
    prompts, completions = ["the plot was", "a film about"], [" great . i loved it .", " nothing"]
    for template in (None, CHATML):
        reader, cut = Tokenizer(**{**reward_tok.state(), "chat_template": template}), 0
        handoff = TextHandoff(reader, model.config.block_size)
        policy_ids = torch.tensor([tok.encode_prompt(p + c)[:8] for p, c in zip(prompts, completions)])  # not read
        scores, per_source = Rewards(model.eval(), handoff).score([0, 1], prompts, completions, policy_ids,
                                                                  torch.ones_like(policy_ids), torch.no_grad())
        for i, (p, c) in enumerate(zip(prompts, completions)):
            text = (reader.render([{"role": "user", "content": p}, {"role": "assistant", "content": c}]) if template
                    else p + c)
            ids = reader.encode_with_offsets(text)[0] if template else reader.encode_prompt(text)
            cut += len(ids) > model.config.block_size  # cut on the right to the reward model's context, counted
            ids = torch.tensor([ids[:model.config.block_size]])
            with torch.no_grad():
                assert scores[i].item() == pytest.approx(model(ids, torch.ones_like(ids)).item(), abs=1e-5)
        assert torch.equal(scores, per_source[0]) and handoff.cut == cut


def write_functions(path):
    path.write_text(
        "def exact(prompts, completions, answer, **kwargs):\n"
        "    return [None if a is None else float(c.strip() == a) for c, a in zip(completions, answer)]\n\n"
        "def length(prompts, completions, **kwargs):\n"
        "    return [float(len(c if isinstance(c, str) else c[0]['content'])) for c in completions]\n\n"
        "def broken(prompts, completions, **kwargs):\n"
        "    return [1.0 / (len(c) - 3) for c in completions]\n")
    return str(path)


def test_reward_functions_take_columns_skip_none_weigh_and_fail_in_one_line(tmp_path):
    from rewards import Rewards, load_reward_function
    path = write_functions(tmp_path / "fns.py")
    functions = [load_reward_function(f"{path}:exact"), load_reward_function(f"{path}:length")]
    columns = [{"answer": "42"}, {"answer": None}, {"answer": "7", "level": 3}]
    rewards = Rewards(functions=functions, weights=[2.0, 0.5], columns=columns)
    ids = torch.zeros(3, 4, dtype=torch.long)
    scores, per_source = rewards.score([0, 1, 2], ["1+41=", "2+2=", "3+4="], ["42", "4", " 8"], ids, ids, None)
    assert per_source[0, 1].isnan() and per_source[0].nan_to_num().tolist() == [1.0, 0.0, 0.0]
    assert scores.tolist() == [2.0 * 1 + 0.5 * 2, 0.5 * 1, 0.5 * 2]  # the None left out of the sum
    conversational = [[{"role": "user", "content": "1+41="}]] * 3  # completions come as assistant messages
    lengths = Rewards(functions=functions[1:]).score([0, 1, 2], conversational, ["42", "4", " 8"], ids, ids, None)
    assert lengths[0].tolist() == [2, 1, 2]
    broken = Rewards(functions=[load_reward_function(f"{path}:broken")])
    with pytest.raises(DataError, match=r"reward function broken raised on prompt 5: ZeroDivisionError"):
        broken.score([4, 5, 6], ["a", "b", "c"], ["ab", "abc", "abcd"], ids, ids, None)
    with pytest.raises(DataError, match="--reward_fn .*:missing: .* defines no function missing"):
        load_reward_function(f"{path}:missing")
    with pytest.raises(DataError, match="--reward_weights: 1 weights for 2 reward sources"):
        Rewards(functions=functions, weights=[1.0])


@pytest.mark.slow
def test_two_processes_score_with_a_downloaded_reward_model_and_a_reward_function_as_one_does(
        reward_folders, sft_pairs, toy_dir, tmp_path):
    """GRPO on the toy policy, scored by a Qwen3 reward folder of another tokenizer (handed text)
    plus 0.01 x a length function taking the prompt file's columns: 2 DDP processes log the
    same per-source means as 1 process, and the same scores."""
    from conftest import read_metrics, run_python, run_ranks
    fns = write_functions(tmp_path / "fns.py")
    args = lambda out: [  # noqa: E731
        "train_ppo.py", f"--sft_ckpt={sft_pairs[0]}", f"--prompts={toy_dir}/prompts_train.jsonl", f"--out_dir={out}",
        f"--reward_ckpt={reward_folders['qwen3'][0]}", f"--reward_fn={fns}:length", "--reward_weights=1",
        "--reward_weights=0.01", "--advantage=grpo", "--samples_per_prompt=4", "--batch_size=16", "--gen_chunk=8",
        "--max_iters=1", "--max_new_tokens=8", "--device=cpu", "--gold_eval=false", "--print_samples=0",
        "--reward_norm=false", "--eval_interval=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    r = run_python(*args(one))
    assert r.returncode == 0 and "handed each completion as text" in r.stdout, r.stderr[-2000:]
    assert "reward: 1 x rm_qwen3" in r.stdout and " + 0.01 x length" in r.stdout
    r = run_ranks(2, *args(two))
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = read_metrics(one)[-1], read_metrics(two)[-1]
    for key in ("rewards/length/mean", "rewards/length/std", "objective/scores"):
        assert a[key] == pytest.approx(b[key], abs=1e-4), key
    assert [k for k in a if k.startswith("rewards/")] == [
        f"rewards/{n}/{s}" for n in (os.path.basename(reward_folders["qwen3"][0]), "length") for s in ("mean", "std")]
    assert a["rewards/length/mean"] > 0
    assert a["reward_model/texts_cut"] == 0  # logged where the reward model reads text; 8 tokens fit


def test_the_held_out_evaluation_is_judged_by_the_runs_own_reward_sources(sft_pairs, toy_dir, tmp_path):
    """Without the toy gold evaluation, PPO's held-out prompts are scored by the run's reward
    function: eval/score and eval/win_rate against the SFT model beside eval/kl. At iteration 0
    the policy is the SFT model sampled with its seed: every prompt ties (0.5) at KL 0."""
    import train_ppo
    from conftest import read_metrics
    fns = write_functions(tmp_path / "fns.py")
    out = tmp_path / "ppo"
    assert train_ppo.main([f"--sft_ckpt={sft_pairs[0]}", f"--prompts={toy_dir}/prompts_train.jsonl",
                           f"--eval_prompts={toy_dir}/prompts_val.jsonl", "--eval_samples=8", f"--out_dir={out}",
                           "--reward=functions", f"--reward_fn={fns}:length", "--advantage=rloo",
                           "--samples_per_prompt=4", "--batch_size=16", "--gen_chunk=8", "--max_iters=1",
                           "--max_new_tokens=8", "--device=cpu", "--gold_eval=false", "--print_samples=0",
                           "--eval_interval=1"]) == 0
    start, end = read_metrics(out)[0], read_metrics(out)[-1]
    assert start["eval/win_rate"] == 0.5 and start["eval/kl"] == pytest.approx(0, abs=1e-6)
    assert start["eval/score"] > 0 and "eval/gold_reward" not in start
    assert {"eval/score", "eval/win_rate", "eval/kl", "rewards/length/mean"} <= set(end)


def test_sample_pairs_of_your_prompts_are_labelled_by_a_judge(reward_folders, sft_pairs, toy_dir, tmp_path, capsys):
    """sample.py --pairs --prompts with judges: a length function (0.01) plus a downloaded reward
    model of another tokenizer. Every pair's chosen completion has the higher judged score, which
    is the judges' weighted sum of its text; the last 5% of the prompts give the held-out pairs."""
    import sample
    fns = write_functions(tmp_path / "fns.py")
    prompts = tmp_path / "prompts.jsonl"
    lines = open(f"{toy_dir}/prompts_val.jsonl").read().splitlines()[:40]  # 2 held out, with a pair between them
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "pairs"
    folder = reward_folders["qwen3"][0]
    assert sample.main([f"--ckpt={sft_pairs[0]}", "--pairs", f"--prompts={prompts}", f"--out_dir={out}",
                        f"--reward_ckpt={folder}", f"--reward_fn={fns}:length", "--reward_weights=1",
                        "--reward_weights=0.01", "--max_new_tokens=12", "--device=cpu"]) == 0
    train = [json.loads(line) for line in open(out / "pairs_train.jsonl")]
    val = [json.loads(line) for line in open(out / "pairs_val.jsonl")]
    assert train and val and {r["prompt"] for r in val} <= {json.loads(line)["prompt"] for line in lines[38:]}
    model, reward_tok = load_reward_model(folder)
    for r in train[:3]:
        for side in ("chosen", "rejected"):
            ids = reward_tok.encode_prompt(r["prompt"] + r[side])[:model.config.block_size]
            with torch.no_grad():
                own = model.eval()(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
            assert r[f"{side}_score"] == pytest.approx(own + 0.01 * len(r[side]), abs=1e-4)
    assert all(r["chosen_score"] > r["rejected_score"] for r in train + val)
    assert sample.main([f"--ckpt={sft_pairs[0]}", "--prompt=hi", f"--reward_fn={fns}:length", "--device=cpu"]) == 2
    assert "label --pairs of --prompts" in capsys.readouterr().err


@pytest.mark.slow
def test_grpo_on_the_verifiable_example_raises_held_out_exact_match(tmp_path):
    """examples/reverse_digits.py as its docstring runs it: SFT from scratch for 100 steps, then 40
    GRPO iterations on its exact_match reward function. The held-out problems' exact match
    (eval/score, sampled) rises by more than 0.1 (seen: 0.53 -> 0.80)."""
    import train_ppo
    import train_sft
    from conftest import read_metrics
    data, sft, grpo = tmp_path / "data", tmp_path / "sft", tmp_path / "grpo"
    r = run_python("examples/reverse_digits.py", f"--out_dir={data}")
    assert r.returncode == 0, r.stderr
    assert train_sft.main([f"--train_file={data}/sft.jsonl", f"--out_dir={sft}", "--max_iters=100", "--batch_size=32",
                           "--lr=1e-3", "--vocab_size=300", "--max_new_tokens=10", "--device=cpu",
                           "--eval_interval=100", "--print_samples=0"]) == 0
    assert train_ppo.main([f"--sft_ckpt={sft}", f"--prompts={data}/prompts_train.jsonl",
                           f"--eval_prompts={data}/prompts_val.jsonl", "--reward=functions",
                           "--reward_fn=examples/reverse_digits.py:exact_match", "--advantage=grpo",
                           "--samples_per_prompt=4", "--batch_size=32", "--gen_chunk=16", "--max_iters=40",
                           "--max_new_tokens=10", "--eval_interval=20", "--lr=5e-4", f"--out_dir={grpo}",
                           "--device=cpu", "--print_samples=0"]) == 0
    scores = [m["eval/score"] for m in read_metrics(grpo) if "eval/score" in m]
    assert len(scores) == 3 and scores[-1] > scores[0] + 0.1, scores


def test_dpo_on_your_model_is_evaluated_by_a_judge(reward_folders, sft_pairs, toy_dir, tmp_path, capsys):
    """train_dpo.py --eval_prompts with --judge_ckpt (a downloaded reward model of another
    tokenizer): eval/score and eval/win_rate against the SFT model beside eval/kl, 0.5 and 0 at step 0;
    the judge flags without --eval_prompts are one line before anything is written."""
    import train_dpo
    from conftest import read_metrics
    _, pairs = sft_pairs
    out = tmp_path / "dpo"
    args = [f"--sft_ckpt={sft_pairs[0]}", f"--train_file={pairs}/pairs_train.jsonl", f"--val_file={pairs}/pairs_val.jsonl",
            f"--out_dir={out}", f"--judge_ckpt={reward_folders['qwen3'][0]}", "--max_iters=2",
            "--eval_interval=2", "--batch_size=8", "--device=cpu", "--print_samples=0"]
    assert train_dpo.main(args) == 2
    assert "judge the samples of --eval_prompts" in capsys.readouterr().err and not out.exists()
    assert train_dpo.main(args + [f"--eval_prompts={toy_dir}/prompts_val.jsonl", "--eval_samples=8"]) == 0
    start, end = read_metrics(out)[0], read_metrics(out)[-1]
    assert start["eval/win_rate"] == 0.5 and start["eval/kl"] == pytest.approx(0, abs=1e-6)
    assert {"eval/score", "eval/win_rate", "eval/kl"} <= set(end) and "eval/gold_reward" not in end


def test_a_downloaded_reward_model_of_the_policys_tokenizer_reads_its_ids_and_becomes_the_critic(
        reward_folders, tmp_path, capsys):
    """A Qwen3 policy folder and a reward folder sharing its tokenizer: PPO scores the policy's ids
    as they are (no handoff), the critic starts from the reward model, and LoRA (policy and critic
    adapters) with bfloat16 frozen weights trains as it does on a reward model trained here."""
    import train_ppo
    from checkpoint import load_checkpoint
    from test_hf import write_model
    policy, reward = tmp_path / "policy", tmp_path / "rm"
    write_model(str(policy), FAMILIES["qwen3"]())
    shutil.copytree(reward_folders["qwen3"][0], reward)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(reward / name, policy / name)
    for folder in (policy, reward):  # one pad id for both: the tokenizer's
        config = json.load(open(folder / "config.json"))
        json.dump({**config, "pad_token_id": 0}, open(folder / "config.json", "w"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in ["Hello world", "The capital"] * 8))
    capsys.readouterr()
    assert train_ppo.main([f"--sft_ckpt={policy}", f"--reward_ckpt={reward}", f"--prompts={prompts}",
                           f"--out_dir={tmp_path}/ppo", "--lora_rank=2", "--frozen_dtype=bfloat16", "--dtype=bfloat16",
                           "--batch_size=8", "--gen_chunk=4", "--max_iters=1", "--max_new_tokens=6", "--device=cpu",
                           "--print_samples=0"]) == 0
    assert "handed each completion as text" not in capsys.readouterr().out
    critic = load_checkpoint(f"{tmp_path}/ppo/ckpt.pt")["critic"]
    assert any("lora_B" in k for k in critic)
    score = load_reward_folder(str(reward))[0].head.proj.weight  # the critic's head started as the score head
    assert (critic["head.proj.weight"].float() - score).abs().max() < 0.01


def test_best_of_n_keeps_the_judges_best_of_each_group(sft_pairs, tmp_path, capsys):
    """sample.py --best_of 4 ranked by a length function: each printed sample is the longest of
    its 4 candidates, the same candidates --best_of 1 draws with the seed (16 samples, in order)."""
    import sample
    fns = write_functions(tmp_path / "fns.py")
    common = [f"--ckpt={sft_pairs[0]}", "--prompt=the plot", "--device=cpu", "--max_new_tokens=10"]
    assert sample.main(common + ["--n=16"]) == 0
    candidates = [line.split("] ", 1)[1].split("   (gold")[0] for line in capsys.readouterr().out.splitlines()]
    assert sample.main(common + ["--n=4", "--best_of=4", f"--reward_fn={fns}:length"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    for i, line in enumerate(lines):
        text, score = line.split("] ", 1)[1].split("   (best of 4, score ")
        group = candidates[4 * i:4 * i + 4]
        assert text in group and len(text) == max(map(len, group)) and float(score.rstrip(")")) == len(text)
    assert sample.main(common + ["--best_of=4"]) == 2
    assert "--best_of 4: a number of samples of --prompt" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["train_ppo", "train_online_dpo"])
def test_a_judge_scores_the_held_out_samples_and_never_the_training(script, sft_pairs, toy_dir, tmp_path):
    """PPO and online DPO trained on the gold reward, once judged by it (the gold evaluation) and
    once by --judge_fn, its negation: the judge's eval/score is minus the gold reward at every
    evaluation, and the runs are the same (KL alike), so the judge never reaches the training."""
    import importlib
    from conftest import read_metrics
    from test_train_ppo import ppo_args
    main = importlib.import_module(script).main
    judge = tmp_path / "judge.py"
    judge.write_text("from toy import gold_reward\n\n\ndef negated(prompts, completions, **columns):\n"
                     "    return [-gold_reward(c, p) for c, p in zip(completions, prompts)]\n")
    extra = dict(reward="gold", eval_interval=1, eval_samples=16)
    if script == "train_online_dpo":
        extra["batch_size"] = 16
    assert main(ppo_args(sft_pairs, toy_dir, tmp_path / "gold", **extra, gold_eval=True)) == 0
    assert main(ppo_args(sft_pairs, toy_dir, tmp_path / "judged", **extra, judge_fn=f"{judge}:negated")) == 0
    gold, judged = ([m for m in read_metrics(tmp_path / name) if "eval/kl" in m] for name in ("gold", "judged"))
    assert len(gold) == len(judged) == 3
    for g, j in zip(gold, judged):
        assert j["eval/score"] == pytest.approx(-g["eval/gold_reward"], abs=1e-6)  # the judge sums in float32
        assert j["eval/kl"] == pytest.approx(g["eval/kl"], abs=1e-5)
        assert j["eval/win_rate"] == pytest.approx(1 - g["eval/win_rate"], abs=1e-9)  # a tie is half either way
