"""
The study: DPO against RLHF on the toy task, end to end, in the protocol of the DPO paper's
controlled-sentiment experiment (Rafailov et al. 2023, section 6, figure 2 left): SFT once, K=4
samples per training prompt labelled by the gold reward, then DPO over a sweep of beta, a reward
model then PPO over a sweep of KL targets, PPO on the gold reward (PPO-GT), and two cheap
baselines, best-of-N from SFT ranked by the reward model and preferred-FT (SFT on the chosen
responses). Every method is evaluated on the same held-out prompts by evaluate.PolicyEvaluator
along its run, so each run draws a path in the reward-KL plane, and against the ceiling: the
optimal KL-regularised policy, estimated by importance weights over reference samples.

    python compare.py                     # the reduced study, about 10 minutes on a 2-core CPU
    python compare.py --full              # the full sweep
    python compare.py --seeds 3           # repeat with 3 training seeds, report mean and spread

Writes to out_dir: results.md and results.csv (a row per method and setting), frontier.png,
curves.png, and one folder per stage with its config.json, metrics.jsonl and ckpt.pt. A stage
whose folder holds a finished run is reused, so an interrupted study resumes where it stopped.
"""
import csv
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch

import sample
import train_dpo
import train_ppo
import train_rm
import train_sft
from data import collate, gold_reward, load_preferences, load_prompts, prepare_toy_data, write_atomic
from evaluate import PolicyEvaluator, best_of_n, optimal_frontier, sample_completions
from train_utils import autocast, load_gpt, load_reward_model, parse_config, pick_device


@dataclass
class Config:
    out_dir: str = "out/study"
    """folder for the results and one subfolder per stage"""
    full: bool = False
    """the full sweep: DPO beta in {0.05, 0.1, 1, 5}, PPO KL targets {1, 2, 4, 8}, longer PPO runs"""
    seeds: int = 1
    """training seeds; the toy data and the held-out prompts stay the same"""
    data_dir: str = "data/toy"
    """the toy task's folder, written on first use"""
    eval_samples: int = 256
    """held-out prompts in every evaluation"""
    bon_max: int = 16
    """best-of-N is traced for N = 1, 2, 4, ... up to this"""
    ceiling_prompts: int = 64
    """held-out prompts used to estimate the optimal frontier"""
    ceiling_samples: int = 256
    """reference samples per prompt for the optimal frontier (its KL estimate tops out at log of this)"""
    tiny: bool = False
    """a smoke-test size: every stage a few steps (for the tests; the numbers mean nothing)"""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto: cuda, then mps, then cpu"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """bfloat16 runs under autocast"""


def sweeps(cfg: Config) -> dict:
    """Every method's settings and run lengths. The tuning budget is the same for both sides:
    one learning rate per method, picked by hand for a stable default run, and the sweep over
    its KL knob (beta for DPO, the KL target for PPO)."""
    if cfg.tiny:
        return dict(betas=[0.1, 1.0], kl_targets=[2.0], sft=dict(max_iters=20, eval_interval=20),
                    dpo=dict(max_iters=4, eval_interval=2), rm=dict(max_iters=4, eval_interval=4),
                    ppo=dict(max_iters=2, eval_interval=1, batch_size=32, gen_chunk=16),
                    pft=dict(max_iters=4, eval_interval=4), pairs=dict(n_train_prompts=64, n_val_prompts=32))
    return dict(
        betas=[0.05, 0.1, 1.0, 5.0] if cfg.full else [0.05, 0.5],
        kl_targets=[1.0, 2.0, 4.0, 8.0] if cfg.full else [2.0, 6.0],
        sft=dict(), dpo=dict(), rm=dict(), pairs=dict(),
        ppo=dict(max_iters=100, eval_interval=20) if cfg.full else dict(max_iters=60, eval_interval=20),
        pft=dict(max_iters=300, eval_interval=100, lr=1e-4, min_lr=1e-5, warmup_iters=30),
    )


def flags(**kwargs) -> list[str]:
    return [f"--{k}={v}" for k, v in kwargs.items()]


class Study:
    def __init__(self, cfg: Config):
        self.cfg, self.t0 = cfg, time.time()
        self.times_path = os.path.join(cfg.out_dir, "stage_times.json")
        self.times = json.load(open(self.times_path)) if os.path.exists(self.times_path) else {}

    def stage(self, name: str, out_dir: str, args: list[str], run) -> None:
        """Run a stage unless out_dir holds its finished output for the same arguments; an
        unfinished training run with the same arguments is resumed, anything else redone.
        run(args) does the work; the stage's wall time is kept for the results table."""
        marker, ckpt = os.path.join(out_dir, "done.json"), os.path.join(out_dir, "ckpt.pt")
        previous = json.load(open(marker)) if os.path.exists(marker) else None
        if previous == args:
            print(f"[{time.time() - self.t0:6.0f}s] {name}: reused {out_dir}")
            return
        config_path = os.path.join(out_dir, "stage_args.json")
        same = os.path.exists(config_path) and json.load(open(config_path)) == args
        resume = same and previous is None and os.path.exists(ckpt)
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(marker):
            os.remove(marker)
        write_atomic(config_path, json.dumps(args))
        print(f"[{time.time() - self.t0:6.0f}s] {name}: {'resuming' if resume else 'running'} -> {out_dir}", flush=True)
        t = time.time()
        if run(args + (["--resume"] if resume else ["--overwrite"] if os.path.exists(ckpt) else [])) not in (0, None):
            raise SystemExit(f"error: stage {name} failed")
        self.times[out_dir] = (self.times.get(out_dir, 0.0) if resume else 0.0) + time.time() - t
        write_atomic(self.times_path, json.dumps(self.times, indent=1))
        write_atomic(marker, json.dumps(args))
        print(f"[{time.time() - self.t0:6.0f}s] {name}: done in {time.time() - t:.0f}s", flush=True)


def last_eval(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "eval/kl" in r][-1]


def tokens(out_dir: str) -> int:
    """Real tokens the run trained on (the last "tokens" it logged)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r["tokens"] for r in map(json.loads, f) if "tokens" in r][-1]


def path(out_dir: str) -> list[tuple[float, float]]:
    """(KL, gold reward) at every evaluation of a run."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(r["eval/kl"], r["eval/gold_reward"]) for r in map(json.loads, f) if "eval/kl" in r]


def run_seed(cfg: Config, study: Study, seed: int, prompts: list[str], device) -> list[dict]:
    """The whole pipeline for one training seed; returns its result rows."""
    S = sweeps(cfg)
    root = os.path.join(cfg.out_dir, f"seed{seed}")
    common = dict(device=cfg.device, dtype=cfg.dtype, seed=1337 + seed)
    evaluation = dict(eval_prompts=os.path.join(cfg.data_dir, "prompts_val.jsonl"), eval_samples=cfg.eval_samples)
    d = lambda name: os.path.join(root, name)
    sft_ckpt, rm_ckpt, pairs = os.path.join(d("sft"), "ckpt.pt"), os.path.join(d("rm"), "ckpt.pt"), d("pairs")

    def train(name, main, out_dir, **kwargs):
        study.stage(name, out_dir, flags(out_dir=out_dir, **common, **kwargs), main)

    # 1. SFT, and preference pairs from it (K=4 per prompt, labelled by the gold reward)
    train("sft", train_sft.main, d("sft"), data_dir=cfg.data_dir, **S["sft"])
    study.stage("pairs", pairs, flags(ckpt=sft_ckpt, pairs=True, data_dir=cfg.data_dir, out_dir=pairs,
                                      device=cfg.device, seed=seed, **S["pairs"]), sample.main)
    pair_files = dict(sft_ckpt=sft_ckpt, train_file=f"{pairs}/pairs_train.jsonl", val_file=f"{pairs}/pairs_val.jsonl")

    # 2. DPO over beta
    for beta in S["betas"]:
        train(f"dpo beta={beta}", train_dpo.main, d(f"dpo_beta{beta}"), beta=beta, **pair_files, **evaluation, **S["dpo"])
    # 3. reward model, then PPO over KL targets, and PPO on the gold reward
    train("reward model", train_rm.main, d("rm"), **pair_files, **S["rm"])
    ppo_common = dict(sft_ckpt=sft_ckpt, prompts=os.path.join(cfg.data_dir, "prompts_train.jsonl"), **evaluation, **S["ppo"])
    for target in S["kl_targets"]:
        train(f"ppo kl_target={target}", train_ppo.main, d(f"ppo_kl{target}"), reward_ckpt=rm_ckpt, adaptive_kl=True,
              kl_target=target, kl_coef=0.05, kl_horizon=500, **ppo_common)
    train("ppo-gt", train_ppo.main, d("ppo_gt"), reward="gold", **ppo_common)

    # 4. preferred-FT: SFT continued on the chosen responses
    chosen_file = os.path.join(root, "chosen.jsonl")  # rewritten from the current pairs every time
    chosen = {(p.prompt, p.chosen) for p in load_preferences(pair_files["train_file"])}
    write_atomic(chosen_file, "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in sorted(chosen)))
    train("preferred-ft", train_sft.main, d("pft"), init_from=sft_ckpt, train_file=chosen_file, eval_samples=0, **S["pft"])

    # 5. the shared evaluation of the runs without one of their own, and the ceiling
    reference, tok, _ = load_gpt(sft_ckpt)
    reference.to(device).eval()
    with autocast(device, cfg.dtype):
        evaluator = PolicyEvaluator(reference, tok, prompts, 40, 1.0, seed=1337 + seed)
        pft_policy = load_gpt(os.path.join(d("pft"), "ckpt.pt"))[0].to(device)
        pft_metrics, _ = evaluator(pft_policy)
        bon = best_of_n_study(cfg, reference, load_reward_model(rm_ckpt)[0].to(device).eval(), tok, prompts,
                              evaluator.reference_rewards, seed, device)
        ceiling = ceiling_study(cfg, reference, tok, prompts[:cfg.ceiling_prompts], seed)

    n, wall = len(prompts), lambda name: study.times.get(d(name), 0.0)
    rows = [row("SFT", "-", last_eval_of_sft(evaluator), wall("sft"), tokens(d("sft")), [], n)]
    for beta in S["betas"]:
        name = f"dpo_beta{beta}"
        rows.append(row("DPO", f"beta={beta}", last_eval(d(name)), wall(name), tokens(d(name)), path(d(name)), n))
    for target in S["kl_targets"]:  # PPO's wall time and tokens include its reward model's
        name = f"ppo_kl{target}"
        rows.append(row("PPO", f"kl_target={target}", last_eval(d(name)), wall(name) + wall("rm"),
                        tokens(d(name)) + tokens(d("rm")), path(d(name)), n))
    rows.append(row("PPO-GT", "kl_coef=0.05", last_eval(d("ppo_gt")), wall("ppo_gt"), tokens(d("ppo_gt")),
                    path(d("ppo_gt")), n))
    rows.append(row("preferred-FT", f"{S['pft']['max_iters']} steps", pft_metrics, wall("pft"), tokens(d("pft")), [], n))
    for N, gold, kl, win in bon:
        rows.append({"method": "best-of-N", "setting": f"N={N}", "gold_reward": gold, "ci95": None, "kl": kl,
                     "win_rate": win, "wall_s": None, "tokens": None, "path": []})
    for beta, gold, kl in ceiling:
        rows.append({"method": "optimal", "setting": f"beta={beta:g}", "gold_reward": gold, "ci95": None, "kl": kl,
                     "win_rate": None, "wall_s": None, "tokens": None, "path": []})
    for r in rows:
        r["seed"] = seed
        r["stage_dir"] = root
    return rows


def last_eval_of_sft(evaluator: PolicyEvaluator) -> dict:
    """The SFT policy is the reference: KL 0 and win rate 0.5 by construction."""
    rewards = evaluator.reference_rewards
    return {"eval/gold_reward": statistics.fmean(rewards), "eval/gold_reward_std": statistics.pstdev(rewards),
            "eval/kl": 0.0, "eval/win_rate": 0.5}


def row(method, setting, m, wall, run_tokens, run_path, n_prompts) -> dict:
    """A result row; ci95 is the normal 95% interval of the mean gold reward over the prompts."""
    return {"method": method, "setting": setting, "gold_reward": m["eval/gold_reward"],
            "ci95": 1.96 * m["eval/gold_reward_std"] / math.sqrt(n_prompts), "kl": m["eval/kl"],
            "win_rate": m["eval/win_rate"], "wall_s": wall, "tokens": run_tokens, "path": run_path}


@torch.no_grad()
def best_of_n_study(cfg, reference, reward_model, tok, prompts, reference_rewards, seed, device):
    """Best-of-N from SFT, ranked by the reward model: (N, gold reward, KL bound, win rate vs SFT)."""
    K = cfg.bon_max
    repeated = [p for p in prompts for _ in range(K)]
    ids, texts, _ = sample_completions(reference, tok, repeated, 40, 1.0, seed=7 + seed, batch_size=256)
    gold = torch.tensor([gold_reward(t, p) for t, p in zip(texts, repeated)]).view(len(prompts), K)
    scores = []
    for i in range(0, len(repeated), 256):
        batch = collate([(tok.encode_prompt(p) + c, 0) for p, c in zip(repeated[i:i + 256], ids[i:i + 256])], tok.pad_id)
        scores.append(reward_model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu())
    scores = torch.cat(scores).view(len(prompts), K)
    ns = [2 ** i for i in range(int(math.log2(K)) + 1)]
    out = []
    ref = torch.tensor(reference_rewards)
    for n, g, kl in best_of_n(gold, scores, ns):
        kept = gold[:, :n].gather(1, scores[:, :n].argmax(1)[:, None]).squeeze(1)
        win = ((kept > ref).float() + 0.5 * (kept == ref).float()).mean().item()
        out.append((n, g, kl, win))
    return out


@torch.no_grad()
def ceiling_study(cfg, reference, tok, prompts, seed):
    """The optimal frontier from ceiling_samples reference samples of each of the prompts."""
    K = cfg.ceiling_samples
    repeated = [p for p in prompts for _ in range(K)]
    _, texts, _ = sample_completions(reference, tok, repeated, 40, 1.0, seed=11 + seed, batch_size=256)
    rewards = torch.tensor([gold_reward(t, p) for t, p in zip(texts, repeated)]).view(len(prompts), K)
    betas = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 3.0]  # in gold-reward units, not DPO's beta
    return optimal_frontier(rewards, betas)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over seeds per method and setting; the spread is the standard deviation across seeds."""
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["setting"]), []).append(r)
    out = []
    for (method, setting), rs in groups.items():
        mean = lambda k: statistics.fmean(r[k] for r in rs) if rs[0][k] is not None else None
        spread = statistics.stdev(r["gold_reward"] for r in rs) if len(rs) > 1 else None
        out.append({"method": method, "setting": setting, "gold_reward": mean("gold_reward"), "ci95": mean("ci95"),
                    "seed_std": spread, "kl": mean("kl"), "win_rate": mean("win_rate"), "wall_s": mean("wall_s"),
                    "tokens": mean("tokens"), "seeds": len(rs)})
    return out


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def write_results(cfg: Config, summary: list[dict], rows: list[dict]) -> None:
    fields = ["method", "setting", "gold_reward", "ci95", "seed_std", "kl", "win_rate", "wall_s", "tokens", "seeds"]
    with open(os.path.join(cfg.out_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: r[k] for k in fields} for r in summary)
    lines = [f"# DPO vs RLHF on the toy task ({'full' if cfg.full else 'reduced'} study, {cfg.seeds} seed(s), "
             f"{time.strftime('%Y-%m-%d')})", "",
             f"Gold reward and KL(pi || pi_SFT) on {cfg.eval_samples} held-out prompts; ci95 is the 95% interval of the "
             "mean gold reward over prompts; seed_std the spread across seeds. Best-of-N's KL is the bound "
             "log N - (N-1)/N; the optimal rows are the ceiling pi* = pi_ref exp(r/beta) / Z. Tokens are the real "
             "tokens of the training batches (DPO: chosen and rejected; PPO: rollouts once per epoch, plus its "
             "reward model's); wall time and tokens of PPO include its reward model.", "",
             "| method | setting | gold reward | ci95 | seed std | KL | win rate vs SFT | wall s | tokens trained on |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['method']} | {r['setting']} | {fmt(r['gold_reward'])} | {fmt(r['ci95'])} | {fmt(r['seed_std'])} "
                     f"| {fmt(r['kl'], 2)} | {fmt(r['win_rate'])} | {fmt(r['wall_s'], 0)} | {fmt(r['tokens'], 0)} |")
    write_atomic(os.path.join(cfg.out_dir, "results.md"), "\n".join(lines) + "\n")
    write_atomic(os.path.join(cfg.out_dir, "results.json"), json.dumps(rows, indent=1))


def main(argv=None) -> int:
    cfg = parse_config(Config, argv, __doc__)
    os.makedirs(cfg.out_dir, exist_ok=True)
    device = pick_device(cfg.device)
    prepare_toy_data(cfg.data_dir)
    prompts = load_prompts(os.path.join(cfg.data_dir, "prompts_val.jsonl"))[:cfg.eval_samples]
    study = Study(cfg)
    rows = []
    for seed in range(cfg.seeds):
        rows += run_seed(cfg, study, seed, prompts, device)
    summary = summarise(rows)
    write_results(cfg, summary, rows)
    print(open(os.path.join(cfg.out_dir, "results.md")).read())
    import plot  # imports matplotlib only when drawing; without it, one line says how to get it
    plot.study_figures(cfg.out_dir)
    print(f"study done in {time.time() - study.t0:.0f}s; results in {cfg.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
