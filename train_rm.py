"""
Reward model: the SFT backbone plus a scalar head, trained with the Bradley-Terry loss on
preference pairs. The first half of RLHF; train_ppo.py optimises the policy against it. The
model and its loss are reward_model.py's; this file holds the run and its loop.

    python train_rm.py                                 # on out/pairs from sample.py --pairs
    torchrun --nproc_per_node 2 train_rm.py            # the same run on 2 processes
    python train_rm.py --sft_ckpt MODEL_FOLDER --train_file hh_train.jsonl --val_file hh_test.jsonl

InstructGPT (Ouyang et al. 2022) trained its reward model for a single epoch, since it overfits
fast; the defaults here make about two passes over the toy pairs.
"""
import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from checkpoint import Run, is_toy_model, load_gpt
from data import PairsConfig, load_pairs, real_tokens, take
from distributed import Dist, seed_everything, wrap_model
from files import DataError
from reward_model import RewardModel, bradley_terry_loss, pair_scores, rm_metric_sums
from toy import gold_reward
from train_utils import (TrainConfig, add_sums, all_reduce_sums, autocast, batch_means, check_batches,
                         check_lengths, check_pair_settings, check_training_settings, check_weights,
                         clip_grad_norm, default_max_length, global_batch, gradient_sync, lora_record,
                         make_optimizer, micro_batches, n_trainable, prepare_trainable, print_settled,
                         progress_bar, run_script, set_lr, settle_pair_defaults, settle_schedule, settle_steps,
                         shard_indices)


# The schedule a run settles where its flags are not given (train_utils.settle_schedule, printed): the
# toy task's, tuned on it, and the learning rate for your own model (the fields' help says which).
TOY_SCHEDULE = dict(max_iters=300, lr=3e-4, warmup_iters=30)
OWN_MODEL_LR = 1e-5


@dataclass
class Config(PairsConfig, TrainConfig):
    out_dir: str = "out/rm"
    """folder for config.json, metrics.jsonl and ckpt.pt"""
    sft_ckpt: str = "out/sft/ckpt.pt"
    """SFT checkpoint (ckpt.pt or Hugging Face folder) whose backbone the reward model starts from (its
    tokenizer reads the pairs)"""
    # loss
    margin: float = 0.0
    """the score difference the chosen response must clear"""
    center_coef: float = 0.0
    """weight of the (r_chosen + r_rejected)^2 term that keeps scores centred at 0"""
    gold_eval: Optional[bool] = None
    """also report how often the model orders held-out pairs as the toy gold reward does; none: on for the
    toy model on the toy pairs, off for your model or data"""
    # optimisation defaults for the toy task's pairs
    batch_size: int = 64
    """pairs per optimizer step, over all processes and micro-batches"""
    max_iters: Optional[int] = None
    """optimizer steps; none: 300 on the toy task (about two passes over its 9.5k training pairs), else --epochs 1"""
    lr: Optional[float] = None
    """peak learning rate; none: 3e-4 on the toy task, 1e-5 on your own model (the low end of the 1e-5 to 1e-4
    reward models are trained at: a full fine-tune of every weight)"""
    weight_decay: float = 0.0
    """AdamW weight decay, matrices only"""
    eval_interval: int = 50
    """steps between held-out evaluations and checkpoints"""


def gold_order(pairs) -> torch.Tensor:
    """(N,) +1 where the gold reward prefers the chosen response, -1 the rejected, 0 a tie."""
    return torch.tensor([float((gold_reward(p.chosen, p.prompt) > gold_reward(p.rejected, p.prompt)) -
                               (gold_reward(p.chosen, p.prompt) < gold_reward(p.rejected, p.prompt)))
                         for p in pairs])


def rm_batch_loss(model, batch, cfg: Config):
    """The summed Bradley-Terry loss of a batch of pairs, chosen and rejected in one forward
    pass, and the metrics as sums. Held-out batches carry the gold order: the metrics then
    count the pairs ordered as the gold reward orders them."""
    chosen, rejected = pair_scores(model, batch)
    chosen, rejected = chosen.float(), rejected.float()
    metrics = rm_metric_sums(chosen, rejected)
    if "gold_order" in batch:
        order = batch["gold_order"]
        metrics["gold_agreements"] = ((chosen - rejected).sign() == order)[order != 0].float().sum()
        metrics["gold_pairs"] = (order != 0).float().sum()
    return bradley_terry_loss(chosen, rejected, cfg.margin, cfg.center_coef).sum(), metrics


def evaluate(model, val_data, cfg: Config, dist: Dist, ctx) -> dict:
    """Held-out loss, accuracy, margin and mean reward on every rank's shard of the pairs, and
    agreement with the gold reward's order."""
    model.eval()
    n = len(val_data["chosen_input_ids"])
    sums = {}
    for idx in shard_indices(n, dist, cfg.batch_size):
        with torch.no_grad(), ctx:
            sums = add_sums(sums, *rm_batch_loss(model, take(val_data, idx, dist.device), cfg))
    sums = all_reduce_sums(sums, dist)
    metrics = {f"eval/{k}": sums[k] / n for k in ("loss", "accuracy", "margin", "mean_reward")}
    if cfg.gold_eval:
        metrics["eval/gold_agreement"] = sums["gold_agreements"] / max(sums["gold_pairs"], 1)
    model.train()
    return metrics


def check_settings(cfg: Config, dist: Dist) -> None:
    """Every setting, once settle_defaults has settled the derived ones, each refused with one
    line naming its flag, before anything is read or written."""
    check_training_settings(cfg)
    if not (math.isfinite(cfg.margin) and math.isfinite(cfg.center_coef) and cfg.center_coef >= 0):
        raise DataError("--margin must be a finite number, --center_coef a finite number, 0 or more")
    check_pair_settings(cfg)


def settle_defaults(cfg: Config, dist: Dist) -> None:
    """Every setting derived from others, settled in one place before anything is read, and
    printed: the toy task's pairs are the defaults for the toy model only, and its gold
    evaluation is on for it (--max_length follows once the model's context is known)."""
    before = dataclasses.asdict(cfg)
    settle_pair_defaults(cfg, dist)
    settle_schedule(cfg, is_toy_model(cfg.sft_ckpt), TOY_SCHEDULE, OWN_MODEL_LR)
    print_settled(before, cfg, dist)


def train(cfg: Config, dist: Dist) -> dict:
    # 1. settings and data, validated before anything is written
    settle_defaults(cfg, dist)
    check_settings(cfg, dist)
    seed_everything(cfg.seed, dist)
    run = Run(cfg, dist, counts=("tokens",))
    sft, tok = load_gpt(cfg.sft_ckpt, lora_base=cfg.lora_base)
    toy = is_toy_model(cfg.sft_ckpt)  # what the model is, recorded in its checkpoint
    default_max_length(cfg, sft.config.block_size, toy)
    check_lengths(sft.config.block_size, ("--max_length", cfg.max_length))
    train_data, val_pairs, val_data, tok = load_pairs(cfg, tok, cfg.chat_template, dist.master)
    check_batches(len(train_data["chosen_input_ids"]), "training pairs", cfg, dist)
    settle_steps(cfg, len(train_data["chosen_input_ids"]), dist)
    if cfg.gold_eval:
        val_data["gold_order"] = gold_order(val_pairs)

    # 2. the reward model: SFT backbone, new scalar head
    raw_model = RewardModel.from_gpt(sft)
    prepare_trainable(raw_model.backbone, cfg)  # the head always trains
    model = wrap_model(raw_model, dist, cfg.dtype, cfg.compile)
    optimizer = make_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), dist.device)
    start = run.start(raw_model, optimizer)
    tokens = run.resumed["tokens"] if run.resumed else 0  # real tokens trained on so far
    ctx = autocast(dist.device, cfg.dtype)
    n_pairs = len(train_data["chosen_input_ids"])
    record = {"toy_task": toy, **lora_record(cfg, cfg.sft_ckpt)}  # what each checkpoint notes
    if dist.master:
        print(f"reward model: {raw_model.backbone.num_params() / 1e6:.2f}M parameters "
              f"({n_trainable(raw_model) / 1e6:.2f}M training), {n_pairs} training pairs, "
              f"{len(val_pairs)} held-out, {dist.world_size} process(es) on {dist.device}")

    # 3. the model before training, evaluated and checkpointed as step 0 (a resumed run's was, before)
    metrics = {}
    if not run.resumed:
        metrics = evaluate(model, val_data, cfg, dist, ctx)
        run.print(0, metrics)
        run.log(0, metrics)
        run.save(0, raw_model, optimizer, tok, {"tokens": tokens, **record})

    # 4. the loop: one optimizer step on a global batch of pairs each
    bar = progress_bar(cfg.max_iters, start, dist, "rm")
    step = start
    while step < cfg.max_iters:
        # 4a. this step's learning rate and global batch of pairs; this rank's micro-batches
        lr = set_lr(optimizer, step, cfg)
        indices = global_batch(n_pairs, cfg.batch_size, step, cfg.seed)
        batches = [take(train_data, idx, dist.device) for idx in micro_batches(indices, dist, cfg.grad_accum)]
        step += 1  # counted from 1 from here on: the step's number in messages, logs and checkpoints
        # 4b. forward and backward of each micro-batch: chosen and rejected scored in one forward,
        # the Bradley-Terry loss summed over its pairs, scaled so that the gradient is the mean over
        # the global batch's pairs (DDP averages over ranks: x world_size)
        sums = {}
        for i, batch in enumerate(batches):
            with gradient_sync(model, dist, sync=i == len(batches) - 1):
                with ctx:
                    loss_sum, metric_sums = rm_batch_loss(model, batch, cfg)
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
            eval_metrics = evaluate(model, val_data, cfg, dist, ctx)
            metrics.update(eval_metrics)
            run.print(step, metrics)
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
