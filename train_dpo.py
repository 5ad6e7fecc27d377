"""
DPO: fine-tune the SFT policy directly on preference pairs against a frozen copy of itself.

    python sample.py --pairs                           # toy pairs from the SFT policy, once
    python train_dpo.py                                # DPO on them, tiny model, CPU
    python train_dpo.py --precompute_ref               # reference log-probs once, then no reference forward
    torchrun --nproc_per_node 2 train_dpo.py           # the same run on 2 processes
    python train_dpo.py --train_file hh_train.jsonl --val_file hh_test.jsonl --gold_eval false

Settings of the papers, for real data (the defaults here suit the tiny toy model, which wants a
larger learning rate): the DPO paper (Rafailov et al. 2023, appendix B) used beta 0.1, batch 64,
RMSprop at lr 1e-6 with 150 warmup steps; Zephyr-7B (Tunstall et al. 2023) used beta 0.1, Adam
at lr 5e-7, warmup over the first 10% of steps, batch 32 or more, 1-3 epochs over UltraFeedback.
"""
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Literal

import torch

from data import gold_reward, load_prompts, take
from dpo import LOSS_TYPES, concatenated_forward, dpo_loss, dpo_metric_sums
from evaluate import PolicyEvaluator
from train_utils import (Dist, PairsConfig, Run, all_reduce_sum, autocast, fit, load_gpt, load_pairs,
                         make_optimizer, run_script, seed_everything)


@dataclass
class Config(PairsConfig):
    out_dir: str = "out/dpo"
    """folder for config.json, metrics.jsonl, ckpt.pt (and reference_logps.pt)"""
    # DPO
    beta: float = 0.1
    """KL strength: the implicit reward is beta * log(pi / pi_ref)"""
    loss_type: Literal[LOSS_TYPES] = "sigmoid"
    """sigmoid (DPO), ipo, hinge (SLiC) or robust (rDPO); see dpo.dpo_loss"""
    label_smoothing: float = 0.0
    """assumed label-flip rate: conservative DPO with sigmoid, rDPO with robust"""
    reference_free: bool = False
    """compare against a uniform reference instead of the SFT model"""
    precompute_ref: bool = False
    """compute the reference log-probs of every pair once, cache them in out_dir, free the reference"""
    # evaluation
    gold_eval: bool = True
    """sample held-out toy prompts at each evaluation: gold reward, KL to the reference, win rate"""
    eval_prompts: str = "data/toy/prompts_val.jsonl"
    """held-out prompts for --gold_eval"""
    eval_samples: int = 256
    """held-out prompts sampled at each evaluation"""
    max_new_tokens: int = 40
    """longest sampled completion"""
    temperature: float = 1.0
    """sampling temperature of the evaluation samples"""
    # learning rate for the toy task
    lr: float = 1e-4
    """peak learning rate"""
    min_lr: float = 1e-5
    """learning rate at the end of the cosine decay"""


def reference_logps(reference, data: dict[str, torch.Tensor], average: bool, dist: Dist, ctx,
                    batch_size: int) -> torch.Tensor:
    """(N, 2) chosen and rejected log-probs of every pair under the reference, in one pass
    sharded over ranks and summed back together."""
    out = torch.zeros(len(data["chosen_input_ids"]), 2, device=dist.device)
    for idx in torch.arange(len(out))[dist.rank::dist.world_size].split(batch_size):
        batch = {k: v.to(dist.device) for k, v in take(data, idx).items()}
        with torch.no_grad(), ctx:
            out[idx.to(dist.device)] = torch.stack(concatenated_forward(reference, batch, average), dim=1)
    return all_reduce_sum(out, dist).cpu()


def cached_reference_logps(cfg: Config, reference, datasets: dict, average: bool, dist: Dist, ctx) -> dict:
    """Reference log-probs of each dataset, from out_dir/reference_logps.pt when it was made
    from the same reference and the same tokenised pairs, else computed and saved there."""
    path = os.path.join(cfg.out_dir, "reference_logps.pt")
    h = hashlib.sha256(json.dumps([cfg.sft_ckpt, os.path.getmtime(cfg.sft_ckpt), average]).encode())
    for name in sorted(datasets):
        for v in datasets[name].values():
            h.update(v.numpy().tobytes())
    key = h.hexdigest()
    if os.path.exists(path):
        cached = torch.load(path, weights_only=True)
        if cached["key"] == key:
            return cached["logps"]
    logps = {name: reference_logps(reference, data, average, dist, ctx, cfg.batch_size)
             for name, data in datasets.items()}
    if dist.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        torch.save({"key": key, "logps": logps}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return logps


def train(cfg: Config, dist: Dist) -> dict:
    seed_everything(cfg.seed, dist)
    run = Run(cfg, dist)
    # 1. data, validated before anything is written
    policy, tok, _ = load_gpt(cfg.sft_ckpt)
    train_data, _, val_data = load_pairs(cfg, tok)
    prompts = load_prompts(cfg.eval_prompts)[:cfg.eval_samples] if cfg.gold_eval else []

    # 2. policy and frozen reference, both from the SFT checkpoint
    policy.to(dist.device)
    reference = load_gpt(cfg.sft_ckpt)[0].to(dist.device).eval().requires_grad_(False)
    average = cfg.loss_type == "ipo"  # IPO compares length-normalised log-probs, as TRL does
    if cfg.precompute_ref:
        logps = cached_reference_logps(cfg, reference, {"train": train_data, "val": val_data}, average,
                                       dist, autocast(dist.device, cfg.dtype))
        for data, name in ((train_data, "train"), (val_data, "val")):
            data["reference_chosen_logps"], data["reference_rejected_logps"] = logps[name].unbind(1)
    evaluator = None
    if dist.master and prompts:
        with autocast(dist.device, cfg.dtype):
            evaluator = PolicyEvaluator(reference, tok, prompts, cfg.max_new_tokens, cfg.temperature,
                                        cfg.seed, offload=cfg.precompute_ref)
    if cfg.precompute_ref:
        reference.cpu()  # off the accelerator: training never runs it again, evaluation borrows it
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), dist.device)
    if dist.master:
        print(f"policy: {policy.num_params() / 1e6:.2f}M parameters, {len(train_data['chosen_input_ids'])} "
              f"training pairs, {len(val_data['chosen_input_ids'])} held-out, {dist.world_size} "
              f"process(es) on {dist.device}, reference {'precomputed' if cfg.precompute_ref else 'live'}")

    # 3. the DPO loss of a batch of pairs (Rafailov et al. 2023, eq. 7, or a variant)
    def loss_fn(model, batch):
        policy_chosen, policy_rejected = concatenated_forward(model, batch, average)
        if cfg.precompute_ref:
            ref_chosen, ref_rejected = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
        else:
            with torch.no_grad():
                ref_chosen, ref_rejected = concatenated_forward(reference, batch, average)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, cfg.beta, cfg.loss_type,
            cfg.label_smoothing, cfg.reference_free)
        return losses.sum(), dpo_metric_sums(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)

    # 4. held-out DPO metrics on every rank's shard of the pairs; samples on rank 0
    @torch.no_grad()
    def evaluate(model, ctx):
        model.eval()
        sums, names = None, None
        for idx in torch.arange(len(val_data["chosen_input_ids"]))[dist.rank::dist.world_size].split(cfg.batch_size):
            batch = {k: v.to(dist.device) for k, v in take(val_data, idx).items()}
            with ctx:
                loss_sum, metric_sums = loss_fn(model, batch)
            values = torch.stack([loss_sum.float(), *(v.float() for v in metric_sums.values())])
            sums, names = (values if sums is None else sums + values), ["loss", *metric_sums]
        sums = all_reduce_sum(sums, dist) / len(val_data["chosen_input_ids"])
        metrics, lines = {f"eval/{k}": v for k, v in zip(names, sums.tolist())}, []
        if evaluator is not None:
            with ctx:
                sample_metrics, texts = evaluator(policy)
            metrics.update(sample_metrics)
            lines = [f"[{p}] {t}   (gold reward {gold_reward(t, p):.2f})"
                     for p, t in list(zip(prompts, texts))[:cfg.print_samples]]
        model.train()
        return metrics, lines

    return fit(cfg, dist, run, policy, optimizer, tok, train_data, loss_fn, lambda data, idx: len(idx),
               evaluate, "dpo")


def main(argv=None) -> int:
    return run_script(Config, train, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
