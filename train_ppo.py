"""
PPO against a reward model, with a per-token KL penalty to the SFT reference: the second half of
RLHF (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022). With --reward gold the policy is
optimised on the toy task's gold reward itself (PPO-GT, the DPO paper's upper reference).

    python train_ppo.py                                # against out/rm, tiny model, CPU
    python train_ppo.py --reward gold --out_dir out/ppo_gt
    python train_ppo.py --adaptive_kl --kl_target 4    # Ziegler et al.'s adaptive KL coefficient
    torchrun --nproc_per_node 2 train_ppo.py           # the same run on 2 processes
    torchrun --nproc_per_node 2 train_ppo.py --parallel fsdp   # every model sharded over them (FSDP2)
    python train_ppo.py --advantage rloo --samples_per_prompt 4   # RLOO (Ahmadian et al. 2024), no critic
    python train_ppo.py --advantage grpo --samples_per_prompt 4   # GRPO (Shao et al. 2024), no critic

An iteration: 1. sample samples_per_prompt responses for each of the batch's prompts; 2. score
them; 3. log-probs of policy and reference, values of the critic; 4. per-token rewards with the
KL penalty; 5. advantages: GAE, whitened over the whole batch, or RLOO's and GRPO's from each
prompt's group of responses; 6. ppo_epochs passes of clipped policy (and value) updates over
num_minibatches minibatches; 7. adapt kl_coef; 8. log, evaluate, checkpoint. RLOO and GRPO
share every step but 5 and the loss, so they live here rather than in a script of their own.
The math of each step is ppo.py's; this file holds their order, the rollout and the update loop.
"""
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from checkpoint import Run, is_toy_model, load_gpt, load_reward_model, load_trainable, trainable_state
from distributed import Dist, all_reduce_sum, seed_everything, wrap_model
from files import DataError
from ppo import (AdaptiveKLController, FixedKLController, PolicyAndCritic, gae, group_advantages, k3_kl,
                 loss_weights, masked_whiten, per_token_rewards, ppo_losses, response_labels,
                 sequence_ratio_losses, shaped_scores)
from reward_model import RewardModel
from rollout import (RolloutConfig, check_reward_norm, check_rollout_settings, collect_rollouts, evaluate, load_reward,
                     make_evaluator, read_prompts, reward_metrics, reward_sources, reward_statistics,
                     settle_rollout_defaults)
from train_utils import (TrainConfig, add_sums, autocast, batch_means, check_training_settings, check_weights,
                         clip_grad_norm, frozen_reference, gradient_sync, lora_record, make_optimizer, n_trainable,
                         prepare_trainable, print_settled, progress_bar, require_inputs, run_script, set_lr,
                         settle_schedule, settle_steps)


# The seed of a minibatch order: seed + MINIBATCH_STRIDE * iteration + epoch, a prime, so that no two
# epochs of a run (or of runs a seed apart) share one. A rollout chunk's seed is rollout.py's.
MINIBATCH_STRIDE = 7919


# The schedule a run settles where its flags are not given (train_utils.settle_schedule, printed): the
# toy task's, tuned on it, and the learning rate for your own model (the fields' help says which).
TOY_SCHEDULE = dict(max_iters=100, lr=1e-4, warmup_iters=5)
OWN_MODEL_LR = 1e-6


@dataclass
class Config(RolloutConfig, TrainConfig):
    out_dir: str = "out/ppo"
    """folder for config.json, metrics.jsonl and ckpt.pt (policy, critic, optimizer, kl_coef)"""
    sft_ckpt: str = "out/sft/ckpt.pt"
    """SFT checkpoint (ckpt.pt or Hugging Face folder): the initial policy and the frozen reference"""
    critic_init: Literal["auto", "reward", "sft"] = "auto"
    """critic backbone and head from the reward model, or SFT backbone with a new head; auto: reward model if
    --reward model"""
    advantage: Literal["gae", "rloo", "grpo"] = "gae"
    """gae: PPO with a critic; rloo: leave-one-out baseline, KL in the reward; grpo: group-normalised, k3 KL
    in the loss (no critic for either)"""
    samples_per_prompt: int = 1
    """responses sampled for each prompt (k); rloo and grpo compare a prompt's k responses, so they need k >=
    2"""
    ratio: Literal["token", "sequence"] = "token"
    """rloo: token takes a ratio per token, clipped per token (as PPO and GRPO do); sequence one ratio per
    response from its summed log-probs, clipped and averaged per response, as RLOO's paper and TRL's RLOOTrainer
    take it (sets --loss_average sequence). token is the default: the study's results and golden curves were
    recorded with it"""
    loss_average: Literal["token", "sequence"] = "token"
    """rloo and grpo: sequence takes each response's token mean, then the mean over responses (DeepSeekMath
    eq. 3); token (the default, as TRL's) weighs every token alike, since the per-response mean gives a
    long response's tokens less weight each, a length bias (Dr. GRPO, Liu et al. 2025)"""
    # PPO
    ppo_epochs: int = 4
    """passes over each rollout batch"""
    num_minibatches: int = 2
    """minibatches per pass; each is one optimizer step"""
    cliprange: float = 0.2
    """policy ratio clip (Schulman et al. 2017)"""
    cliprange_value: float = 0.2
    """value clip around the rollout's values"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda"""
    kl_coef: float = 0.05
    """KL penalty coefficient (initial value with --adaptive_kl); GRPO's beta, the weight of the KL term in
    its loss"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimate in the reward: k1, whose policy gradient is KL's, or k3, lower-variance as a
    value but as a reward its expected gradient is not that of KL(pi || pi_ref) (see
    ppo.per_token_rewards)"""
    adaptive_kl: bool = False
    """adapt kl_coef towards --kl_target (Ziegler et al. 2019)"""
    kl_target: float = 6.0
    """target sequence KL for --adaptive_kl"""
    kl_horizon: int = 10000
    """horizon of the adaptive controller, in samples"""
    # optimisation defaults for the toy task
    batch_size: int = 64
    """responses per PPO iteration (rollout batch: batch_size / samples_per_prompt prompts), over all
    processes"""
    max_iters: Optional[int] = None
    """PPO iterations; none: 100 on the toy task, else --epochs 1 (each training prompt sampled
    samples_per_prompt times)"""
    lr: Optional[float] = None
    """peak learning rate of policy and critic; none: 1e-4 on the toy task, 1e-6 on your own model (TRL's GRPO
    and RLOO default)"""
    weight_decay: float = 0.0
    """AdamW weight decay, matrices only"""
    log_interval: int = 1
    """iterations between training-metric lines in metrics.jsonl"""
    eval_interval: int = 20
    """iterations between held-out evaluations and checkpoints"""


@torch.no_grad()
def score_tokens(policy, reference, critic, batch, P: int, cfg: Config, ctx):
    """Step 3: log-probs of the responses under the policy that sampled them and under the
    reference, the policy's entropy, and the critic's values (None without a critic), each (B, R)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = response_labels(ids, mask, P)
    with ctx:  # log-probs (and entropy) of the labelled response tokens, without the full logits
        logprobs, entropy = (x[:, P - 1:] for x in policy(ids, mask, labels=labels, temperature=cfg.temperature,
                                                          entropy=True))
        ref_logprobs = reference(ids, mask, labels=labels, temperature=cfg.temperature)[:, P - 1:]
        values = critic.values(ids, mask)[:, P - 1:-1].float() if critic else None
    return logprobs, ref_logprobs, entropy, values


def ppo_batch_loss(model, batch, n_prompt: int, cfg: Config):
    """Step 5's loss of a minibatch, summed over response tokens weighted by loss_weights (1, or
    1/|o_i| with --loss_average sequence), and the statistics TRL logs, summed alike: the clipped
    policy loss, plus vf_coef times the clipped value loss (gae), or plus kl_coef times the k3 KL
    to the reference (grpo: DeepSeekMath eq. 3's beta term); rloo has the KL in its reward and
    nothing more."""
    policy_inputs = dict(labels=response_labels(batch["input_ids"], batch["attention_mask"], n_prompt),
                         temperature=cfg.temperature)
    if cfg.advantage == "gae":  # policy and critic in one call
        labelled_logprobs, new_values = model(batch["input_ids"], batch["attention_mask"], **policy_inputs)
        new_values = new_values[:, n_prompt - 1:-1].float()
    else:
        labelled_logprobs, new_values = model(batch["input_ids"], batch["attention_mask"], **policy_inputs), None
    new_logprobs = labelled_logprobs[:, n_prompt - 1:]  # (B, R)
    weights, _ = loss_weights(batch["response_mask"], cfg.loss_average)  # (B, R)
    if cfg.ratio == "sequence":  # rloo, a response one action
        sums = sequence_ratio_losses(new_logprobs, batch["old_logprobs"], batch["advantages"], batch["response_mask"],
                                     cfg.cliprange)
        return sums["policy_loss"], sums
    sums = ppo_losses(new_logprobs, batch["old_logprobs"], batch["advantages"], new_values, batch.get("old_values"),
                      batch.get("returns"), weights, cfg.cliprange, cfg.cliprange_value)
    if cfg.advantage == "gae":
        return sums["policy_loss"] + cfg.vf_coef * sums["value_loss"], sums
    if cfg.advantage == "grpo":
        sums["kl_loss"] = (k3_kl(new_logprobs, batch["ref_logprobs"]) * weights).sum()
        return sums["policy_loss"] + cfg.kl_coef * sums["kl_loss"], sums
    return sums["policy_loss"], sums


def advantages_and_targets(rewards, values, ref_logprobs, data: dict, cfg: Config,
                           dist: Dist) -> dict[str, torch.Tensor]:
    """Step 4, from the per-token rewards (B, R): what the loss needs besides the old log-probs.
    gae: advantages by GAE, whitened over every rank's tokens, and the returns, the critic's
    targets. rloo and grpo: one advantage per response from its group of samples_per_prompt;
    RLOO's sequence reward is the score less kl_coef x its KL (the per-token rewards summed),
    GRPO's the score alone, as its KL is a term of the loss, which takes the reference's log-probs."""
    mask = data["response_mask"]
    if cfg.advantage == "gae":
        per_token, returns = gae(rewards, values * mask, mask, cfg.gamma, cfg.lam)
        return {"old_values": values, "returns": returns,
                "advantages": masked_whiten(per_token, mask, lambda t: all_reduce_sum(t, dist))}
    sequence_rewards = rewards.sum(1) if cfg.advantage == "rloo" else data["scores"]
    per_response = group_advantages(sequence_rewards, cfg.samples_per_prompt, cfg.advantage)[:, None] * mask
    grpo = {"ref_logprobs": ref_logprobs} if cfg.advantage == "grpo" else {}
    return {**grpo, "advantages": per_response}


def minibatch_rows(n_chunks: int, chunk: int, positions: torch.Tensor) -> torch.Tensor:
    """Row indices of this rank's part of a minibatch: the same positions within each of its
    chunks. Every rank uses the same positions, so the global minibatch is the same rows
    whatever the number of processes."""
    return (torch.arange(n_chunks)[:, None] * chunk + positions[None, :]).flatten()


def checkpoint_extras(critic, kl_ctl, tokens: int, record: dict) -> dict:
    """What a PPO checkpoint holds besides the policy: the critic, the KL coefficient as it
    stands, the tokens trained on, and what stays fixed over the run (`record`)."""
    return {**({"critic": trainable_state(critic)} if critic else {}), "kl_coef": kl_ctl.value, "tokens": tokens,
            **record}


def frozen_models_and_critic(cfg: Config, policy, tok, dist: Dist):
    """The reference (the policy with its LoRA adapters off, or a frozen copy of the SFT policy),
    the frozen reward model (None without --reward model) with the TextHandoff it reads completions
    through when it reads text otherwise than the policy (else None), and the critic (None for
    rloo and grpo): the reward model's backbone and head where it reads the policy's ids, or the
    SFT backbone with a new head (under LoRA, adapters on the backbone). The frozen models are
    placed (under FSDP sharded); policy and critic stay on the CPU for wrap_model."""
    reference = frozen_reference(cfg, policy, dist)
    reward_model, handoff = load_reward(cfg, tok, dist)
    if cfg.advantage != "gae":
        return reference, reward_model, handoff, None
    if cfg.critic_init == "reward" and handoff:
        raise DataError(f"--critic_init reward: the critic reads the policy's token ids, and --reward_ckpt "
                        f"{cfg.reward_ckpt} reads text with another tokenizer or chat template "
                        "(give --critic_init sft)")
    if cfg.critic_init == "reward" or (cfg.critic_init == "auto" and cfg.reward == "model" and not handoff):
        critic = load_reward_model(cfg.reward_ckpt, cfg.lora_base)[0]
    else:
        critic = RewardModel.from_gpt(load_gpt(cfg.sft_ckpt, lora_base=cfg.lora_base)[0])
    prepare_trainable(critic.backbone, cfg)
    return reference, reward_model, handoff, critic


def check_settings(cfg: Config, dist: Dist) -> None:
    """Every setting, once settle_defaults has settled the derived ones, each refused with one
    line naming its flag, before anything is read or written."""
    check_training_settings(cfg)
    if (cfg.batch_size % (cfg.gen_chunk * dist.world_size) or cfg.gen_chunk % cfg.num_minibatches
            or (cfg.gen_chunk // cfg.num_minibatches) % cfg.grad_accum):
        raise DataError("--batch_size must be a multiple of --gen_chunk x world size, --gen_chunk a multiple of "
                        "--num_minibatches (else rows would be skipped), and gen_chunk / num_minibatches of "
                        "--grad_accum")
    check_rollout_settings(cfg)
    if cfg.gen_chunk % cfg.samples_per_prompt or (cfg.advantage != "gae" and cfg.samples_per_prompt < 2):
        raise DataError("--gen_chunk must be a multiple of --samples_per_prompt, which rloo and grpo need at 2 or more")
    if cfg.advantage == "grpo" and cfg.adaptive_kl:
        raise DataError("--adaptive_kl is for gae and rloo: GRPO weighs its KL term by a fixed kl_coef")
    if cfg.ratio == "sequence" and (cfg.advantage != "rloo" or cfg.loss_average != "sequence"):
        raise DataError("--ratio sequence is RLOO's (--advantage rloo), averaged over responses (--loss_average "
                        "sequence)")
    if cfg.advantage == "gae" and cfg.loss_average == "sequence":
        raise DataError("--loss_average sequence is for rloo and grpo, where a response's tokens share one "
                        "advantage; gae's advantages and value targets are per token")
    if not (math.isfinite(cfg.kl_coef) and cfg.kl_coef >= 0) or cfg.ppo_epochs < 1:
        raise DataError("--kl_coef must be a finite number, 0 or more; --ppo_epochs at least 1")
    require_inputs(cfg, "sft_ckpt", "prompts", "reward_ckpt", "eval_prompts")


def settle_defaults(cfg: Config, dist: Dist) -> None:
    """Every setting derived from others, settled in one place before anything is read, and
    printed: the toy task's prompts and reward model are the defaults for the toy model only, and
    its gold evaluation is on for it (--max_prompt_length follows once the model's context is
    known, in read_prompts)."""
    before = dataclasses.asdict(cfg)
    settle_rollout_defaults(cfg, dist)
    settle_schedule(cfg, is_toy_model(cfg.sft_ckpt), TOY_SCHEDULE, OWN_MODEL_LR)
    if cfg.ratio == "sequence":  # a response is one action: its loss is averaged over responses
        cfg.loss_average = "sequence"
    print_settled(before, cfg, dist)


def check_ppo_records(ckpt: dict, path: str) -> None:
    """What a PPO checkpoint keeps besides the weights, as --resume reads it: the KL coefficient
    and the reward normalisation's mean and standard deviation, finite numbers."""
    kl = ckpt.get("kl_coef")
    if not (type(kl) in (int, float) and math.isfinite(kl) and kl >= 0):
        raise DataError(f"{path}: 'kl_coef' is not what PPO records; the checkpoint is damaged")
    check_reward_norm(ckpt, path)


def train(cfg: Config, dist: Dist) -> dict:
    # settings, then every input read and checked before anything is written
    settle_defaults(cfg, dist)
    check_settings(cfg, dist)
    seed_everything(cfg.seed, dist)
    run = Run(cfg, dist, counts=("tokens",))
    policy, tok = load_gpt(cfg.sft_ckpt, lora_base=cfg.lora_base)
    toy = is_toy_model(cfg.sft_ckpt)  # what the model is, recorded in its checkpoint
    prompts, columns, prompt_ids, eval_prompts, eval_columns, tok = read_prompts(
        cfg, policy.config.block_size, tok, dist, cfg.batch_size // cfg.samples_per_prompt)
    settle_steps(cfg, len(prompts) * cfg.samples_per_prompt, dist)  # an epoch: every prompt's responses once

    # the frozen models: reference (SFT) and reward model; the trained ones: policy and critic (gae), as
    # raw_model, the module the optimizer steps, and model, it wrapped for DDP/FSDP
    prepare_trainable(policy, cfg)
    reference, reward_model, handoff, critic = frozen_models_and_critic(cfg, policy, tok, dist)
    scorer = reward_sources(cfg, reward_model, handoff, columns)
    raw_model = PolicyAndCritic(policy, critic) if critic else policy
    raw_model.eval()  # dropout off in policy and critic, in rollouts and updates alike
    model = wrap_model(raw_model, dist, cfg.dtype, cfg.compile)
    optimizer = make_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), dist.device)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    tokens = 0  # real tokens of the rollouts, once per PPO epoch that trains on them
    if run.resumed:  # PPO's own records, checked before run.start touches the folder
        check_ppo_records(run.resumed, run.ckpt_path)
        if critic:
            load_trainable(critic, run.resumed.get("critic"), run.ckpt_path)
        kl_ctl.value, tokens = run.resumed["kl_coef"], run.resumed["tokens"]
    start = run.start(policy, optimizer, optimized=raw_model)
    ctx = autocast(dist.device, cfg.dtype)
    reward_mean, reward_std = (run.resumed["reward_norm"] if run.resumed
                               else reward_statistics(policy, scorer, tok, prompts, prompt_ids, cfg.batch_size, cfg,
                                                      dist, ctx))
    evaluator = make_evaluator(cfg, reference, scorer, tok, eval_prompts, eval_columns, dist, ctx)
    if dist.master:
        print(f"{'policy and critic: 2 x ' if critic else 'policy: '}{policy.num_params() / 1e6:.2f}M parameters "
              f"({n_trainable(raw_model) / 1e6:.2f}M training), {len(prompts)} prompts, advantage: {cfg.advantage}, "
              f"reward: {' + '.join(f'{w:g} x {n}' for w, n in zip(scorer.weights, scorer.names))}, "
              f"{dist.world_size} process(es) on {dist.device}")
        if handoff:  # what the reward model reads, one prompt rendered its way
            print(f"the reward model reads another tokenizer or template; it is handed each completion as text, "
                  f"for example: {handoff.text(prompts[0], '<completion>')!r}")

    record = {"reward_norm": [reward_mean, reward_std], "toy_task": toy, **lora_record(cfg, cfg.sft_ckpt)}

    # the policy before training, evaluated and checkpointed as iteration 0 (a resumed run's was, before)
    metrics = {}
    if not run.resumed:
        metrics = {"reward_norm/mean": reward_mean, "reward_norm/std": reward_std}
        eval_metrics, samples = evaluate(evaluator, policy, tok, eval_prompts or prompts, cfg, dist, ctx)
        metrics.update(eval_metrics)
        run.print(0, metrics, samples)
        run.log(0, metrics)
        run.save(0, policy, optimizer, tok, checkpoint_extras(critic, kl_ctl, tokens, record),
                 optimized=raw_model)

    # the loop: one PPO iteration each
    bar = progress_bar(cfg.max_iters, start, dist, "ppo")
    seconds = {"rollout": 0.0, "update": 0.0}  # wall time of steps 1-4 and of step 5, reported at the end
    step = start
    while step < cfg.max_iters:
        t_rollout = time.time()
        lr = set_lr(optimizer, step, cfg)
        # 1. rollout: a response for each prompt of this rank's chunks of the iteration's global batch,
        # scored by the reward model (or the toy task's gold reward)
        data, P = collect_rollouts(policy, scorer, tok, prompts, prompt_ids, step, cfg.batch_size, cfg, dist, ctx)
        per_source = data.pop("per_source")
        # 2. scores: normalised by the SFT policy's statistics; a response that never ends (no stop
        # token) loses missing_eos_penalty
        ended = data.pop("ended")
        data["scores"] = shaped_scores(data["scores"], ended, reward_mean, reward_std, cfg.missing_eos_penalty)
        # 3. KL: log-probs of the responses under the policy and the reference (and the critic's
        # values); per-token rewards, the score at the last token less kl_coef x KL at every token
        logprobs, ref_logprobs, entropy, values = score_tokens(policy, reference, critic, data, P, cfg, ctx)
        mask = data["response_mask"]
        rewards, kl = per_token_rewards(data["scores"], logprobs, ref_logprobs, mask, kl_ctl.value, cfg.kl_estimator)
        # 4. advantages (gae: and the critic's targets)
        data.update(old_logprobs=logprobs, **advantages_and_targets(rewards, values, ref_logprobs, data, cfg, dist))
        t_update = time.time()
        # 5. ppo_epochs passes over the rollout, num_minibatches optimizer steps each; a minibatch's loss is
        # the mean over its response tokens on all ranks (--loss_average sequence: the mean over its
        # responses of each one's token mean), taken the same whatever the world size
        n_chunks = len(data["input_ids"]) // cfg.gen_chunk  # this rank's chunks
        per_minibatch = cfg.gen_chunk // cfg.num_minibatches
        minibatch_stats = []
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.gen_chunk, generator=torch.Generator().manual_seed(
                cfg.seed + MINIBATCH_STRIDE * step + epoch))
            for m in range(cfg.num_minibatches):
                rows = minibatch_rows(n_chunks, cfg.gen_chunk, order[m * per_minibatch:(m + 1) * per_minibatch])
                _, count = loss_weights(data["response_mask"][rows], cfg.loss_average)  # tokens, or responses
                n_global = int(all_reduce_sum(count, dist).item())  # over every rank
                batches = [{k: v[r] for k, v in data.items()} for r in rows.chunk(cfg.grad_accum)]
                sums = {}
                for i, batch in enumerate(batches):  # forward and backward of each micro-batch
                    with gradient_sync(model, dist, sync=i == len(batches) - 1):
                        with ctx:
                            loss_sum, metric_sums = ppo_batch_loss(model, batch, P, cfg)
                        (loss_sum * (dist.world_size / n_global)).backward()  # DDP averages over ranks
                    sums = add_sums(sums, loss_sum, metric_sums)
                # the optimizer step on the minibatch's gradients: clip, step, zero (step + 1: the iteration's number)
                stats = batch_means(sums, n_global, dist, step + 1)
                stats["grad_norm"] = clip_grad_norm(model, cfg.grad_clip, step + 1)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                check_weights(model, dist, step + 1)
                minibatch_stats.append(stats)
        update = {k: sum(s[k] for s in minibatch_stats) / len(minibatch_stats) for k in minibatch_stats[0]}
        seconds["rollout"] += t_update - t_rollout
        seconds["update"] += time.time() - t_update
        # 6. the batch's means over all ranks; the KL coefficient adapted to its mean sequence KL;
        # training metrics (TRL's names) every log_interval iterations
        n_responses = torch.tensor(float(len(mask)), device=dist.device)
        seq_stats = all_reduce_sum(torch.stack([data["scores"].sum(), kl.sum(), (entropy * mask).sum(), mask.sum(),
                                                ended.sum().float(), n_responses]), dist)
        mean_score, mean_kl, mean_entropy, mean_length, ended_ratio = (seq_stats[:5] / seq_stats[5]).tolist()
        kl_coef_used = kl_ctl.value
        kl_ctl.update(mean_kl, cfg.batch_size)
        tokens += int(all_reduce_sum(data["attention_mask"].sum(), dist).item()) * cfg.ppo_epochs
        step += 1
        bar.update(1)
        bar.set_postfix(score=f"{mean_score:.3f}", kl=f"{mean_kl:.2f}", refresh=False)
        metrics = {}
        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            metrics = {"objective/scores": mean_score, "objective/kl": mean_kl,
                       "objective/rlhf_reward": mean_score - kl_coef_used * mean_kl, "objective/entropy": mean_entropy,
                       "policy/approxkl_avg": update["approxkl"], "policy/clipfrac_avg": update["clipfrac"],
                       "loss/policy_avg": update["policy_loss"], "val/ratio": update["ratio"], "kl_coef": kl_coef_used,
                       "grad_norm": update["grad_norm"], "learning_rate": lr, "tokens": tokens,
                       "completions/mean_length": mean_length, "completions/ended_ratio": ended_ratio,
                       "samples": (step + cfg.reward_norm * cfg.reward_norm_batches) * cfg.batch_size}
            if critic:
                metrics.update({"loss/value_avg": update["value_loss"], "val/clipfrac_avg": update["vf_clipfrac"]})
            if cfg.advantage == "grpo":
                metrics["loss/kl_avg"] = update["kl_loss"]
            metrics.update(reward_metrics(cfg, scorer, per_source, handoff, dist))
        # 7. evaluate and checkpoint every eval_interval iterations (early_eval_interval before
        # early_eval_until) and at the end; one metrics.jsonl row an iteration
        if run.evaluates(step):
            eval_metrics, samples = evaluate(evaluator, policy, tok, eval_prompts or prompts, cfg, dist, ctx)
            metrics.update(eval_metrics)
            run.print(step, metrics, samples)
        if metrics:
            run.log(step, metrics)
        if run.evaluates(step):
            run.save(step, policy, optimizer, tok, checkpoint_extras(critic, kl_ctl, tokens, record),
                     optimized=raw_model)
    bar.close()
    if dist.master:
        n = max(1, step - start)
        print(f"per iteration: rollout and scoring {seconds['rollout'] / n:.3f}s, "
              f"PPO update {seconds['update'] / n:.3f}s")
    return metrics


def main(argv=None) -> int:
    return run_script(Config, train, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
