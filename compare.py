"""
The study: DPO against RLHF on the toy task, end to end, in the protocol of the DPO paper's
controlled-sentiment experiment (Rafailov et al. 2023, section 6, figure 2 left): SFT once, K=4
samples per training prompt labelled by the gold reward, then DPO over a sweep of beta, a reward
model, then three RL estimators, PPO (with a critic), RLOO and GRPO (critic-free), each on the
reward model (and with --gold_twins or --budget full on the gold reward itself too: -GT, the DPO
paper's upper reference), and two cheap baselines, best-of-N from SFT ranked by the reward
model and preferred-FT (SFT on the chosen responses), and online DPO over the same betas: DPO
on pairs the policy samples as it trains, labelled by the reward model (with the twins also by
the gold reward), which asks whether RL's lead comes from RL or from on-policy sampling. Every
method is evaluated on the same held-out prompts by evaluate.PolicyEvaluator along its run, so
each run draws a path in the reward-KL plane; the methods are compared at matched KL (1, 2, 4,
8 nats, read off the paths) over training seeds, and against the ceiling: the optimal
KL-regularised policy, estimated by importance weights. It holds no training math: each stage
is a train_X.py script's main, run in this process.

The same study asks the question of your model (--model), prompts and judge: the same stages on
it, SFT (on --sft_file, or none for an instruction-tuned model), pairs (yours, or sampled and
labelled by --labeller), then every method, each scored on held-out prompts by the judge, which
stands where the toy task's gold reward stands and which no method trains on. The toy task's
ceiling, preferred-FT and -GT twins need its gold reward and are left out. docs/your-study.md.

    python compare.py                     # the reduced study, one seed (10-11 minutes on 2 CPU cores)
    python compare.py --budget full       # the full sweep with the gold-reward twins, 3 seeds
    python compare.py --seeds 3           # the reduced study with 3 training seeds
    python compare.py --gold_twins --ceiling_samples 2048 --ceiling_check_samples 128 --bon_max 16
                                          # the reduced study with its settings before 2026-11-30
    python compare.py --model MODEL_FOLDER --prompts prompts.jsonl --pairs pairs.jsonl --judge REWARD_MODEL_FOLDER
                                          # your model (docs/your-study.md)

Writes to out_dir: results.md, results.csv and results.json (a row per method, setting and
seed, and the KL-matched table), study.json (what scored it), frontier.png, kl_traces.png,
curves.png, and one folder per stage with its config.json, metrics.jsonl and ckpt.pt. A stage
whose folder holds a finished run with the same arguments is reused, so an interrupted study
resumes where it stopped: Ctrl-C prints the command that goes on.
"""
import contextlib
import csv
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as torch_dist

import sample
import train_dpo
import train_online_dpo
import train_ppo
import train_rm
import train_sft
from ceiling import SentimentTilt, best_of_n, completion_logprobs, mixture_log_ratio, optimal_frontier
from checkpoint import is_toy_model, load_gpt, load_reward_model
from data import collate, load_preferences, load_prompt_records, load_sft, read_records
from distributed import Dist, cleanup_distributed, setup_distributed
from evaluate import PolicyEvaluator, sample_completions
from files import DataError, write_atomic
from toy import gold_reward, prepare_toy_data
from rewards import load_judge, model_name
from trackers import TRACKERS, check_tracker
from train_utils import autocast, check_lengths, parse_config, require_inputs


@dataclass
class Config:
    out_dir: str = "out/study"
    """folder for the results and one subfolder per stage"""
    budget: Literal["tiny", "small", "full"] = "small"
    """steps and samples. The toy task: tiny a smoke test (the numbers mean nothing), small the reduced study,
    full the full sweep (DPO beta in {0.05, 0.1, 1, 5}, KL targets {1, 2, 4, 8}, the gold-reward twins, 3 seeds).
    Your model: see docs/your-study.md"""
    gold_twins: bool = False
    """also train PPO, RLOO and GRPO on the gold reward itself (-GT, the DPO paper's upper reference); on with
    --budget full (the toy task only)"""
    seeds: int = 0
    """training seeds; the data and the held-out prompts stay the same; 0: 1, or 3 with --budget full on the toy
    task"""
    model: str = ""
    """your model: a Hugging Face folder (or a stage's checkpoint), the SFT model unless --sft_file; empty: the toy
    task's, trained here"""
    sft_file: str = ""
    """SFT data for --model (JSONL or parquet, as train_sft.py reads it); empty: --model is already
    instruction-tuned and is the SFT model"""
    prompts: str = ""
    """--model: prompts (JSONL or parquet, one {"prompt"} a record) for RL, online DPO and sampled pairs; the last
    --eval_samples are held out for the evaluation unless --eval_prompts"""
    eval_prompts: str = ""
    """--model: held-out prompts every method is judged on; empty: the last --eval_samples of --prompts"""
    pairs: str = ""
    """--model: preference pairs (UltraFeedback-binarized or any format train_dpo.py reads) for DPO and the
    reward model; empty: K samples of each training prompt from the SFT model, labelled by --labeller"""
    pairs_val: str = ""
    """held-out pairs for --pairs; empty: the last 5% of --pairs"""
    judge: str = ""
    """--model: the judge, a reward model folder (or checkpoint) that scores every method's held-out samples and
    nothing the methods train on"""
    judge_fn: tuple[str, ...] = ()
    """--model: a judging reward function FILE.py:NAME (TRL's signature), in place of or beside --judge"""
    labeller: str = ""
    """--model without --pairs: the reward model folder that labels the sampled pairs (not the judge, so that
    reward hacking shows)"""
    labeller_fn: tuple[str, ...] = ()
    """--model without --pairs: a labelling reward function FILE.py:NAME, in place of or beside --labeller"""
    data_dir: str = "data/toy"
    """the toy task's folder, written on first use"""
    eval_samples: int = 256
    """held-out prompts in every evaluation"""
    max_new_tokens: int = 0
    """longest sampled response of your model; 0: the budget's (64 tiny, 256 small and full); the toy task: 40"""
    bon_max: int = 8
    """best-of-N is traced for N = 1, 2, 4, ... up to this (its KL bound at 8 is 1.20, past the table's KL 1)"""
    ceiling_prompts: int = 64
    """held-out prompts used to estimate the optimal frontier (the first of the evaluation's; the toy task only)"""
    ceiling_samples: int = 384
    """samples per prompt for the optimal frontier, in equal numbers from the reference and each of its
    tilts"""
    ceiling_check_samples: int = 0
    """samples per prompt for the same frontier on all eval_samples prompts, to measure the subset's offset
    (0: not estimated; at 128 it put the offset at 0.001 or less at KL 1 and 2)"""
    ceiling_only: bool = False
    """train (or reuse) only the SFT models and write the ceiling's rows over seeds to ceiling.md"""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto: cuda, then mps, then cpu"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """bfloat16 runs under autocast"""
    lora_rank: int = 0
    """every training stage trains LoRA adapters of this rank (0: full fine-tuning)"""
    report_to: Literal[TRACKERS] = "none"
    """every training stage also logs to this experiment tracker, one tracker run a stage (tensorboard:
    `tensorboard --logdir OUT_DIR` shows them all); a finished stage is reused whatever this is"""


def sweeps(cfg: Config, toy: bool) -> dict:
    """Every method's settings and run lengths. The tuning budget is the same for every method:
    one learning rate (the toy task's picked by hand for a stable default run, your model's the
    scripts' defaults for a real model), and a sweep over its KL knob (beta for DPO, the adaptive
    controller's target for PPO and RLOO, the fixed KL weight for GRPO, which has no controller).
    The small budget is a subset of the full one."""
    if cfg.budget == "tiny":
        S = dict(betas=[0.1, 1.0], kl_targets={"model": [2.0], "gold": [2.0]},
                 grpo_coefs={"model": [0.05], "gold": [0.05]}, sft=dict(max_iters=20, eval_interval=20),
                 dpo=dict(max_iters=4, eval_interval=2, batch_size=4),
                 rm=dict(max_iters=4, eval_interval=4, batch_size=4),
                 rl=dict(max_iters=2, eval_interval=1, batch_size=32, gen_chunk=16, reward_norm_batches=1),
                 online=dict(max_iters=2, eval_interval=1, batch_size=16, gen_chunk=16, reward_norm_batches=1),
                 pft=dict(max_iters=4, eval_interval=4, batch_size=1),
                 pairs=dict(n_train_prompts=64, n_val_prompts=32))
        if not toy:  # a few steps of your model: a smoke test of the whole study
            S["sft"] = dict(max_iters=4, eval_interval=4, batch_size=4)
            S["rl"].update(batch_size=16, gen_chunk=8)
            S["online"].update(batch_size=8, gen_chunk=8)
            S["pairs"] = dict(n_train_prompts=32, n_val_prompts=8)
        return S
    full = cfg.budget == "full"
    if not toy:  # your model: the knobs' ranges of real runs, the learning rates the scripts settle for it
        return dict(
            betas=[0.01, 0.05, 0.1, 0.5] if full else [0.05, 0.5],
            kl_targets={"model": [1.0, 2.0, 4.0, 8.0] if full else [2.0, 8.0]},
            grpo_coefs={"model": [0.01, 0.04, 0.1] if full else [0.04]},
            sft={} if full else dict(max_iters=100),  # full: one epoch
            dpo=dict(batch_size=64, eval_interval=50) if full else dict(max_iters=100, batch_size=32, eval_interval=10),
            rm=dict(batch_size=64) if full else dict(max_iters=100, batch_size=32),
            rl=dict(max_iters=300 if full else 60, eval_interval=10, early_eval_interval=2, early_eval_until=30),
            online=dict(max_iters=300 if full else 60, eval_interval=10, early_eval_interval=3, early_eval_until=30),
            pairs=dict(n_train_prompts=None if full else 1000, n_val_prompts=128 if full else 64))
    return dict(
        betas=[0.05, 0.1, 1.0, 5.0] if full else [0.05, 1.0],
        kl_targets={"model": [1.0, 2.0, 4.0, 8.0], "gold": [1.0, 2.0, 4.0, 8.0]} if full
        else {"model": [2.0, 8.0], "gold": [2.0, 8.0]},
        grpo_coefs=({"model": [0.02, 0.05, 0.1], "gold": [0.02, 0.05, 0.1]} if full
                    else {"model": [0.05], "gold": [0.05]}),
        # evaluations every 2 RL iterations and 10 DPO steps over the first half, where paths cross
        # KL 1-8 fastest (an adaptive run for KL 8 goes from 1.2 to 10 in 10 iterations), so that
        # the KL-matched table interpolates over short segments
        # held-out pairs from the first 64 evaluation prompts (about 320): DPO's held-out loss at each
        # of its 18 evaluations cost as much as 7 training steps on all 256 prompts' pairs
        sft=dict(), rm=dict(), pairs=dict(n_val_prompts=64),
        dpo=dict(early_eval_interval=10, early_eval_until=150),
        rl=dict(max_iters=60, eval_interval=10, early_eval_interval=2, early_eval_until=30),
        # 60 steps of 32 prompts x 2 responses, one generate call a step (the study runs in one process)
        online=dict(eval_interval=10, early_eval_interval=3, early_eval_until=30, gen_chunk=64),
        pft=dict(max_iters=300, eval_interval=100, lr=1e-4, min_lr=1e-5, warmup_iters=30),
    )


KL_HORIZON = 256
"""the adaptive controller's horizon in samples: 4 batches of 64, so kl_coef moves by at most 5% an
iteration"""


def starting_kl_coef(target: float) -> float:
    """The adaptive controller's first kl_coef: 0.5 / target. On normalised scores the optimal
    policy's KL grows roughly as 1 / beta over this range (the ceiling's points), so starting
    near the right beta lets a slow controller correct the rest without first driving kl_coef
    down while the policy has not yet moved, the overshoot Ziegler et al.'s controller shows
    when it starts from one small coefficient for every target."""
    return 0.5 / target


RL_METHODS = {"gae": "PPO", "rloo": "RLOO", "grpo": "GRPO"}


def rl_runs(S: dict, gold_twins: bool) -> list[tuple[str, str, str, dict]]:
    """(method, setting, run folder, train_ppo flags) of every RL run: PPO, RLOO and GRPO on the
    reward model, and with gold_twins on the gold reward too (method name -GT)."""
    runs = []
    for advantage, name in RL_METHODS.items():
        group = {} if advantage == "gae" else dict(samples_per_prompt=4)  # 16 prompts x 4 responses a batch
        for reward, suffix in (("model", ""), ("gold", "-GT"))[:2 if gold_twins else 1]:
            method, folder = name + suffix, (name + suffix).lower().replace("-", "_")
            if advantage == "grpo":
                for coef in S["grpo_coefs"][reward]:
                    runs.append((method, f"kl_coef={coef}", f"{folder}_c{coef}",
                                 dict(advantage=advantage, reward=reward, kl_coef=coef, **group)))
                continue
            for target in S["kl_targets"][reward]:
                runs.append((method, f"kl_target={target}", f"{folder}_kl{target}",
                             dict(advantage=advantage, reward=reward, adaptive_kl=True, kl_target=target,
                                  kl_coef=starting_kl_coef(target), kl_horizon=KL_HORIZON, **group)))
    return runs


def online_runs(S: dict, gold_twins: bool) -> list[tuple[str, str, str, dict]]:
    """(method, setting, run folder, train_online_dpo flags) of every online DPO run: at each of DPO's
    betas, its pairs labelled by the reward model, and with gold_twins by the gold reward too (-GT)."""
    return [(f"online DPO{suffix}", f"beta={beta}", f"online_dpo{suffix.lower().replace('-', '_')}_beta{beta}",
             dict(reward=reward, beta=beta))
            for reward, suffix in (("model", ""), ("gold", "-GT"))[:2 if gold_twins else 1] for beta in S["betas"]]


def flags(**kwargs) -> list[str]:
    """--name=value for each setting given (None is not given); a tuple's values each as the flag once."""
    return [f"--{k}={x}" for k, v in kwargs.items() if v is not None for x in (v if isinstance(v, tuple) else (v,))]


@dataclass
class Inputs:
    """What a study runs on, settled and checked before any stage runs: the toy task's files with
    the gold reward as the judge, or your model, prompts, pairs, labeller and judge."""
    toy: bool
    """the model is the toy task's, by what it is: the toy task's schedules and sweeps"""
    gold: bool
    """the toy gold reward judges (no --model): the ceiling, preferred-FT and the -GT twins come with it"""
    model: str
    """the SFT model, or with --sft_file the model SFT starts from; empty: the toy task's, trained here"""
    train_prompts: str
    """prompts of RL, online DPO and sampled pairs"""
    eval_prompts: str
    """the held-out prompts every evaluation samples"""
    judge: dict
    """the judge's flags (train_dpo.py's, train_ppo.py's: judge_ckpt, judge_fn), empty for the gold reward"""
    score: str
    """what the judge's number is called in the results"""
    max_new_tokens: int | None
    """responses' length limit; None: the scripts' (the toy task's 40)"""

    @property
    def score_key(self) -> str:
        return "eval/gold_reward" if self.gold else "eval/score"


STOPPED = (128 + 1, 128 + 2, 128 + 15)
"""a training script's exit status when SIGHUP, Ctrl-C (SIGINT) or SIGTERM stopped it"""


class Study:
    """The stages of a study, run or reused in order. Under torchrun every process runs this, each
    training stage on every rank (they share the study's process group), and the rest on rank 0,
    which alone writes the study's files."""

    def __init__(self, cfg: Config, total: int, dist: Dist):
        self.cfg, self.t0, self.total, self.dist = cfg, time.time(), total, dist
        self.count, self.ran = 0, []  # stages met so far, and the wall time of each run in this process
        self.times_path = os.path.join(cfg.out_dir, "stage_times.json")
        self.times = json.load(open(self.times_path)) if os.path.exists(self.times_path) else {}

    def log(self, text: str) -> None:
        if self.dist.master:
            print(f"[{time.time() - self.t0:6.0f}s] ({self.count}/{self.total}) {text}", flush=True)

    def left(self) -> str:
        """An estimate of the stages still to run: their number times the mean of those run so far."""
        if not self.ran or self.count >= self.total:
            return ""
        seconds = statistics.fmean(self.ran) * (self.total - self.count)
        return f"; about {seconds:.0f} s left" if seconds < 90 else f"; about {seconds / 60:.0f} min left"

    def stage(self, name: str, out_dir: str, args: list[str], run, trains: bool = True) -> None:
        """Run a stage unless out_dir holds its finished output for the same arguments; an
        unfinished training run with the same arguments is resumed, anything else redone.
        run(args) does the work (a training stage's also gets --report_to, which changes no
        result); the stage's wall time is kept for the results table."""
        marker, ckpt = os.path.join(out_dir, "done.json"), os.path.join(out_dir, "ckpt.pt")
        previous = json.load(open(marker)) if os.path.exists(marker) else None
        self.count += 1
        if previous == args:
            self.log(f"{name}: reused {out_dir}")
            return
        config_path = os.path.join(out_dir, "stage_args.json")
        same = os.path.exists(config_path) and json.load(open(config_path)) == args
        resume = same and previous is None and os.path.exists(ckpt)
        overwrite = os.path.exists(ckpt)
        sync(self.dist)  # every rank has read the folder before rank 0 writes to it
        if self.dist.master:
            os.makedirs(out_dir, exist_ok=True)
            if os.path.exists(marker):
                os.remove(marker)
            write_atomic(config_path, json.dumps(args))
        self.log(f"{name}: {'resuming' if resume else 'running'} -> {out_dir}")
        t = time.time()
        tracking = [f"--report_to={self.cfg.report_to}"] if trains else []
        status = (run(args + tracking + (["--resume"] if resume else ["--overwrite"] if overwrite else [])) if trains
                  or self.dist.master else 0)
        if status in STOPPED:  # Ctrl-C or a signal: the stage said where its checkpoint is; the study says how to go on
            raise KeyboardInterrupt
        if status not in (0, None):
            raise SystemExit(f"error: stage {name} failed")
        sync(self.dist)  # the other ranks wait for rank 0's stage (the pairs)
        self.times[out_dir] = (self.times.get(out_dir, 0.0) if resume else 0.0) + time.time() - t
        self.ran.append(time.time() - t)
        if self.dist.master:
            write_atomic(self.times_path, json.dumps(self.times, indent=1))
            write_atomic(marker, json.dumps(args))
        self.log(f"{name}: done in {time.time() - t:.0f}s{self.left()}")


def sync(dist: Dist) -> None:
    """Wait for every process of a study under torchrun."""
    if dist.ddp:
        torch_dist.barrier()


def last_eval(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "eval/kl" in r][-1]


def last_logged(out_dir: str, key: str) -> int:
    """The last value of a running count a run logged: "tokens", the real tokens it trained on, or
    "samples", the responses it sampled."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r[key] for r in map(json.loads, f) if key in r][-1]


def path(out_dir: str, key: str) -> list[tuple[float, float]]:
    """(KL, score) at every evaluation of a run; key: eval/gold_reward, or eval/score for a judge's."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(r["eval/kl"], r[key]) for r in map(json.loads, f) if "eval/kl" in r]


def sft_stage(cfg: Config, inputs: Inputs, study: Study, seed: int) -> str:
    """Train (or reuse) a seed's SFT model, the reference of every other stage, and return it: the
    toy task's from scratch, your model's on --sft_file, or your model itself."""
    out_dir = os.path.join(cfg.out_dir, f"seed{seed}", "sft")
    common = dict(out_dir=out_dir, device=cfg.device, dtype=cfg.dtype, seed=1337 + seed)
    if not inputs.model:
        study.stage("sft", out_dir, flags(**common, data_dir=cfg.data_dir, **sweeps(cfg, True)["sft"]), train_sft.main)
    elif cfg.sft_file:
        study.stage("sft", out_dir, flags(**common, init_from=inputs.model, train_file=cfg.sft_file, eval_samples=0,
                                          lora_rank=cfg.lora_rank or None, **sweeps(cfg, inputs.toy)["sft"]),
                    train_sft.main)
    else:
        return inputs.model
    return os.path.join(out_dir, "ckpt.pt")


def pairs_stage(cfg: Config, inputs: Inputs, study: Study, seed: int, sft_ckpt: str, S: dict) -> tuple[dict, int]:
    """The SFT model and preference pairs of DPO and the reward model, as train_dpo.py's flags, and the responses
    sampled for them: the toy task's K=4 samples of each prompt labelled by the gold reward, yours
    labelled by --labeller, or your --pairs as they are."""
    if cfg.pairs:
        return dict(sft_ckpt=sft_ckpt, train_file=inputs_file(cfg, "pairs_train"),
                    val_file=inputs_file(cfg, "pairs_val")), 0
    out_dir = os.path.join(cfg.out_dir, f"seed{seed}", "pairs")
    source = (dict(prompts=inputs.train_prompts, val_prompts=inputs.eval_prompts, reward_ckpt=cfg.labeller or None,
                   reward_fn=cfg.labeller_fn, max_new_tokens=inputs.max_new_tokens) if inputs.model
              else dict(data_dir=cfg.data_dir))
    study.stage("pairs", out_dir, flags(ckpt=sft_ckpt, pairs=True, **source, out_dir=out_dir, device=cfg.device,
                                        seed=seed, **S["pairs"]), sample.main, trains=False)
    counts = [len(load_prompt_records(file)[:S["pairs"].get(f"n_{split}_prompts")])
              for file, split in ((inputs.train_prompts, "train"), (inputs.eval_prompts, "val"))]
    return (dict(sft_ckpt=sft_ckpt, train_file=f"{out_dir}/pairs_train.jsonl", val_file=f"{out_dir}/pairs_val.jsonl"),
            sample.Config().k * sum(counts))


def inputs_file(cfg: Config, name: str) -> str:
    """Where the study keeps a split of your data it writes (inputs.jsonl files, see split_inputs)."""
    return os.path.join(cfg.out_dir, "data", f"{name}.jsonl")


def run_seed(cfg: Config, inputs: Inputs, study: Study, seed: int, prompts: list, columns: list[dict],
             device) -> list[dict]:
    """The whole pipeline for one training seed; returns its result rows."""
    S = sweeps(cfg, inputs.toy)
    root = os.path.join(cfg.out_dir, f"seed{seed}")
    common = dict(device=cfg.device, dtype=cfg.dtype, seed=1337 + seed, lora_rank=cfg.lora_rank or None)
    evaluation = dict(eval_prompts=inputs.eval_prompts, eval_samples=cfg.eval_samples, **inputs.judge,
                      max_new_tokens=inputs.max_new_tokens)
    d = lambda name: os.path.join(root, name)
    rm_ckpt = os.path.join(d("rm"), "ckpt.pt")
    key = inputs.score_key

    def train(name, main, out_dir, **kwargs):
        study.stage(name, out_dir, flags(out_dir=out_dir, **common, **kwargs), main)

    # 1. SFT, and preference pairs from it (K=4 per prompt, labelled by the gold reward or your labeller), or yours
    sft_ckpt = sft_stage(cfg, inputs, study, seed)
    pair_files, pair_samples = pairs_stage(cfg, inputs, study, seed, sft_ckpt, S)

    # 2. DPO over beta
    for beta in S["betas"]:
        train(f"dpo beta={beta}", train_dpo.main, d(f"dpo_beta{beta}"), beta=beta, **pair_files, **evaluation,
              **S["dpo"])
    # 3. the reward model, then PPO, RLOO and GRPO on it (and on the gold reward)
    train("reward model", train_rm.main, d("rm"), **pair_files, gold_eval=True if inputs.toy else None, **S["rm"])
    rl_common = dict(sft_ckpt=sft_ckpt, prompts=inputs.train_prompts, **evaluation, **S["rl"])
    for method, setting, folder, kwargs in rl_runs(S, cfg.gold_twins):
        reward_ckpt = dict(reward_ckpt=rm_ckpt) if kwargs["reward"] == "model" else {}
        train(f"{method} {setting}", train_ppo.main, d(folder), **kwargs, **reward_ckpt, **rl_common)
    # online DPO over beta, on the reward model (and the gold reward), sampling as much as an RL run
    for method, setting, folder, kwargs in online_runs(S, cfg.gold_twins):
        reward_ckpt = dict(reward_ckpt=rm_ckpt) if kwargs["reward"] == "model" else {}
        train(f"{method} {setting}", train_online_dpo.main, d(folder), **kwargs, **reward_ckpt,
              **{**rl_common, **S["online"]})

    # 4. preferred-FT: SFT continued on the chosen responses (the toy task's baseline)
    if inputs.gold:
        chosen_file = os.path.join(root, "chosen.jsonl")  # rewritten from the current pairs every time
        chosen = {(p.prompt, p.chosen) for p in load_preferences(pair_files["train_file"])}
        write_atomic(chosen_file, "".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                                          for p, c in sorted(chosen)))
        train("preferred-ft", train_sft.main, d("pft"), init_from=sft_ckpt, train_file=chosen_file,
              eval_samples=0, **S["pft"])

    # 5. the shared evaluation of the runs without one of their own (the SFT model, best-of-N,
    # preferred-FT), and the toy task's ceiling: deep on a subset of the prompts, and shallow on
    # all of them to measure the subset's offset
    reference, tok = load_gpt(sft_ckpt)
    tok = tok.with_chat_template("auto", chat_data=any(isinstance(p, list) for p in prompts))
    reference.to(device).eval()
    max_new_tokens = inputs.max_new_tokens or 40
    with autocast(device, cfg.dtype):
        judge = (load_judge(inputs.judge["judge_ckpt"] or "", inputs.judge["judge_fn"], (), tok, columns,
                            device, autocast(device, cfg.dtype)) if inputs.judge else None)
        evaluator = PolicyEvaluator(reference, tok, prompts, max_new_tokens, 1.0, seed=1337 + seed, judge=judge)
        reward_model = load_reward_model(rm_ckpt)[0].to(device).eval()
        bon = best_of_n_study(cfg, reference, reward_model, tok, prompts, columns, evaluator, seed, max_new_tokens)
        if inputs.gold:
            pft_metrics, _ = evaluator(load_gpt(os.path.join(d("pft"), "ckpt.pt"))[0].to(device))
            ceiling = ceiling_rows(cfg, reference, tok, prompts, seed)

    n, wall = len(prompts), lambda name: study.times.get(d(name), 0.0)
    sft_tokens = last_logged(d("sft"), "tokens") if sft_ckpt != inputs.model else None
    rows = [row("SFT", "-", last_eval_of_sft(evaluator, key), wall("sft"), sft_tokens, [], n, 0, key)]
    for beta in S["betas"]:
        name = f"dpo_beta{beta}"
        rows.append(row("DPO", f"beta={beta}", last_eval(d(name)), wall(name), last_logged(d(name), "tokens"),
                        path(d(name), key), n, pair_samples, key))
    # wall time, tokens and samples of a run on the reward model include its training and its pairs'
    for method, setting, folder, kwargs in rl_runs(S, cfg.gold_twins) + online_runs(S, cfg.gold_twins):
        rm_cost = kwargs["reward"] == "model"
        run_tokens = last_logged(d(folder), "tokens") + rm_cost * last_logged(d("rm"), "tokens")
        rows.append(row(method, setting, last_eval(d(folder)), wall(folder) + rm_cost * wall("rm"), run_tokens,
                        path(d(folder), key), n, last_logged(d(folder), "samples") + rm_cost * pair_samples, key))
    if inputs.gold:
        rows.append(row("preferred-FT", f"{S['pft']['max_iters']} steps", pft_metrics, wall("pft"),
                        last_logged(d("pft"), "tokens"), [], n, pair_samples, key))
    for N, score, kl, win in bon:
        rows.append({"method": "best-of-N", "setting": f"N={N}", "gold_reward": score, "ci95": None, "kl": kl,
                     "win_rate": win, "wall_s": None, "tokens": None, "drawn": N * n, "path": []})
    rows += ceiling if inputs.gold else []
    for r in rows:
        r["seed"] = seed
        r["stage_dir"] = root
    return rows


def last_eval_of_sft(evaluator: PolicyEvaluator, key: str) -> dict:
    """The SFT policy is the reference: KL 0 and win rate 0.5 by construction."""
    rewards = evaluator.reference_rewards
    return {key: statistics.fmean(rewards), f"{key}_std": statistics.pstdev(rewards), "eval/kl": 0.0,
            "eval/win_rate": 0.5}


def row(method, setting, m, wall, run_tokens, run_path, n_prompts, samples, key) -> dict:
    """A result row; ci95 is the normal 95% interval of the mean score over the prompts. The score
    (the gold reward, or the judge's) is kept under "gold_reward", the name the toy study gave it."""
    return {"method": method, "setting": setting, "gold_reward": m[key],
            "ci95": 1.96 * m[f"{key}_std"] / math.sqrt(n_prompts), "kl": m["eval/kl"],
            "win_rate": m["eval/win_rate"], "wall_s": wall, "tokens": run_tokens, "drawn": samples,
            "path": run_path}


@torch.no_grad()
def best_of_n_study(cfg, reference, reward_model, tok, prompts, columns, evaluator: PolicyEvaluator, seed,
                    max_new_tokens):
    """Best-of-N from SFT, ranked by the reward model trained here, scored as every method is (the
    gold reward or the judge): (N, score, KL bound, win rate vs SFT)."""
    K = cfg.bon_max
    repeated = [p for p in prompts for _ in range(K)]
    ids, texts, _ = sample_completions(reference, tok, repeated, max_new_tokens, 1.0, seed=7 + seed, batch_size=256)
    if evaluator.judge is None:
        judged = [gold_reward(t, p) for t, p in zip(texts, repeated)]
    else:
        judged = evaluator.judge(repeated, texts, [c for c in columns for _ in range(K)])
    gold = torch.tensor(judged).view(len(prompts), K)
    device = next(reward_model.parameters()).device
    scores = []
    for i in range(0, len(repeated), 256):
        batch = collate([(tok.encode_prompt(p) + c, 0) for p, c in zip(repeated[i:i + 256], ids[i:i + 256])],
                        tok.pad_id)
        scores.append(reward_model(batch["input_ids"].to(device),
                                   batch["attention_mask"].to(device)).float().cpu())
    scores = torch.cat(scores).view(len(prompts), K)
    ns = [2 ** i for i in range(int(math.log2(K)) + 1)]
    out = []
    ref = torch.tensor(evaluator.reference_rewards)
    for n, g, kl in best_of_n(gold, scores, ns):
        kept = gold[:, :n].gather(1, scores[:, :n].argmax(1)[:, None]).squeeze(1)
        win = ((kept > ref).float() + 0.5 * (kept == ref).float()).mean().item()
        out.append((n, g, kl, win))
    return out


CEILING_TILTS = [0.0, 1.0, 2.0, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0]
"""the strengths of the ceiling's proposals (evaluate.SentimentTilt), 0 the reference: the
reference's samples cover small KL, the strongest tilts' samples the KL ~ 8 where RL runs end
(its samples' mean gold reward is ~0.98), and the steps between keep every beta's pi* near one"""
CEILING_BETAS = [1.0, 0.3, 0.1, 0.05, 0.03, 0.02, 0.01, 0.007, 0.005, 0.004, 0.003, 0.002, 0.001]
"""in gold-reward units, not DPO's beta"""


@torch.no_grad()
def ceiling_study(reference, tok, prompts: list[str], samples: int, seed: int) -> list[tuple]:
    """The optimal frontier from `samples` completions of each prompt, in equal numbers from each
    tilt of the reference, every one weighted against their equal mixture (evaluate.
    mixture_log_ratio). Returns optimal_frontier's (beta, gold reward, KL, reached) per beta."""
    tilts = [SentimentTilt(tok, strength) for strength in CEILING_TILTS]
    per_tilt = samples // len(tilts)
    repeated = [p for p in prompts for _ in range(per_tilt)]
    ids, rewards = [], []
    for i, tilt in enumerate(tilts):
        tilt_ids, texts, _ = sample_completions(reference, tok, repeated, 40, 1.0, seed=11 + 2 * i + seed,
                                                batch_size=256, logits_processor=tilt)
        ids += tilt_ids
        rewards.append(torch.tensor([gold_reward(t, p) for t, p in zip(texts, repeated)]).view(
            len(prompts), per_tilt))
    prompt_ids = [tok.encode_prompt(p) for p in repeated] * len(tilts)
    # (C, C M per_tilt)
    logp = completion_logprobs(reference, prompt_ids, ids, tok.pad_id, batch_size=256, tilts=tilts).double()
    log_ratio = mixture_log_ratio(logp[0], logp).view(len(tilts), len(prompts), per_tilt)
    return optimal_frontier(torch.cat(rewards, dim=1), CEILING_BETAS,
                            torch.cat(log_ratio.unbind(0), dim=1))  # (M, C per_tilt)


def ceiling_rows(cfg, reference, tok, prompts: list[str], seed: int) -> list[dict]:
    """Result rows of the ceiling: "optimal" deep on the first ceiling_prompts prompts, and with
    ceiling_check_samples "optimal (all prompts)" shallow on every evaluation prompt, the same
    estimator, so that where both are within reach their difference is the subset's offset."""
    rows = []
    for method, subset, samples in (("optimal", prompts[:cfg.ceiling_prompts], cfg.ceiling_samples),
                                    ("optimal (all prompts)", prompts, cfg.ceiling_check_samples)):
        if samples == 0:
            continue
        for beta, gold, kl, reached in ceiling_study(reference, tok, subset, samples, seed):
            rows.append({"method": method, "setting": f"beta={beta:g}", "gold_reward": gold, "ci95": None,
                         "kl": kl, "win_rate": None, "wall_s": None, "tokens": None, "drawn": None, "path": [],
                         "reached": reached, "prompts": len(subset), "samples": samples})
    return rows


KL_POINTS = [1.0, 2.0, 4.0, 8.0]
"""the KLs (nats per completion) at which methods are compared"""
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
"""Student's t 97.5% quantiles by degrees of freedom, for a 95% interval over a few seeds"""


def crossing(points: list[tuple[float, float]], kl: float) -> tuple[int, float] | None:
    """Where a sequence of (KL, gold reward) points first reaches `kl`: the index of the segment
    and the gold reward interpolated linearly along it; None if it never does."""
    for i, ((k0, g0), (k1, g1)) in enumerate(zip(points, points[1:])):
        if k0 < kl <= k1:  # a path starts at KL 0, so it first reaches any KL on the way up
            return i, g0 + (g1 - g0) * (kl - k0) / (k1 - k0)
    return None


def gold_at_kl(points: list[tuple[float, float]], kl: float) -> float | None:
    """The gold reward where a run's path first reaches `kl`, or None."""
    found = crossing(points, kl)
    return None if found is None else found[1]


def curve_at_kl(points: list[dict], kl: float) -> tuple[float | None, bool]:
    """The gold reward of a curve of result rows (best-of-N's or the ceiling's points, in KL
    order) at `kl`, and whether a point it is read between is beyond the estimator's reach."""
    curve = sorted((r["kl"], r["gold_reward"], r.get("reached", True)) for r in points)
    found = crossing([(k, g) for k, g, _ in curve], kl)
    if found is None:
        return None, False
    i, value = found
    return value, not (curve[i][2] and curve[i + 1][2])


def interval(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t-interval (None for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def kl_matched(rows: list[dict], n_seeds: int) -> list[dict]:
    """Each method's gold reward at KL_POINTS, over seeds. A run's path starts at the reference
    (KL 0) and is read where it first reaches the KL; a method's value for a seed is its best
    setting's there (the sweep over its KL knob, as the DPO paper's frontier takes it). Best-of-N
    is read off its curve of N against the KL bound, the optimal policy off the ceiling's
    points, marked where they are beyond the estimator's reach. A method that reaches a KL on
    fewer seeds is averaged over those and says so; on none, the value is None."""
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] not in ("SFT", "preferred-FT")))
    table = []
    for method in methods:
        out = {"method": method}
        for kl in KL_POINTS:
            per_seed, beyond = [], False
            for seed in range(n_seeds):
                runs = [r for r in rows if r["method"] == method and r["seed"] == seed]
                # one curve through the settings' points
                if method == "best-of-N" or method.startswith("optimal"):
                    value, out_of_reach = curve_at_kl(runs, kl)
                    beyond |= out_of_reach
                else:
                    value = max((v for r in runs if (v := gold_at_kl(r["path"], kl)) is not None),
                                default=None)
                per_seed.append(value)
            values = [v for v in per_seed if v is not None]
            mean, half = interval(values) if values else (None, None)
            out[kl] = {"gold_reward": mean, "ci95": half, "seeds": len(values), "of": n_seeds,
                       "beyond_reach": beyond, "per_seed": per_seed}
        table.append(out)
    return table


def seeds_beating(matched: list[dict], baseline: str) -> list[dict]:
    """For each other method and KL point, (wins, n): on how many of the n seeds where both reach
    the KL the method's gold reward exceeds the baseline's. A claim holds on every seed when
    wins == n == the number of seeds."""
    base = next(m for m in matched if m["method"] == baseline)
    out = []
    for m in matched:
        if m is base:
            continue
        row = {"method": m["method"]}
        for kl in KL_POINTS:
            pairs = [(a, b) for a, b in zip(m[kl]["per_seed"], base[kl]["per_seed"])
                     if a is not None and b is not None]
            row[kl] = (sum(a > b for a, b in pairs), len(pairs))
        out.append(row)
    return out


def kl_cell(c: dict) -> str:
    if c["gold_reward"] is None:
        return "not reached"
    text = fmt(c["gold_reward"]) + (f" ± {fmt(c['ci95'])}" if c["ci95"] is not None else "")
    if c["seeds"] < c["of"]:
        text += f" ({c['seeds']}/{c['of']} seeds)"
    return text + (" †" if c["beyond_reach"] else "")


def matched_table(matched: list[dict]) -> list[str]:
    """The markdown lines of the KL-matched table."""
    return ["| method | " + " | ".join(f"KL {kl:g}" for kl in KL_POINTS) + " |",
            "|---|" + "---|" * len(KL_POINTS),
            *(f"| {m['method']} | " + " | ".join(kl_cell(m[kl]) for kl in KL_POINTS) + " |" for m in matched)]


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over seeds per method and setting; the spread is the standard deviation across seeds."""
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["setting"]), []).append(r)
    out = []
    for (method, setting), rs in groups.items():
        mean = lambda k: statistics.fmean(r[k] for r in rs) if rs[0][k] is not None else None
        spread = statistics.stdev(r["gold_reward"] for r in rs) if len(rs) > 1 else None
        out.append({"method": method, "setting": setting, "gold_reward": mean("gold_reward"),
                    "ci95": mean("ci95"), "seed_std": spread, "kl": mean("kl"), "win_rate": mean("win_rate"),
                    "wall_s": mean("wall_s"), "tokens": mean("tokens"), "drawn": mean("drawn"),
                    "seeds": len(rs)})
    return out


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def write_results(cfg: Config, inputs: Inputs, summary: list[dict], matched: list[dict], rows: list[dict],
                  seconds: float, stage_seconds: float) -> None:
    fields = ["method", "setting", "gold_reward", "ci95", "seed_std", "kl", "win_rate", "wall_s", "tokens", "drawn",
              "seeds"]
    with open(os.path.join(cfg.out_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: r[k] for k in fields} for r in summary)
    deep, check = (next((r for r in rows if r["method"] == m), None)
                   for m in ("optimal", "optimal (all prompts)"))
    offset = (f"the row below it on all {check['prompts']} with {check['samples']} each: "
              "where both are within reach, their difference is the subset's offset." if check else
              "its offset from all the prompts' is not estimated here (--ceiling_check_samples).")
    score = inputs.score
    ceiling = (f"The optimal row is estimated on the first {deep['prompts']} prompts with {deep['samples']} samples "
               "each; " + offset if deep else "")
    on = "the toy task" if not inputs.model else os.path.basename(os.path.normpath(inputs.model))
    lines = [f"# DPO vs RLHF on {on} (budget {cfg.budget}"
             f"{' with the gold-reward twins' if cfg.gold_twins and cfg.budget != 'full' else ''}, "
             f"{cfg.seeds} seed(s), "
             f"{time.strftime('%Y-%m-%d')}; training stages {stage_seconds / 60:.0f} min in all, this run "
             f"{seconds / 60:.0f} min)", "",
             f"## {score[0].upper() + score[1:]} at matched KL", "",
             f"Mean {score} on {cfg.eval_samples} held-out prompts where each method's evaluated path "
             "first reaches KL(pi || pi_SFT) = 1, 2, 4 and 8 nats (its best setting there), ± the 95% "
             f"t-interval over {cfg.seeds} seed(s). Best-of-N is read at its KL bound log N - (N-1)/N"
             + ("; † marks a ceiling read beyond its estimator's reach (fewer than 16 effective samples for the "
                "median prompt). " + ceiling if deep else ".")
             + ("" if inputs.gold else " The judge scores the held-out samples only: every method trains on the "
                "pairs, and the RL methods and online DPO on the reward model learned from them."), "",
             *matched_table(matched)]
    lines += ["", "## Seeds on which each method beats DPO at matched KL", "",
              f"wins/n: of the n seeds on which both it and DPO reach the KL, on how many its {score} "
              f"there is higher; {cfg.seeds}/{cfg.seeds} is a claim that holds on every seed.", "",
              "| method | " + " | ".join(f"KL {kl:g}" for kl in KL_POINTS) + " |",
              "|---|" + "---|" * len(KL_POINTS)]
    for m in seeds_beating(matched, "DPO"):
        cells = (f"{w}/{n}" if n else "-" for w, n in (m[kl] for kl in KL_POINTS))
        lines.append(f"| {m['method']} | " + " | ".join(cells) + " |")
    lines += ["", "## Every run at its end", "",
              f"ci95 is the 95% interval of the mean {score} over prompts; seed std the spread across seeds. "
              + ("The optimal rows are the ceiling pi* = pi_ref exp(r/beta) / Z (beta in gold-reward units), from "
                 f"equal numbers of samples of the reference and of its sentiment tilts of strengths "
                 f"{', '.join(f'{b:g}' for b in CEILING_TILTS[1:])} (evaluate.SentimentTilt), weighted against "
                 "their mixture. " if deep else "") + "Tokens are the real tokens of the "
              "training batches (DPO: chosen and rejected; RL: rollouts once per epoch); samples are the "
              "responses drawn for training (DPO and preferred-FT: the pairs'; RL and online DPO: rollouts, "
              "the reward-normalising batches too; best-of-N: N a held-out prompt); wall time, tokens and "
              "samples of a run on the reward model include the reward model's and its pairs'.", "",
              f"| method | setting | {score} | ci95 | seed std | KL | win rate vs SFT | wall s "
              "| tokens trained on | samples drawn |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['method']} | {r['setting']} | {fmt(r['gold_reward'])} | {fmt(r['ci95'])} "
                     f"| {fmt(r['seed_std'])} "
                     f"| {fmt(r['kl'], 2)} | {fmt(r['win_rate'])} | {fmt(r['wall_s'], 0)} "
                     f"| {fmt(r['tokens'], 0)} | {fmt(r['drawn'], 0)} |")
    write_atomic(os.path.join(cfg.out_dir, "results.md"), "\n".join(lines) + "\n")
    write_atomic(os.path.join(cfg.out_dir, "results.json"), json.dumps(rows, indent=1))
    write_atomic(os.path.join(cfg.out_dir, "kl_matched.json"), json.dumps(matched, indent=1))
    write_atomic(os.path.join(cfg.out_dir, "study.json"), json.dumps(
        {"score": score, "budget": cfg.budget, "model": inputs.model, "judge": inputs.judge}, indent=1))


def ceiling_only(cfg: Config, inputs: Inputs, study: Study, prompts: list[str], device) -> int:
    """The ceiling's rows for every seed from its SFT model alone, as kl_matched reads them."""
    rows = []
    for seed in range(cfg.seeds):
        reference, tok = load_gpt(sft_stage(cfg, inputs, study, seed))
        with autocast(device, cfg.dtype):
            rows += [dict(r, seed=seed)
                     for r in ceiling_rows(cfg, reference.to(device).eval(), tok, prompts, seed)]
    lines = [f"# The ceiling ({cfg.seeds} seed(s), {time.time() - study.t0:.0f} s)", "",
             *matched_table(kl_matched(rows, cfg.seeds))]
    write_atomic(os.path.join(cfg.out_dir, "ceiling.md"), "\n".join(lines) + "\n")
    write_atomic(os.path.join(cfg.out_dir, "ceiling.json"), json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


YOUR_MODEL_FLAGS = ("sft_file", "prompts", "eval_prompts", "pairs", "pairs_val", "judge", "judge_fn", "labeller",
                    "labeller_fn")
"""the flags of a study on your model (--model); the toy task's study takes none of them"""


def settle_inputs(cfg: Config, dist: Dist) -> Inputs:
    """Every setting of the study checked, before anything is written: the toy task's, or for your
    model its files (each read and validated), that the judge and the labeller load and score a
    text, and that the held-out prompts fit the model's context with the responses. One DataError
    line for the first problem. Your data split into the study's own files comes after
    (split_inputs)."""
    if cfg.ceiling_samples < len(CEILING_TILTS) or 0 < cfg.ceiling_check_samples < len(CEILING_TILTS):
        raise DataError(f"--ceiling_samples (and --ceiling_check_samples unless 0) must be at least "
                        f"{len(CEILING_TILTS)}, one sample from the reference and from each of its tilts")
    for flag in ("eval_samples", "bon_max", "seeds", "max_new_tokens", "lora_rank"):
        if getattr(cfg, flag) < (1 if flag in ("eval_samples", "bon_max") else 0):
            raise DataError(f"--{flag} {getattr(cfg, flag)}: out of range")
    check_tracker(cfg.report_to)
    if not cfg.model:
        given = [flag for flag in YOUR_MODEL_FLAGS + ("max_new_tokens",) if getattr(cfg, flag)]
        if given:
            raise DataError(f"--{given[0]} is a setting of the study on your model: give --model too")
        return Inputs(toy=True, gold=True, model="", train_prompts=os.path.join(cfg.data_dir, "prompts_train.jsonl"),
                      eval_prompts=os.path.join(cfg.data_dir, "prompts_val.jsonl"), judge={}, score="gold reward",
                      max_new_tokens=None)
    require_inputs(cfg, "model", "sft_file", "prompts", "eval_prompts", "pairs", "pairs_val", "judge", "labeller")
    toy = is_toy_model(cfg.model)
    for flag, why in (("gold_twins", "train on the toy task's gold reward"), ("ceiling_only", "estimate the toy "
                      "task's ceiling")):
        if getattr(cfg, flag):
            raise DataError(f"--{flag}: the -GT twins and the ceiling {why}, not with --model")
    if not (cfg.judge or cfg.judge_fn):
        raise DataError("--model: give the judge that scores every method, --judge FOLDER (a reward model) or "
                        "--judge_fn FILE.py:NAME")
    if not cfg.prompts:
        raise DataError("--model: give --prompts, the prompts RL samples (and the held-out ones, unless "
                        "--eval_prompts)")
    if cfg.pairs and (cfg.labeller or cfg.labeller_fn):
        raise DataError("--labeller and --labeller_fn label sampled pairs; with --pairs there are none to label")
    if not cfg.pairs and not (cfg.labeller or cfg.labeller_fn):
        raise DataError("--model: give --pairs FILE, or a labeller for pairs sampled from the SFT model (--labeller "
                        "FOLDER or --labeller_fn FILE.py:NAME; not the judge, so that reward hacking shows)")
    if cfg.pairs_val and not cfg.pairs:
        raise DataError("--pairs_val holds out pairs of --pairs: give --pairs")
    records = load_prompt_records(cfg.prompts)
    held_out = (load_prompt_records(cfg.eval_prompts)[:cfg.eval_samples] if cfg.eval_prompts
                else records[-cfg.eval_samples:])
    train = records if cfg.eval_prompts else records[:-cfg.eval_samples]
    S = sweeps(cfg, toy)
    needed = max(S["rl"].get("batch_size", 64), S["online"].get("batch_size", 32))
    if len(train) < needed:
        raise DataError(f"--prompts {cfg.prompts}: {len(records)} prompts, {len(train)} of them for training "
                        f"{'' if cfg.eval_prompts else f'(the last {cfg.eval_samples} held out, --eval_samples) '}"
                        f"where a step of the budget's RL takes {needed}")
    if cfg.pairs:
        pairs = load_preferences(cfg.pairs)
        if not cfg.pairs_val and len(pairs) < 20:
            raise DataError(f"--pairs {cfg.pairs}: {len(pairs)} pairs; the last 5% are held out, so at least 20")
        if cfg.pairs_val:
            load_preferences(cfg.pairs_val)
    if cfg.sft_file:
        load_sft(cfg.sft_file)
    max_new_tokens = None if toy else cfg.max_new_tokens or (64 if cfg.budget == "tiny" else 256)
    model, tok = load_gpt(cfg.model, dtype=None)
    tok = tok.with_chat_template("auto", chat_data=any(isinstance(p, list) for p, _ in held_out))
    longest = max(len(tok.encode_prompt(p)) for p, _ in held_out)
    check_lengths(model.config.block_size, ("the longest held-out prompt", longest),
                  ("--max_new_tokens", max_new_tokens or 40))
    for who, ckpt, fns in (("judge", cfg.judge, cfg.judge_fn), ("labeller", cfg.labeller, cfg.labeller_fn)):
        if ckpt or fns:  # it loads, and scores a text: the first held-out prompt and a reply
            scorer = load_judge(ckpt, fns, (), tok, [held_out[0][1]], torch.device("cpu"), contextlib.nullcontext(),
                                flag=f"--{who}_fn")
            score = scorer([held_out[0][0]], ["Thank you."])[0]
            if not math.isfinite(score):
                raise DataError(f"--{who}: scored a reply {score}, not a finite number")
    same = ({os.path.realpath(cfg.judge)} - {os.path.realpath("")}) & {os.path.realpath(cfg.labeller)} or \
        set(cfg.judge_fn) & set(cfg.labeller_fn)
    if same and dist.master:
        print(f"warning: the judge is also the labeller ({', '.join(sorted(same))}): the reward model learns the "
              "judge, and reward hacking it would not show")
    judge = {"judge_ckpt": cfg.judge or None, "judge_fn": cfg.judge_fn}
    name = ", ".join([model_name(cfg.judge)] * bool(cfg.judge) + [spec.rpartition(":")[2] for spec in cfg.judge_fn])
    return Inputs(toy=toy, gold=False, model=cfg.model,
                  train_prompts=cfg.prompts if cfg.eval_prompts else inputs_file(cfg, "prompts_train"),
                  eval_prompts=cfg.eval_prompts or inputs_file(cfg, "prompts_eval"), judge=judge,
                  score=f"judge score ({name})", max_new_tokens=max_new_tokens)


def split_inputs(cfg: Config) -> None:
    """Your prompts less the held-out ones, the held-out ones, and your pairs less the last 5%
    and those, as the study's own files under out_dir/data (rewritten each time: the same)."""
    os.makedirs(os.path.join(cfg.out_dir, "data"), exist_ok=True)
    write = lambda name, records: write_atomic(inputs_file(cfg, name), "".join(json.dumps(r) + "\n" for r in records))
    if not cfg.eval_prompts:
        records = [record for _, record in read_records(cfg.prompts)]
        write("prompts_train", records[:-cfg.eval_samples])
        write("prompts_eval", records[-cfg.eval_samples:])
    if cfg.pairs:
        records = [record for _, record in read_records(cfg.pairs)]
        held_out = [record for _, record in read_records(cfg.pairs_val)] if cfg.pairs_val else None
        cut = len(records) if held_out is not None else len(records) - max(1, len(records) // 20)
        write("pairs_train", records[:cut])
        write("pairs_val", held_out if held_out is not None else records[cut:])


def stage_count(cfg: Config, inputs: Inputs) -> int:
    """How many stages the study runs (or reuses), for its progress lines."""
    S = sweeps(cfg, inputs.toy)
    per_seed = ((not inputs.model or bool(cfg.sft_file)) + (not cfg.pairs) + len(S["betas"]) + 1
                + len(rl_runs(S, cfg.gold_twins)) + len(online_runs(S, cfg.gold_twins)) + inputs.gold)
    return per_seed * cfg.seeds


STUDY_TIMEOUT = datetime.timedelta(hours=6)
"""how long a rank waits for the others under torchrun: rank 0 samples the pairs alone (an hour
at --budget full on a laptop GPU's estimates)"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(Config, argv, __doc__)
    cfg.seeds = cfg.seeds or (3 if cfg.budget == "full" and not cfg.model else 1)
    cfg.gold_twins |= cfg.budget == "full" and not cfg.model
    dist = setup_distributed(cfg.device, timeout=STUDY_TIMEOUT)  # under torchrun, one process group for every stage
    try:
        return study(cfg, dist, argv)
    except KeyboardInterrupt:
        if dist.master:
            print(f"\ninterrupted: the finished stages are kept, and the one stopped goes on from its last checkpoint "
                  f"with the same command: python compare.py {shlex.join(argv)}", file=sys.stderr)
        return 130
    finally:
        cleanup_distributed(dist, finished=False)


def study(cfg: Config, dist: Dist, argv: list[str]) -> int:
    try:
        inputs = settle_inputs(cfg, dist)
    except DataError as e:
        if dist.master:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if dist.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        if inputs.model:
            split_inputs(cfg)
        else:
            prepare_toy_data(cfg.data_dir)
    sync(dist)
    records = load_prompt_records(inputs.eval_prompts)[:cfg.eval_samples]
    prompts, columns = [p for p, _ in records], [c for _, c in records]
    study = Study(cfg, cfg.seeds if cfg.ceiling_only else stage_count(cfg, inputs), dist)
    if cfg.ceiling_only:
        return ceiling_only(cfg, inputs, study, prompts, dist.device)
    rows = []
    for seed in range(cfg.seeds):  # every rank evaluates as rank 0 does (the same numbers), so none waits on it
        rows += run_seed(cfg, inputs, study, seed, prompts, columns, dist.device)
    if not dist.master:
        return 0
    write_results(cfg, inputs, summarise(rows), kl_matched(rows, cfg.seeds), rows, time.time() - study.t0,
                  sum(study.times.values()))  # stages reused from an earlier run count with the time they
                                              # took then
    print(open(os.path.join(cfg.out_dir, "results.md")).read())
    import plot  # imports matplotlib only when drawing; without it, one line says how to get it
    plot.study_figures(cfg.out_dir)
    print(f"study done in {time.time() - study.t0:.0f}s; results in {cfg.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
