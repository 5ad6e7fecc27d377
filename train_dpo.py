"""
DPO: fine-tune the SFT policy directly on preference pairs against a frozen copy of itself.
The math is dpo.py's; this file holds the run: data, the reference, the loop, evaluation.

    python sample.py --pairs                           # toy pairs from the SFT policy, once
    python train_dpo.py                                # DPO on them, tiny model, CPU
    python train_dpo.py --precompute_ref               # reference log-probs once, then no reference forward
    torchrun --nproc_per_node 2 train_dpo.py           # the same run on 2 processes
    python train_dpo.py --lora_rank 8 --lr 2e-3        # LoRA adapters; the reference is them switched off
    python train_dpo.py --sft_ckpt MODEL_FOLDER --train_file hh_train.jsonl --val_file hh_test.jsonl

Settings of the papers, for real data (the defaults here suit the tiny toy model, which wants a
larger learning rate): the DPO paper (Rafailov et al. 2023, appendix B) used beta 0.1, batch 64,
RMSprop at lr 1e-6 with 150 warmup steps; Zephyr-7B (Tunstall et al. 2023) used beta 0.1, Adam
at lr 5e-7, warmup over the first 10% of steps, batch 32 or more, 1-3 epochs over UltraFeedback.
"""
import dataclasses
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from checkpoint import Run, fingerprint, is_toy_model, load_gpt
from data import TOY_PROMPTS, PairsConfig, load_pairs, load_prompt_records, real_tokens, take
from distributed import Dist, all_reduce_sum, seed_everything, wrap_model
from dpo import LOSS_TYPES, concatenated_forward, dpo_loss, dpo_metric_sums, response_lengths
from evaluate import PolicyEvaluator
from files import DataError, replace_atomically
from rewards import JudgeConfig, has_judge, load_judge
from toy import gold_reward
from train_utils import (TrainConfig, add_sums, all_reduce_sums, autocast, batch_means, check_batches,
                         check_lengths, check_pair_settings, check_training_settings, check_weights,
                         clip_grad_norm, default_max_length, frozen_reference, global_batch, gradient_sync,
                         lora_record, make_optimizer, micro_batches, n_trainable, prepare_trainable,
                         print_settled, progress_bar, require_inputs, run_script, set_lr,
                         settle_pair_defaults, settle_schedule, settle_steps, shard_indices)


# The schedule a run settles where its flags are not given (train_utils.settle_schedule, printed): the
# toy task's, tuned on it, and the learning rate for your own model (the fields' help says which).
TOY_SCHEDULE = dict(max_iters=300, lr=1e-4, warmup_iters=30)
OWN_MODEL_LR = 1e-6


@dataclass
class Config(JudgeConfig, PairsConfig, TrainConfig):
    out_dir: str = "out/dpo"
    """folder for config.json, metrics.jsonl, ckpt.pt (and reference_logps.pt)"""
    sft_ckpt: str = "out/sft/ckpt.pt"
    """SFT checkpoint (ckpt.pt or Hugging Face folder): the initial policy and the frozen reference (its
    tokenizer reads the pairs)"""
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
    gold_eval: Optional[bool] = None
    """sample held-out toy prompts at each evaluation: gold reward, KL to the reference, win rate; none: on
    for the toy model on the toy pairs (or with --eval_prompts), off for your model or data"""
    eval_prompts: str = ""
    """held-out prompts for --gold_eval or --judge_ckpt / --judge_fn; empty: data/toy/prompts_val.jsonl (toy model
    only)"""
    eval_samples: int = 256
    """held-out prompts sampled at each evaluation"""
    max_new_tokens: int = 40
    """longest sampled completion"""
    temperature: float = 1.0
    """sampling temperature of the evaluation samples"""
    # optimisation defaults for the toy task's pairs
    batch_size: int = 64
    """pairs per optimizer step, over all processes and micro-batches"""
    max_iters: Optional[int] = None
    """optimizer steps; none: 300 on the toy task (about two passes over its 9.5k training pairs), else --epochs 1"""
    lr: Optional[float] = None
    """peak learning rate; none: 1e-4 on the toy task, 1e-6 on your own model (TRL's DPO default; Zephyr used
    5e-7)"""
    weight_decay: float = 0.0
    """AdamW weight decay, matrices only"""
    eval_interval: int = 50
    """steps between held-out evaluations and checkpoints"""


def reference_logps(reference, data: dict[str, torch.Tensor], dist: Dist, ctx, batch_size: int) -> torch.Tensor:
    """(N, 2) chosen and rejected log-probs of every pair under the reference, in one pass
    sharded over ranks and summed back together."""
    out = torch.zeros(len(data["chosen_input_ids"]), 2, device=dist.device)
    for idx in shard_indices(len(out), dist, batch_size):
        with torch.no_grad(), ctx:
            out[idx.to(dist.device)] = torch.stack(concatenated_forward(reference, take(data, idx, dist.device)), dim=1)
    return all_reduce_sum(out, dist).cpu()


def cached_reference_logps(cfg: Config, reference, datasets: dict, dist: Dist, ctx) -> dict:
    """Reference log-probs of each dataset, from out_dir/reference_logps.pt when it was made
    from the same reference (its files' contents, in the same dtypes) and the same tokenised
    pairs, else computed and saved there. A cache that does not load (cut short, or not this
    script's: weights_only never runs its code) is only a cache: a warning, and it is made again."""
    path = os.path.join(cfg.out_dir, "reference_logps.pt")
    h = hashlib.sha256(json.dumps([fingerprint(cfg.sft_ckpt), cfg.dtype, cfg.frozen_dtype]).encode())
    for name in sorted(datasets):
        for v in datasets[name].values():
            h.update(v.numpy().tobytes())
    key = h.hexdigest()
    if os.path.exists(path):
        try:
            cached = torch.load(path, weights_only=True)
        except Exception as e:  # cut short, or holding objects other than tensors (refused, never run)
            cached = None
            if dist.master:
                print(f"warning: {path}: not a cache this script wrote ({type(e).__name__} on loading it); "
                      "computing the reference log-probs again", file=sys.stderr)
        shapes = {name: (len(data["chosen_input_ids"]), 2) for name, data in datasets.items()}
        if (isinstance(cached, dict) and cached.get("key") == key and isinstance(cached.get("logps"), dict)
                and {k: getattr(v, "shape", None) for k, v in cached["logps"].items()} == shapes):
            return cached["logps"]
    logps = {name: reference_logps(reference, data, dist, ctx, cfg.batch_size)
             for name, data in datasets.items()}
    if dist.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        replace_atomically(path, lambda tmp: torch.save({"key": key, "logps": logps}, tmp))
    return logps


def dpo_batch_loss(model, batch, reference, cfg: Config):
    """The summed DPO loss (Rafailov et al. 2023, eq. 7, or a variant) of a batch of pairs and
    TRL's metrics, as sums. The reference's log-probs come from the batch when precomputed,
    else from a forward pass of the frozen reference."""
    policy_chosen, policy_rejected = concatenated_forward(model, batch)
    if cfg.precompute_ref:
        ref_chosen, ref_rejected = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
    else:
        with torch.no_grad():
            ref_chosen, ref_rejected = concatenated_forward(reference, batch)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, cfg.beta, cfg.loss_type,
        cfg.label_smoothing, cfg.reference_free, response_lengths(batch) if cfg.loss_type == "ipo" else None)
    return losses.sum(), dpo_metric_sums(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)


def evaluate(model, policy, reference, val_data, evaluator, prompts, cfg: Config, dist: Dist, ctx):
    """Held-out DPO metrics on every rank's shard of the pairs; on rank 0, the gold reward (or the
    judges' score), KL and win rate of samples for held-out prompts. Returns the metrics and a few
    samples to print."""
    sums = {}
    for idx in shard_indices(len(val_data["chosen_input_ids"]), dist, cfg.batch_size):
        with torch.no_grad(), ctx:
            sums = add_sums(sums, *dpo_batch_loss(model, take(val_data, idx, dist.device), reference, cfg))
    sums = all_reduce_sums(sums, dist)
    metrics, samples = {f"eval/{k}": v / len(val_data["chosen_input_ids"]) for k, v in sums.items()}, []
    if evaluator is not None:
        with ctx:
            sample_metrics, texts = evaluator(policy)
        metrics.update(sample_metrics)
        samples = [f"[{p}] {t}" + (f"   (gold reward {gold_reward(t, p):.2f})" if evaluator.judge is None else "")
                   for p, t in list(zip(prompts, texts))[:cfg.print_samples]]
    return metrics, samples


def reference_and_evaluator(cfg: Config, policy, train_data: dict, val_data: dict, prompts: list, tok,
                            dist: Dist, ctx, judge=None):
    """The frozen reference, from the SFT checkpoint as the policy: under LoRA the policy with its
    adapters off, else a frozen copy. With --precompute_ref its log-probs of every pair, computed
    once (or read from the cache): {"train": (N, 2), "val": (M, 2)} chosen and rejected, else
    None; a separate reference then waits on the CPU. And the evaluator (None without held-out
    prompts), which samples the reference once: the toy gold reward's, or `judge`'s."""
    reference = frozen_reference(cfg, policy, dist)
    offload = cfg.precompute_ref and not cfg.lora_rank and not dist.sharded
    logps = None
    if cfg.precompute_ref:
        logps = cached_reference_logps(cfg, reference, {"train": train_data, "val": val_data}, dist, ctx)
    evaluator = None
    if prompts and (dist.master or dist.sharded):  # under FSDP every rank samples the policy with rank 0
        with ctx:
            evaluator = PolicyEvaluator(reference, tok, prompts, cfg.max_new_tokens, cfg.temperature,
                                        cfg.seed, offload=offload, judge=judge)
    if offload:
        reference.cpu()  # off the accelerator: training never runs it again, evaluation borrows it
    return reference, logps, evaluator


def check_settings(cfg: Config, dist: Dist) -> None:
    """Every setting, once settle_defaults has settled the derived ones, each refused with one
    line naming its flag, before anything is read or written."""
    check_training_settings(cfg)
    if cfg.label_smoothing and cfg.loss_type in ("hinge", "ipo"):
        raise DataError(f"--label_smoothing applies to the sigmoid and robust losses; {cfg.loss_type} ignores it")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise DataError(f"--label_smoothing {cfg.label_smoothing} is not a label-flip rate in [0, 0.5) "
                        "(at 0.5 the labels carry no preference; robust divides by 1 - 2 x it)")
    if not (math.isfinite(cfg.beta) and cfg.beta > 0):
        raise DataError(f"--beta {cfg.beta}: must be a finite number above 0 (the KL strength)")
    check_pair_settings(cfg)
    for flag in ("max_new_tokens", "eval_samples"):
        if getattr(cfg, flag) < (1 if flag == "max_new_tokens" else 0):
            raise DataError(f"--{flag} {getattr(cfg, flag)}: out of range")
    judged = has_judge(cfg)
    if judged and (cfg.gold_eval or not cfg.eval_prompts):
        raise DataError("--judge_ckpt and --judge_fn judge the samples of --eval_prompts, in place of --gold_eval: "
                        "give --eval_prompts (and not --gold_eval)")
    if (cfg.gold_eval or judged) and cfg.temperature <= 0:
        raise DataError("--temperature must be above 0: the evaluation's KL is that of the sampled distributions")
    require_inputs(cfg, "eval_prompts", "judge_ckpt")


def settle_defaults(cfg: Config, dist: Dist) -> None:
    """Every setting derived from others, settled in one place before anything is read, and
    printed: the toy task's pairs and held-out prompts are the defaults for the toy model only,
    and its gold evaluation is on for it (--max_length follows once the model's context is known)."""
    before = dataclasses.asdict(cfg)
    settle_pair_defaults(cfg, dist)
    settle_schedule(cfg, is_toy_model(cfg.sft_ckpt), TOY_SCHEDULE, OWN_MODEL_LR)
    if cfg.gold_eval:
        cfg.eval_prompts = cfg.eval_prompts or TOY_PROMPTS[1]
    print_settled(before, cfg, dist)


def train(cfg: Config, dist: Dist) -> dict:
    # 1. data, validated before anything is written
    settle_defaults(cfg, dist)
    check_settings(cfg, dist)
    seed_everything(cfg.seed, dist)
    run = Run(cfg, dist, counts=("tokens",))
    raw_model, tok = load_gpt(cfg.sft_ckpt, lora_base=cfg.lora_base)
    toy = is_toy_model(cfg.sft_ckpt)  # what the model is, recorded in its checkpoint
    default_max_length(cfg, raw_model.config.block_size, toy)
    check_lengths(raw_model.config.block_size, ("--max_length", cfg.max_length))
    train_data, _, val_data, tok = load_pairs(cfg, tok, cfg.chat_template, dist.master)
    check_batches(len(train_data["chosen_input_ids"]), "training pairs", cfg, dist)
    settle_steps(cfg, len(train_data["chosen_input_ids"]), dist)
    judged = has_judge(cfg)
    records = load_prompt_records(cfg.eval_prompts)[:cfg.eval_samples] if cfg.gold_eval or judged else []
    prompts = [p for p, _ in records]
    longest_prompt = max((len(tok.encode_prompt(p)) for p in prompts), default=0)
    check_lengths(raw_model.config.block_size, ("the longest held-out prompt", longest_prompt),
                  ("--max_new_tokens", cfg.max_new_tokens))

    # 2. the policy (raw_model; model is it wrapped for DDP/FSDP) and the frozen reference, both from the
    # SFT checkpoint: under LoRA the reference is the policy with its adapters off, else a frozen copy;
    # its log-probs of every pair computed once if asked
    model = wrap_model(prepare_trainable(raw_model, cfg), dist, cfg.dtype, cfg.compile)
    ctx = autocast(dist.device, cfg.dtype)
    judge = (load_judge(cfg.judge_ckpt, cfg.judge_fn, cfg.judge_weights, tok, [c for _, c in records], dist.device,
                        ctx, cfg.lora_base) if judged else None)  # None: the toy gold reward judges
    reference, precomputed, evaluator = reference_and_evaluator(cfg, raw_model, train_data, val_data, prompts, tok,
                                                                dist, ctx, judge)
    if precomputed:  # --precompute_ref: each pair's reference log-probs go with it, for dpo_batch_loss
        for data, name in ((train_data, "train"), (val_data, "val")):
            data["reference_chosen_logps"], data["reference_rejected_logps"] = precomputed[name].unbind(1)
    optimizer = make_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), dist.device)
    start = run.start(raw_model, optimizer)
    tokens = run.resumed["tokens"] if run.resumed else 0  # real tokens trained on so far
    model.eval()  # dropout off in the policy as in the frozen reference (TRL's default): step 0 is exactly ln 2
    n_pairs = len(train_data["chosen_input_ids"])
    record = {"toy_task": toy, **lora_record(cfg, cfg.sft_ckpt)}  # what each checkpoint notes
    if dist.master:
        print(f"policy: {raw_model.num_params() / 1e6:.2f}M parameters ({n_trainable(raw_model) / 1e6:.2f}M training), "
              f"{n_pairs} training pairs, "
              f"{len(val_data['chosen_input_ids'])} held-out, {dist.world_size} process(es) on {dist.device}, "
              f"reference {'precomputed' if cfg.precompute_ref else 'live'}{', adapters off' if cfg.lora_rank else ''}")

    # 3. the model before training, evaluated and checkpointed as step 0 (a resumed run's was, before)
    metrics = {}
    if not run.resumed:
        metrics, samples = evaluate(model, raw_model, reference, val_data, evaluator, prompts, cfg, dist, ctx)
        run.print(0, metrics, samples)
        run.log(0, metrics)
        run.save(0, raw_model, optimizer, tok, {"tokens": tokens, **record})

    # 4. the loop: one optimizer step on a global batch of pairs each
    bar = progress_bar(cfg.max_iters, start, dist, "dpo")
    step = start
    while step < cfg.max_iters:
        # 4a. this step's learning rate and global batch of pairs; this rank's micro-batches
        lr = set_lr(optimizer, step, cfg)
        indices = global_batch(n_pairs, cfg.batch_size, step, cfg.seed)
        batches = [take(train_data, idx, dist.device) for idx in micro_batches(indices, dist, cfg.grad_accum)]
        step += 1  # counted from 1 from here on: the step's number in messages, logs and checkpoints
        # 4b. forward and backward of each micro-batch: chosen and rejected through the policy (and
        # the reference) in one forward, the DPO loss summed over its pairs, scaled so that the
        # gradient is the mean over the global batch's pairs (DDP averages over ranks: x world_size)
        sums = {}
        for i, batch in enumerate(batches):
            with gradient_sync(model, dist, sync=i == len(batches) - 1):
                with ctx:
                    loss_sum, metric_sums = dpo_batch_loss(model, batch, reference, cfg)
                (loss_sum * (dist.world_size / len(indices))).backward()
            sums = add_sums(sums, loss_sum, metric_sums)
        # 4c. the optimizer step on the gradients of the whole global batch: clip, step, zero
        stats = batch_means(sums, len(indices), dist, step)
        stats["grad_norm"] = clip_grad_norm(model, cfg.grad_clip, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        check_weights(model, dist, step)
        tokens += real_tokens(train_data, indices)
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", refresh=False)
        # 4d. training metrics every log_interval steps; evaluate and checkpoint every eval_interval
        # steps (early_eval_interval before early_eval_until) and at the end; one metrics.jsonl row a step
        logging = step % cfg.log_interval == 0 or step == cfg.max_iters
        metrics = {**stats, "learning_rate": lr, "tokens": tokens} if logging else {}
        if run.evaluates(step):
            eval_metrics, samples = evaluate(model, raw_model, reference, val_data, evaluator, prompts, cfg, dist, ctx)
            metrics.update(eval_metrics)
            run.print(step, metrics, samples)
        if metrics:
            run.log(step, metrics)
        if run.evaluates(step):
            run.save(step, raw_model, optimizer, tok, {"tokens": tokens, **record})
    bar.close()
    return metrics


def main(argv=None) -> int:
    return run_script(Config, train, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
