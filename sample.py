"""
Sample from any checkpoint, or turn a policy's samples into labelled preference pairs.

    python sample.py --ckpt out/sft/ckpt.pt --prompt "the movie was" --n 5
    python sample.py --ckpt out/sft/ckpt.pt --pairs       # out/pairs/pairs_{train,val}.jsonl

With --pairs, each toy prompt gets K completions (K=4, as in the DPO paper's IMDb setup), each
scored by the gold reward, and each scored pair of distinct rewards becomes a preference pair:
all K(K-1)/2 pairs or the best against each other, labelled by the higher gold reward or drawn
from Bradley-Terry probabilities (label noise). Ties carry no preference and are dropped and
counted, and so are pairs with a completion cut at max_new_tokens before its eos: a pair's
response is trained with an eos appended, an ending that was never sampled. Training pairs
come from prompts_train.jsonl, held-out pairs from prompts_val.jsonl.

With your own model, --pairs labels its samples of --prompts by a judge, as UltraFeedback's were
labelled by a stronger model: a reward model (--reward_ckpt, trained here or downloaded; one of
another tokenizer is handed the text) and Python reward functions (--reward_fn), summed with
--reward_weights. The last 5% of the prompts give the held-out pairs.

    python sample.py --ckpt out/smol_sft --pairs --prompts my_prompts.jsonl --reward_ckpt Skywork-Reward-V2-Qwen3-0.6B

With --best_of N, each of the --n samples of --prompt is the best of N by the same judges
(best-of-N sampling, the baseline every RLHF method is measured against), printed with its score.
"""
import itertools
import json
import math
import os
import random
import sys
from dataclasses import dataclass
from typing import Literal, Optional

from checkpoint import is_toy_model, load_gpt
from data import load_prompt_records, load_prompts
from distributed import pick_device
from evaluate import sample_completions
from files import DataError, make_out_dir, write_atomic
from rewards import load_judge
from toy import gold_reward
from train_utils import autocast, parse_config


@dataclass
class Config:
    ckpt: str = "out/sft/ckpt.pt"
    """checkpoint to sample from: any stage's ckpt.pt, or a Hugging Face model folder (kept in its dtype)"""
    lora_base: str = ""
    """where a LoRA checkpoint's base model is now, if it moved since training (its files are checked)"""
    prompt: str = ""
    """a prompt to continue (without --pairs)"""
    chat_template: str = "auto"
    """auto: the model's own template (the prompt becomes a user turn), if it has one; zephyr; none: the prompt
    as plain text; or a Jinja file"""
    n: int = 4
    """samples of --prompt"""
    best_of: int = 1
    """each sample of --prompt the best of this many, ranked by --reward_ckpt and --reward_fn"""
    pairs: bool = False
    """write preference pairs instead of printing samples: of the toy prompts, labelled by the gold reward, or of
    --prompts, labelled by --reward_ckpt and --reward_fn"""
    prompts: str = ""
    """your prompts JSONL for --pairs, one {"prompt"} a line (other fields go to reward functions); the last 5%
    give the held-out pairs"""
    val_prompts: str = ""
    """held-out prompts for the held-out pairs of --prompts, which then are all training prompts; empty: the last
    5% of --prompts"""
    reward_ckpt: str = ""
    """the judge of --prompts' samples: a reward model (train_rm.py's, or a downloaded sequence classifier)"""
    reward_fn: tuple[str, ...] = ()
    """a judging reward function FILE.py:NAME, TRL's signature; give the flag once for each"""
    reward_weights: tuple[float, ...] = ()
    """a weight for each judge, the reward model first; empty: 1 each"""
    data_dir: str = "data/toy"
    """the toy task's folder (prompts_train.jsonl, prompts_val.jsonl)"""
    out_dir: str = "out/pairs"
    """where pairs_train.jsonl and pairs_val.jsonl go"""
    k: int = 4
    """completions per prompt"""
    pairing: Literal["all", "best_vs_rest"] = "all"
    """all: every pair of the K; best_vs_rest: the best completion against each other one"""
    label: Literal["gold", "bradley_terry"] = "gold"
    """gold: the higher score is chosen; bradley_terry: chosen with P = sigmoid(bt_scale * (logit r_a - logit
    r_b)) on the gold reward, sigmoid(bt_scale * (r_a - r_b)) on a judge's scores"""
    bt_scale: float = 1.0
    """Bradley-Terry sharpness; on the toy task logit r is the net sentiment-word count"""
    n_train_prompts: Optional[int] = None
    """use only the first N training prompts; none: all"""
    n_val_prompts: Optional[int] = None
    """use only the first N held-out prompts; none: all"""
    max_new_tokens: int = 40
    """longest completion"""
    temperature: float = 1.0
    """sampling temperature; 0 is greedy"""
    top_k: Optional[int] = None
    """sample from the k likeliest tokens only"""
    top_p: Optional[float] = None
    """nucleus sampling threshold"""
    batch_size: int = 256
    """prompts per generate call"""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto: cuda, then mps, then cpu"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """bfloat16 runs under autocast"""
    seed: int = 0
    """seeds the samples and the Bradley-Terry labels"""


def _logit(r: float) -> float:
    return math.log(r / (1 - r))


def make_pairs(prompt: str, completions: list[str], scores: list[float], ended: list[bool], pairing: str,
               label: str, bt_scale: float, rng: random.Random,
               logit=_logit) -> tuple[list[dict], int, int, int]:
    """Preference records for one prompt's scored completions, and the numbers of pairs dropped
    as ties, because a completion is empty (eos at once: no response text), and because a
    completion did not end (cut at max_new_tokens)."""
    if pairing == "all":
        candidates = list(itertools.combinations(range(len(completions)), 2))
    else:
        best = max(range(len(completions)), key=lambda i: scores[i])
        candidates = [(best, j) for j in range(len(completions)) if j != best]
    records, ties, empty, cut = [], 0, 0, 0
    for a, b in candidates:
        if not completions[a].strip() or not completions[b].strip():
            empty += 1
            continue
        if not (ended[a] and ended[b]):
            cut += 1
            continue
        if scores[a] == scores[b] or completions[a] == completions[b]:
            ties += 1
            continue
        if label == "gold":
            a_wins = scores[a] > scores[b]
        else:  # Bradley-Terry (1952) on the reward's logit
            a_wins = rng.random() < 1 / (1 + math.exp(-bt_scale * (logit(scores[a]) - logit(scores[b]))))
        w, l = (a, b) if a_wins else (b, a)
        records.append({"prompt": prompt, "chosen": completions[w], "rejected": completions[l],
                        "chosen_score": scores[w], "rejected_score": scores[l]})
    return records, ties, empty, cut


def write_pairs(cfg: Config, model, tok, split: str, prompts: list, rng: random.Random, judge=None,
                columns: list[dict] | None = None) -> None:
    """Pairs of `prompts`' samples, scored by the toy gold reward, or by `judge(prompts, texts,
    columns)` with each prompt's columns (its record's other fields)."""
    repeated = [p for p in prompts for _ in range(cfg.k)]
    _, texts, ended = sample_completions(model, tok, repeated, cfg.max_new_tokens, cfg.temperature,
                                         cfg.seed + (split == "val"), cfg.top_k, cfg.top_p, cfg.batch_size)
    records, dropped, scores_all = [], [0, 0, 0], []
    for i, prompt in enumerate(prompts):
        group = slice(i * cfg.k, (i + 1) * cfg.k)
        scores = ([gold_reward(c, prompt) for c in texts[group]] if judge is None
                  else judge([prompt] * cfg.k, texts[group], [columns[i]] * cfg.k))
        scores_all += scores
        new, *counts = make_pairs(prompt, texts[group], scores, ended[group], cfg.pairing, cfg.label,
                                  cfg.bt_scale, rng, _logit if judge is None else float)
        records += new
        dropped = [d + c for d, c in zip(dropped, counts)]
    path = os.path.join(cfg.out_dir, f"pairs_{split}.jsonl")
    if not records:  # no run could train or validate on it: said here, not by the run that reads it
        raise DataError(f"{path}: no pairs from {len(prompts)} prompts x {cfg.k} completions ({dropped[0]} ties, "
                        f"{dropped[1]} empty, {dropped[2]} cut at --max_new_tokens {cfg.max_new_tokens}, which a "
                        "pair never holds)")
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    agree = sum(r["chosen_score"] > r["rejected_score"] for r in records) / max(1, len(records))
    print(f"{path}: {len(records)} pairs from {len(prompts)} prompts x {cfg.k} completions, "
          f"{dropped[0]} ties, {dropped[1]} with an empty completion and {dropped[2]} with a completion "
          "cut at "
          f"max_new_tokens dropped; completion {'gold reward' if judge is None else 'score'} mean "
          f"{sum(scores_all) / len(scores_all):.3f}; labels agreeing with it {agree:.3f}")


def main(argv=None) -> int:
    cfg = parse_config(Config, argv, __doc__)
    device = pick_device(cfg.device)
    try:  # bad input, found at any point (a chat template that fails on the prompt), is one line
        if not cfg.pairs and not cfg.prompt:
            raise DataError("give --prompt, or --pairs to write preference pairs")
        toy = is_toy_model(cfg.ckpt)  # the toy task's gold reward scores only the toy model's text
        judged = bool(cfg.reward_ckpt or cfg.reward_fn)
        if cfg.best_of < 1 or cfg.best_of > 1 and (cfg.pairs or not judged):
            raise DataError(f"--best_of {cfg.best_of}: a number of samples of --prompt, 1 or more, ranked by "
                            "--reward_ckpt or --reward_fn (not with --pairs)")
        if cfg.val_prompts and not (judged and cfg.pairs and cfg.prompts):
            raise DataError("--val_prompts holds out prompts of --pairs of --prompts, labelled by --reward_ckpt or "
                            "--reward_fn: give them")
        if judged and not (cfg.pairs and cfg.prompts or cfg.best_of > 1):
            raise DataError("--reward_ckpt and --reward_fn label --pairs of --prompts, or rank --best_of: give them")
        if cfg.pairs and not (toy or judged):
            raise DataError(f"--pairs: {cfg.ckpt} is not the toy task's model, whose gold reward labels toy samples; "
                            "label yours with a judge: --prompts, and --reward_ckpt or --reward_fn")
        if cfg.pairs:
            make_out_dir(cfg.out_dir)
        model, tok = load_gpt(cfg.ckpt, dtype=None, lora_base=cfg.lora_base)
        conversations = False
        if judged:  # the judge: every source reads the text
            judge = load_judge(cfg.reward_ckpt, cfg.reward_fn, cfg.reward_weights, tok, [], device,
                               autocast(device, cfg.dtype), cfg.lora_base, flag="--reward_fn")
        if judged and cfg.pairs:  # your prompts, the last 5% held out unless --val_prompts
            records = load_prompt_records(cfg.prompts)
            if cfg.val_prompts:
                train, val = records, load_prompt_records(cfg.val_prompts)
            elif len(records) < 2:
                raise DataError(f"--prompts {cfg.prompts}: one prompt; --pairs holds out the last 5% (at least one)")
            else:
                held_out = max(1, len(records) // 20)
                train, val = records[:len(records) - held_out], records[len(records) - held_out:]
            train, val = train[:cfg.n_train_prompts], val[:cfg.n_val_prompts]
            conversations = any(isinstance(p, list) for p, _ in train + val)
        tok = tok.with_chat_template(cfg.chat_template, chat_data=conversations)
        if cfg.pairs and not judged:
            train = load_prompts(os.path.join(cfg.data_dir, "prompts_train.jsonl"))[:cfg.n_train_prompts]
            val = load_prompts(os.path.join(cfg.data_dir, "prompts_val.jsonl"))[:cfg.n_val_prompts]
        model.to(device).eval()
        with autocast(device, cfg.dtype):
            if not cfg.pairs:
                k = cfg.best_of
                _, texts, _ = sample_completions(model, tok, [cfg.prompt] * cfg.n * k, cfg.max_new_tokens,
                                                 cfg.temperature, cfg.seed, cfg.top_k, cfg.top_p)
                if k > 1:  # sample i is the judges' best of candidates i*k .. i*k + k - 1
                    scores = judge([cfg.prompt] * len(texts), texts, [{}] * len(texts))
                    best = [max(range(i * k, (i + 1) * k), key=scores.__getitem__) for i in range(cfg.n)]
                    for i in best:
                        print(f"[{cfg.prompt}] {texts[i]}   (best of {k}, score {scores[i]:.3f})")
                    return 0
                for t in texts:
                    print(f"[{cfg.prompt}] {t}"
                          + (f"   (gold reward {gold_reward(t, cfg.prompt):.2f})" if toy else ""))
                return 0
            rng = random.Random(cfg.seed)
            for split, prompts in (("train", train), ("val", val)):
                if judged:
                    write_pairs(cfg, model, tok, split, [p for p, _ in prompts], rng, judge, [c for _, c in prompts])
                else:
                    write_pairs(cfg, model, tok, split, prompts, rng)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {cfg.ckpt}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
