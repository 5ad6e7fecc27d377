"""
Online DPO: DPO on pairs the policy samples as it trains, labelled by a reward source (Guo et al.
2024, "Direct Language Model Alignment from Online AI Feedback"; TRL's OnlineDPOTrainer). At each
step, two responses for each of the step's prompts are sampled from the policy, scored by the
reward model (or the toy gold reward, or reward functions: the sources of train_ppo.py), the
higher-scored one chosen, and one DPO step taken against the frozen SFT reference. The sampling
and scoring are rollout.py's, the same as PPO's; the loss is dpo.py's, the same as DPO's.

    python train_online_dpo.py                          # against out/rm, tiny model, CPU
    python train_online_dpo.py --reward gold            # on the toy task's gold reward itself
    python train_online_dpo.py --refresh_every 10       # semi-online: pairs from a policy up to 10 steps old
    torchrun --nproc_per_node 2 train_online_dpo.py     # the same run on 2 processes

Semi-online DPO (Lanchantin et al. 2025, "Bridging Offline and Online Reinforcement Learning for
LLMs") is the bridge between the two: with --refresh_every N the responses of N steps are sampled
at once, by the policy as it stands at the first of them, so a step trains on pairs of a policy
up to N - 1 steps old. N = 1 is online DPO; N = --max_iters samples every pair from the SFT model
before the first step, which is offline DPO on pairs sampled once (each pair seen once).

A step: 1. (every refresh_every steps) sample the responses of the next refresh_every steps'
prompts, samples_per_prompt each, and score them; 2. label: the best and the worst response of
each prompt are its pair (a tie, no preference, is left out); 3. DPO loss of chosen and rejected,
in one forward of the policy and one of the reference, backward; 4. the optimizer step; 5. log,
evaluate on held-out prompts, checkpoint. Where it departs from TRL's trainer: the scores are
normalised by the SFT policy's statistics before missing_eos_penalty is taken off (PPO's shaping,
so the penalty has one meaning for any reward scale), and ties are left out of the loss.
"""
import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from checkpoint import Run, is_toy_model, load_gpt, load_trainable, trainable_state
from distributed import Dist, all_reduce_sum, seed_everything, wrap_model
from dpo import LOSS_TYPES, concatenated_forward, dpo_loss, dpo_metric_sums, response_lengths, rollout_pairs
from files import DataError
from ppo import shaped_scores
from rollout import (RolloutConfig, check_reward_norm, check_rollout_settings, collect_rollouts, evaluate,
                     load_reward, make_evaluator, read_prompts, reward_metrics, reward_sources, reward_statistics,
                     settle_rollout_defaults)
from train_utils import (TrainConfig, add_sums, autocast, batch_means, check_training_settings, check_weights,
                         clip_grad_norm, frozen_reference, gradient_sync, lora_record, make_optimizer, n_trainable,
                         prepare_trainable, print_settled, progress_bar, run_script, set_lr, settle_schedule,
                         settle_steps)


# The schedule a run settles where its flags are not given (train_utils.settle_schedule, printed): the
# toy task's, tuned on it, and the learning rate for your own model (the fields' help says which).
TOY_SCHEDULE = dict(max_iters=60, lr=5e-4, warmup_iters=5)
OWN_MODEL_LR = 5e-7


@dataclass
class Config(RolloutConfig, TrainConfig):
    out_dir: str = "out/online_dpo"
    """folder for config.json, metrics.jsonl and ckpt.pt"""
    sft_ckpt: str = "out/sft/ckpt.pt"
    """SFT checkpoint (ckpt.pt or Hugging Face folder): the initial policy and the frozen reference"""
    samples_per_prompt: int = 2
    """responses sampled for each prompt (k); its pair is the best-scored and the worst-scored of them"""
    refresh_every: int = 1
    """steps between samplings: the responses of this many steps are sampled at once by the policy as it is
    then (1: online DPO; --max_iters: every pair from the SFT model, offline DPO on pairs sampled once)"""
    # DPO
    beta: float = 0.1
    """KL strength: the implicit reward is beta * log(pi / pi_ref)"""
    loss_type: Literal[LOSS_TYPES] = "sigmoid"
    """sigmoid (DPO), ipo, hinge (SLiC) or robust (rDPO); see dpo.dpo_loss"""
    # optimisation defaults for the toy task
    batch_size: int = 32
    """prompts (so pairs) per optimizer step, over all processes; samples_per_prompt responses each"""
    max_iters: Optional[int] = None
    """optimizer steps; none: 60 on the toy task (as many responses as PPO's 60 iterations of 64), else --epochs 1
    (each training prompt once)"""
    lr: Optional[float] = None
    """peak learning rate; none: 5e-4 on the toy task (one step a batch, where PPO takes 8: at DPO's 1e-4 the toy
    policy moves to KL 0.7 in 100 steps), 5e-7 on your own model (TRL's online DPO default)"""
    weight_decay: float = 0.0
    """AdamW weight decay, matrices only"""
    log_interval: int = 1
    """steps between training-metric lines in metrics.jsonl"""
    eval_interval: int = 10
    """steps between held-out evaluations and checkpoints"""


def check_settings(cfg: Config, dist: Dist) -> None:
    """Every setting, once settle_defaults has settled the derived ones, each refused with one
    line naming its flag, before anything is read or written."""
    check_training_settings(cfg)
    check_rollout_settings(cfg)
    n_responses = cfg.batch_size * cfg.samples_per_prompt
    if cfg.samples_per_prompt < 2 or cfg.gen_chunk % cfg.samples_per_prompt:
        raise DataError("--samples_per_prompt must be 2 or more (a pair), and --gen_chunk a multiple of it")
    if n_responses % (cfg.gen_chunk * dist.world_size) or (n_responses // dist.world_size // cfg.samples_per_prompt
                                                          % cfg.grad_accum):
        raise DataError("--batch_size x --samples_per_prompt must be a multiple of --gen_chunk x world size, and each "
                        "process's pairs a multiple of --grad_accum")
    if cfg.refresh_every < 1:
        raise DataError(f"--refresh_every {cfg.refresh_every}: at least 1 (1 samples at every step)")
    if not cfg.beta > 0 or cfg.beta == float("inf"):
        raise DataError(f"--beta {cfg.beta}: must be a finite number above 0 (the KL strength)")


def settle_defaults(cfg: Config, dist: Dist) -> None:
    """Every setting derived from others, settled in one place before anything is read, and
    printed: the toy task's prompts and reward model are the defaults for the toy model only, and
    its gold evaluation is on for it."""
    before = dataclasses.asdict(cfg)
    settle_rollout_defaults(cfg, dist)
    settle_schedule(cfg, is_toy_model(cfg.sft_ckpt), TOY_SCHEDULE, OWN_MODEL_LR)
    print_settled(before, cfg, dist)


def sample_window(policy, scorer, tok, prompts, prompt_ids, start: int, cfg: Config, dist: Dist, ctx,
                  reward_norm: tuple[float, float]) -> dict:
    """Step 1: the rollouts of steps start, ..., up to the next multiple of refresh_every (or
    max_iters), all sampled now by `policy`, each step's with the seeds it would have on its own,
    their scores normalised and shaped: {step: (rollout dict, P)}."""
    end = min((start // cfg.refresh_every + 1) * cfg.refresh_every, cfg.max_iters)
    window = {}
    for t in range(start, end):
        data, P = collect_rollouts(policy, scorer, tok, prompts, prompt_ids, t, cfg.batch_size * cfg.samples_per_prompt,
                                   cfg, dist, ctx)
        data["raw_scores"] = data["scores"]
        data["scores"] = shaped_scores(data["scores"], data["ended"], *reward_norm, cfg.missing_eos_penalty)
        window[t] = data, P
    return window


def resumed_window_weights(run: Run, cfg: Config) -> dict:
    """The weights that sampled the window a checkpoint was written in; one line where it has none:
    written at another --refresh_every, or damaged."""
    weights, was = run.resumed.get("window_weights"), run.resumed["config"].get("refresh_every")
    if not isinstance(weights, dict):
        if was != cfg.refresh_every:
            raise DataError(f"--refresh_every {cfg.refresh_every}: the run in {run.dir} stopped at step "
                            f"{run.resumed['step']} sampling every {was} step(s); resume it with --refresh_every {was}")
        raise DataError(f"{run.ckpt_path}: 'window_weights' is missing, which a run stopped between two samplings "
                        "keeps; the checkpoint is damaged")
    return weights


def snapshot(policy) -> dict[str, torch.Tensor]:
    """A copy of the policy's trainable weights, for the checkpoint (on the CPU trainable_state's
    tensors are the live ones; under FSDP rank 0 alone gets them, as it alone writes)."""
    return {k: v.clone() for k, v in trainable_state(policy).items()}


def online_dpo_loss(model, reference, batch: dict, weights: torch.Tensor, cfg: Config):
    """Step 3: the DPO loss (Rafailov et al. 2023, eq. 7, or a variant) of a batch of pairs summed
    over the pairs that carry a preference (weights 1), TRL's DPO metrics summed alike, and the
    sampled responses' summed log-ratio to the reference (an estimate of KL(pi || pi_ref) from
    the chosen and the rejected response of each pair, 2 x pairs responses)."""
    policy_chosen, policy_rejected = concatenated_forward(model, batch)
    with torch.no_grad():
        ref_chosen, ref_rejected = concatenated_forward(reference, batch)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, cfg.beta, cfg.loss_type,
        lengths=response_lengths(batch) if cfg.loss_type == "ipo" else None)
    sums = dpo_metric_sums(chosen_rewards * weights, rejected_rewards * weights, policy_chosen * weights,
                           policy_rejected * weights)
    kl = (policy_chosen - ref_chosen + policy_rejected - ref_rejected).detach().sum()
    return (losses * weights).sum(), sums, kl


def train(cfg: Config, dist: Dist) -> dict:
    # settings, then every input read and checked before anything is written
    settle_defaults(cfg, dist)
    check_settings(cfg, dist)
    seed_everything(cfg.seed, dist)
    run = Run(cfg, dist, counts=("tokens", "samples"))
    policy, tok = load_gpt(cfg.sft_ckpt, lora_base=cfg.lora_base)
    toy = is_toy_model(cfg.sft_ckpt)  # what the model is, recorded in its checkpoint
    prompts, columns, prompt_ids, eval_prompts, eval_columns, tok = read_prompts(
        cfg, policy.config.block_size, tok, dist, cfg.batch_size)
    settle_steps(cfg, len(prompts), dist)

    # the frozen models: the reference (SFT) and the reward model; the policy, the module the optimizer
    # steps, and model, it wrapped for DDP/FSDP
    prepare_trainable(policy, cfg)
    reference = frozen_reference(cfg, policy, dist)
    reward_model, handoff = load_reward(cfg, tok, dist)
    scorer = reward_sources(cfg, reward_model, handoff, columns)
    policy.eval()  # dropout off, in sampling and in the loss alike (the reference's log-probs are exact)
    model = wrap_model(policy, dist, cfg.dtype, cfg.compile)
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), dist.device)
    tokens = samples = 0  # real tokens of the pairs trained on; responses sampled (the normalising ones too)
    ctx = autocast(dist.device, cfg.dtype)
    n_responses = cfg.batch_size * cfg.samples_per_prompt
    window, window_weights = {}, None  # the sampled steps not yet trained on, and the weights that sampled them
    if run.resumed:  # online DPO's own records, checked (and the window sampled) before run.start touches the folder
        check_reward_norm(run.resumed, run.ckpt_path)
        tokens, samples, reward_norm = run.resumed["tokens"], run.resumed["samples"], run.resumed["reward_norm"]
        if run.resumed["step"] % cfg.refresh_every and run.resumed["step"] < cfg.max_iters:
            # stopped between two samplings: the rest of the window is sampled as the uninterrupted run sampled
            # it, by the weights of its first step, which the checkpoint keeps (run.start then loads its own)
            window_weights = resumed_window_weights(run, cfg)
            load_trainable(policy, window_weights, run.ckpt_path)
            window = sample_window(policy, scorer, tok, prompts, prompt_ids, run.resumed["step"], cfg, dist, ctx,
                                   reward_norm)
    start = run.start(policy, optimizer)
    if not run.resumed:
        reward_norm = reward_statistics(policy, scorer, tok, prompts, prompt_ids, n_responses, cfg, dist, ctx)
        samples += cfg.reward_norm_batches * n_responses if cfg.reward_norm else 0
    evaluator = make_evaluator(cfg, reference, scorer, tok, eval_prompts, eval_columns, dist, ctx)
    if dist.master:
        print(f"policy: {policy.num_params() / 1e6:.2f}M parameters ({n_trainable(policy) / 1e6:.2f}M training), "
              f"{len(prompts)} prompts, {cfg.samples_per_prompt} responses a prompt, refreshed every "
              f"{cfg.refresh_every} step(s), reward: "
              f"{' + '.join(f'{w:g} x {n}' for w, n in zip(scorer.weights, scorer.names))}, "
              f"{dist.world_size} process(es) on {dist.device}")
    record = {"reward_norm": list(reward_norm), "toy_task": toy, **lora_record(cfg, cfg.sft_ckpt)}

    def extras():
        """What a checkpoint holds besides the policy; mid-window, the window's sampling weights."""
        mid_window = cfg.refresh_every > 1 and window
        return {"tokens": tokens, "samples": samples, **record,
                **({"window_weights": window_weights} if mid_window else {})}

    # the policy before training, evaluated and checkpointed as step 0 (a resumed run's was, before)
    metrics = {}
    if not run.resumed:
        metrics = {"reward_norm/mean": reward_norm[0], "reward_norm/std": reward_norm[1]}
        eval_metrics, shown = evaluate(evaluator, policy, tok, eval_prompts or prompts, cfg, dist, ctx)
        metrics.update(eval_metrics)
        run.print(0, metrics, shown)
        run.log(0, metrics)
        run.save(0, policy, optimizer, tok, extras())

    # the loop: one DPO step on freshly sampled pairs each
    bar = progress_bar(cfg.max_iters, start, dist, "online dpo")
    seconds = {"rollout": 0.0, "update": 0.0}  # wall time of steps 1-2 and of steps 3-4, reported at the end
    step = start
    while step < cfg.max_iters:
        t_rollout = time.time()
        lr = set_lr(optimizer, step, cfg)
        # 1. rollout: every refresh_every steps, the responses of the window's steps, sampled by the policy now
        # and scored (normalised by the SFT policy's statistics, less missing_eos_penalty if one never ends)
        if step not in window:
            window_weights = snapshot(policy) if cfg.refresh_every > 1 else None
            window = sample_window(policy, scorer, tok, prompts, prompt_ids, step, cfg, dist, ctx, reward_norm)
            samples += len(window) * n_responses
        data, P = window.pop(step)
        # 2. label: each prompt's best and worst response are its chosen and rejected (a tie is left out)
        pairs, weights = rollout_pairs(data["input_ids"], data["attention_mask"], data["scores"],
                                       cfg.samples_per_prompt, P)
        counts = torch.stack([torch.tensor(float(len(weights)), device=weights.device), weights.sum()])
        n_pairs, n_kept = (int(x) for x in all_reduce_sum(counts, dist).tolist())  # pairs, and those with a preference
        step += 1  # counted from 1 from here on: the step's number in messages, logs and checkpoints
        t_update = time.time()
        # 3. forward and backward of each micro-batch: chosen and rejected through the policy and the
        # reference in one forward each, the DPO loss summed over the pairs with a preference, scaled so
        # that the gradient is their mean over every rank (DDP averages over ranks: x world_size)
        rows = torch.arange(len(weights)).chunk(cfg.grad_accum)
        sums, kl_sum = {}, torch.zeros((), device=dist.device)
        for i, r in enumerate(rows):
            batch = {k: v[r] for k, v in pairs.items()}
            with gradient_sync(model, dist, sync=i == len(rows) - 1):
                with ctx:
                    loss_sum, metric_sums, kl = online_dpo_loss(model, reference, batch, weights[r], cfg)
                (loss_sum * (dist.world_size / max(n_kept, 1))).backward()
            sums, kl_sum = add_sums(sums, loss_sum, metric_sums), kl_sum + kl
        # 4. the optimizer step on the gradients of the whole global batch: clip, step, zero
        stats = batch_means(sums, max(n_kept, 1), dist, step)
        stats["grad_norm"] = clip_grad_norm(model, cfg.grad_clip, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        check_weights(model, dist, step)
        seconds["rollout"] += t_update - t_rollout
        seconds["update"] += time.time() - t_update
        # 5. the batch's means over all ranks (TRL's names); evaluate and checkpoint every eval_interval steps
        # (early_eval_interval before early_eval_until) and at the end; one metrics.jsonl row a step
        mask = data["response_mask"]
        pair_tokens = sum(pairs[f"{side}_attention_mask"].sum() for side in ("chosen", "rejected")).float()
        totals = all_reduce_sum(torch.stack([data["raw_scores"].sum(), mask.sum(), data["ended"].sum().float(), kl_sum,
                                             pair_tokens]), dist).tolist()
        n = n_responses
        tokens += int(totals[4])
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", score=f"{totals[0] / n:.3f}", refresh=False)
        metrics = {}
        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            metrics = {**stats, "objective/scores": totals[0] / n, "objective/kl": totals[3] / (2 * n_pairs),
                       "pairs/ties": 1 - n_kept / n_pairs, "completions/mean_length": totals[1] / n,
                       "completions/ended_ratio": totals[2] / n, "beta": cfg.beta, "learning_rate": lr,
                       "tokens": tokens, "samples": samples}
            metrics.update(reward_metrics(cfg, scorer, data["per_source"], handoff, dist))
        if run.evaluates(step):
            eval_metrics, shown = evaluate(evaluator, policy, tok, eval_prompts or prompts, cfg, dist, ctx)
            metrics.update(eval_metrics)
            run.print(step, metrics, shown)
        if metrics:
            run.log(step, metrics)
        if run.evaluates(step):
            run.save(step, policy, optimizer, tok, extras())
    bar.close()
    if dist.master:
        n = max(1, step - start)
        print(f"per step: sampling and scoring {seconds['rollout'] / n:.3f}s, DPO update {seconds['update'] / n:.3f}s")
    return metrics


def main(argv=None) -> int:
    return run_script(Config, train, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
