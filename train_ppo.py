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
import torch.nn.functional as F

from checkpoint import Run, is_toy_model, load_gpt, load_reward_model, load_trainable, trainable_state
from chat import ChatError
from data import TOY_PROMPTS, encode_prompt, load_prompt_records
from distributed import Dist, all_reduce_sum, place_frozen, seed_everything, wrap_model
from evaluate import PolicyEvaluator, sample_completions
from files import DataError
from lora import AdaptersOff
from ppo import (AdaptiveKLController, FixedKLController, PolicyAndCritic, gae, group_advantages, k3_kl,
                 loss_weights, masked_whiten, per_token_rewards, ppo_losses, response_labels, rollout,
                 sequence_ratio_losses, shaped_scores)
from reward_model import RewardModel
from rewards import Rewards, TextHandoff, load_reward_function, model_name, toy_gold_reward
from toy import gold_reward
from train_utils import (TrainConfig, add_sums, autocast, batch_means, check_lengths,
                         check_training_settings, check_weights, clip_grad_norm, frozen_dtype,
                         global_batch, gradient_sync, lora_record, make_optimizer, n_trainable,
                         prepare_trainable, print_settled, progress_bar, require_inputs, resolve_gold_eval,
                         run_script, set_lr, toy_default)


# The seeds of an iteration's random streams: a rollout chunk's seed * SEED_STRIDE + iteration *
# ITERATION_STRIDE + chunk, a minibatch order's seed + MINIBATCH_STRIDE * iteration + epoch. Primes
# far apart, so that no two chunks or epochs of a run (or of runs a seed apart) share a stream.
SEED_STRIDE, ITERATION_STRIDE, MINIBATCH_STRIDE = 1_000_003, 1009, 7919


@dataclass
class Config(TrainConfig):
    out_dir: str = "out/ppo"
    """folder for config.json, metrics.jsonl and ckpt.pt (policy, critic, optimizer, kl_coef)"""
    sft_ckpt: str = "out/sft/ckpt.pt"
    """SFT checkpoint (ckpt.pt or Hugging Face folder): the initial policy and the frozen reference"""
    reward: Literal["model", "gold", "functions"] = "model"
    """score responses with the reward model, the toy gold reward (PPO-GT), or --reward_fn alone; --reward_fn
    adds to either of the first two"""
    reward_ckpt: str = ""
    """reward model: train_rm.py's checkpoint or a downloaded XForSequenceClassification folder (another tokenizer
    or chat template is handed each completion as text); empty: the toy task's out/rm/ckpt.pt (toy model only)"""
    reward_fn: tuple[str, ...] = ()
    """a Python reward function, FILE.py:NAME, with TRL's signature f(prompts, completions, **columns) ->
    list[float | None] (columns: the prompt file's other fields, as lists); give the flag once for each"""
    reward_weights: tuple[float, ...] = ()
    """a weight for each reward source: the reward model or gold reward first, then each --reward_fn in order;
    empty: 1 each. A completion's score is the weighted sum, a None score left out"""
    critic_init: Literal["auto", "reward", "sft"] = "auto"
    """critic backbone and head from the reward model, or SFT backbone with a new head; auto: reward model if
    --reward model"""
    prompts: str = ""
    """training prompts JSONL, one {"prompt"} a line (a string, or a conversation: a list of messages ending
    with a user turn); empty: the toy task's data/toy/prompts_train.jsonl (not with a Hugging Face model)"""
    max_prompt_length: Optional[int] = None
    """longest prompt in tokens; a longer one keeps its last tokens (a conversation its system message, its
    newest turns and the end of its last user turn), as pairs' prompts do. none: the model's context less
    max_new_tokens"""
    max_new_tokens: int = 40
    """longest response"""
    temperature: float = 1.0
    """sampling temperature of rollouts (log-probs are computed at the same temperature)"""
    reward_norm: bool = True
    """score = (raw - mean) / std with the mean and std of the SFT policy's raw scores, for the reward model
    and the gold reward alike"""
    reward_norm_batches: int = 4
    """rollout batches of the SFT policy that give reward_norm its mean and std"""
    missing_eos_penalty: float = 1.0
    """subtracted from the (normalised) score of a response that never emits a stop token (eos or end of
    turn)"""
    gen_chunk: int = 32
    """responses per generate call; chunks are spread over processes, and each chunk has its own seed"""
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
    # evaluation
    gold_eval: Optional[bool] = None
    """sample held-out toy prompts at each evaluation: gold reward, KL to the reference, win rate; none: on
    for the toy model on the toy prompts (or with --eval_prompts), off for your model or data"""
    eval_prompts: str = ""
    """held-out prompts: the gold evaluation's (empty: data/toy/prompts_val.jsonl), or without it the first
    print_samples are sampled and printed at each evaluation"""
    eval_samples: int = 256
    """held-out prompts sampled at each evaluation"""
    eval_temperature: float = 1.0
    """temperature of the evaluation samples and their KL, the same for every method whatever --temperature
    trains at"""
    # optimisation defaults for the toy task
    batch_size: int = 64
    """responses per PPO iteration (rollout batch: batch_size / samples_per_prompt prompts), over all
    processes"""
    max_iters: int = 100
    """PPO iterations"""
    lr: float = 1e-4
    """peak learning rate of policy and critic"""
    min_lr: float = 1e-5
    """learning rate at the end of the cosine decay"""
    warmup_iters: int = 5
    """iterations of linear warmup"""
    weight_decay: float = 0.0
    """AdamW weight decay, matrices only"""
    log_interval: int = 1
    """iterations between training-metric lines in metrics.jsonl"""
    eval_interval: int = 20
    """iterations between held-out evaluations and checkpoints"""


@torch.no_grad()
def collect_rollouts(policy, scorer: Rewards, tok, prompts: list, prompt_ids: list[list[int]], step: int, cfg: Config,
                     dist: Dist, ctx):
    """Steps 1-2: samples_per_prompt responses for each of this rank's prompts of the iteration's
    global batch, and their scores. The global batch is cut into chunks of gen_chunk responses
    (a prompt's k responses consecutive, in one chunk), spread over ranks; each chunk is sampled
    with its own seed, so the samples do not depend on the world size.

    Returns the rollout as a dict of this rank's rows (input_ids, attention_mask (B, P + R),
    response_mask (B, R), the raw scores (B,), each reward source's (S, B), NaN where a function gave
    None, and whether each response ended with a stop token (B,)), and P, the prompt width."""
    k = cfg.samples_per_prompt
    indices = global_batch(len(prompts), cfg.batch_size // k, step, cfg.seed)
    per_chunk = cfg.gen_chunk // k  # prompts per chunk
    my_indices, chunks = [], []
    for c in range(dist.rank, cfg.batch_size // cfg.gen_chunk, dist.world_size):
        chunk = [int(i) for i in indices[c * per_chunk:(c + 1) * per_chunk] for _ in range(k)]
        generator = torch.Generator(dist.device).manual_seed(cfg.seed * SEED_STRIDE + step * ITERATION_STRIDE + c)
        with ctx:
            chunks.append(rollout(policy, [prompt_ids[i] for i in chunk], cfg.max_new_tokens,
                                  tok.stop_ids, tok.pad_id, cfg.temperature, generator))
        my_indices += chunk
    P = max(r.n_prompt for r in chunks)  # left-pad every chunk's prompts to one width
    input_ids = torch.cat([F.pad(r.input_ids, (P - r.n_prompt, 0), value=tok.pad_id) for r in chunks])
    attention_mask = torch.cat([F.pad(r.attention_mask, (P - r.n_prompt, 0), value=0) for r in chunks])
    response_mask = torch.cat([r.response_mask for r in chunks]).float()
    responses = input_ids[:, P:]
    # 2. score: the reward model at the last real token (of its own reading of the text, where it reads text
    # otherwise), and reward functions of the text, summed with their weights
    texts = [tok.decode(row[:int(n)]) for row, n in zip(responses.tolist(), response_mask.sum(1).tolist())]
    scores, per_source = scorer.score(my_indices, [prompts[i] for i in my_indices], texts, input_ids, attention_mask,
                                       ctx)
    ended = torch.isin(responses, torch.tensor(tok.stop_ids, device=responses.device)).any(1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "scores": scores, "per_source": per_source, "ended": ended}, P


def reward_statistics(policy, scorer: Rewards, tok, prompts: list, prompt_ids: list[list[int]], cfg: Config,
                      dist: Dist, ctx) -> tuple[float, float]:
    """Mean and standard deviation of the raw scores of the first reward_norm_batches rollout
    batches, sampled before any update, so from the SFT policy (the reward normalisation of
    lm-human-preferences, Ziegler et al. 2019; detail 3 of Huang et al. 2024, "The N
    implementation details of RLHF with PPO"). After it a score of 1 is one standard deviation
    of the SFT policy's rewards, so one kl_coef means the same pressure for any reward scale."""
    if not cfg.reward_norm:
        return 0.0, 1.0
    raw = torch.cat([collect_rollouts(policy, scorer, tok, prompts, prompt_ids, step, cfg, dist, ctx)[0]["scores"]
                     for step in range(cfg.reward_norm_batches)]).double()
    n, total, squares = all_reduce_sum(torch.stack([torch.tensor(float(len(raw)), device=raw.device, dtype=raw.dtype),
                                                    raw.sum(), (raw ** 2).sum()]), dist).tolist()
    mean = total / n
    return mean, max(squares / n - mean ** 2, 0.0) ** 0.5 or 1.0


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


def reads_as_policy(reward_tok, tok) -> bool:
    """Whether the reward model reads the policy's token ids as they are: the same tokenizer and,
    for prompts rendered as chat, the same template. Otherwise it is handed each completion as text."""
    return (all(reward_tok.state()[k] == tok.state()[k] for k in ("kind", "data", "bos_id", "eos_id", "pad_id"))
            and reward_tok.chat_template == tok.chat_template)


def frozen_models_and_critic(cfg: Config, policy, tok, dist: Dist):
    """The reference (the policy with its LoRA adapters off, or a frozen copy of the SFT policy),
    the frozen reward model (None without --reward model) with the TextHandoff it reads completions
    through when it reads text otherwise than the policy (else None), and the critic (None for
    rloo and grpo): the reward model's backbone and head where it reads the policy's ids, or the
    SFT backbone with a new head (under LoRA, adapters on the backbone). The frozen models are
    placed (under FSDP sharded); policy and critic stay on the CPU for wrap_model."""
    if cfg.lora_rank:
        reference = AdaptersOff(policy)
    else:
        reference = place_frozen(load_gpt(cfg.sft_ckpt, frozen_dtype(cfg), cfg.lora_base)[0], dist, cfg.dtype)
    reward_model = handoff = None
    if cfg.reward == "model":
        reward_model, reward_tok = load_reward_model(cfg.reward_ckpt, cfg.lora_base)
        if not reads_as_policy(reward_tok, tok):
            handoff = TextHandoff.of(reward_model, reward_tok)
        reward_model = place_frozen(reward_model.to(frozen_dtype(cfg)), dist, cfg.dtype)
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


def reward_sources(cfg: Config, reward_model, handoff, columns: list[dict]) -> Rewards:
    """The run's Rewards: the reward model (or the toy gold reward as a function), then each --reward_fn."""
    functions = [load_reward_function(spec) for spec in cfg.reward_fn]
    if cfg.reward == "gold":
        functions.insert(0, ("gold", toy_gold_reward))
    return Rewards(reward_model, handoff, functions, cfg.reward_weights, columns, model_name(cfg.reward_ckpt))


def evaluate(evaluator, policy, tok, eval_prompts: list, cfg: Config, dist: Dist, ctx):
    """Gold reward, KL and win rate of the policy's samples for held-out prompts, and a few
    samples to print; without the gold evaluation, samples for the first print_samples held-out
    prompts alone. On rank 0 (every rank under FSDP, whose forwards are collective)."""
    if not (dist.master or dist.sharded):
        return {}, []
    with ctx:
        if evaluator is not None:
            metrics, texts = evaluator(policy)
        else:
            eval_prompts = eval_prompts[:cfg.print_samples]
            metrics, texts = {}, sample_completions(policy, tok, eval_prompts, cfg.max_new_tokens, cfg.eval_temperature,
                                                    cfg.seed)[1]
    shown = (f"[{p if isinstance(p, str) else p[-1]['content']}] {t}" for p, t in zip(eval_prompts, texts))
    if evaluator is not None and evaluator.judge is None:
        shown = (f"{line}   (gold reward {gold_reward(t, p):.2f})" for line, p, t in zip(shown, eval_prompts, texts))
    return metrics, list(shown)[:cfg.print_samples]


def check_settings(cfg: Config, dist: Dist) -> None:
    """Every setting, once settle_defaults has settled the derived ones, each refused with one
    line naming its flag, before anything is read or written."""
    check_training_settings(cfg)
    if (cfg.batch_size % (cfg.gen_chunk * dist.world_size) or cfg.gen_chunk % cfg.num_minibatches
            or (cfg.gen_chunk // cfg.num_minibatches) % cfg.grad_accum):
        raise DataError("--batch_size must be a multiple of --gen_chunk x world size, --gen_chunk a multiple of "
                        "--num_minibatches (else rows would be skipped), and gen_chunk / num_minibatches of "
                        "--grad_accum")
    if not (math.isfinite(cfg.temperature) and cfg.temperature > 0 and cfg.eval_temperature > 0):
        raise DataError("--temperature and --eval_temperature must be above 0: PPO samples from the policy")
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
    if cfg.reward == "functions" and not cfg.reward_fn:
        raise DataError("--reward functions: give the functions with --reward_fn FILE.py:NAME")
    if not all(map(math.isfinite, cfg.reward_weights)):
        raise DataError(f"--reward_weights {' '.join(map(str, cfg.reward_weights))}: not finite numbers")
    if not (math.isfinite(cfg.kl_coef) and cfg.kl_coef >= 0) or cfg.max_new_tokens < 1 or cfg.ppo_epochs < 1:
        raise DataError("--kl_coef must be a finite number, 0 or more; --max_new_tokens and --ppo_epochs at least 1")
    require_inputs(cfg, "sft_ckpt", "prompts", "reward_ckpt", "eval_prompts")


def settle_defaults(cfg: Config, dist: Dist) -> None:
    """Every setting derived from others, settled in one place before anything is read, and
    printed: the toy task's prompts and reward model are the defaults for the toy model only, and
    its gold evaluation is on for it (--max_prompt_length follows once the model's context is
    known, in read_prompts)."""
    before = dataclasses.asdict(cfg)
    require_inputs(cfg, "sft_ckpt")
    toy, user_prompts = is_toy_model(cfg.sft_ckpt), bool(cfg.prompts)
    cfg.prompts = toy_default(cfg.prompts, TOY_PROMPTS[0], "prompts", cfg.sft_ckpt, toy)
    if cfg.ratio == "sequence":  # a response is one action: its loss is averaged over responses
        cfg.loss_average = "sequence"
    if cfg.reward == "model":
        cfg.reward_ckpt = toy_default(cfg.reward_ckpt, "out/rm/ckpt.pt", "reward_ckpt", cfg.sft_ckpt, toy)
    resolve_gold_eval(cfg, toy and (not user_prompts or bool(cfg.eval_prompts)), dist)
    if cfg.gold_eval:
        cfg.eval_prompts = cfg.eval_prompts or TOY_PROMPTS[1]
    print_settled(before, cfg, dist)


def encode_prompts(tok, prompts: list, limit: int, verbose: bool, source: str = "") -> list[list[int]]:
    """Every prompt's token ids, once, cut to `limit` tokens as pairs' prompts are (data.encode_prompt:
    the last tokens, bos kept; a conversation its oldest turns, then the start of its last user
    turn, its system message kept); how many were cut is printed once. A conversation that cannot
    fit is a DataError naming `source`, the prompts' file, and the record."""
    out, cut = [], 0
    for i, p in enumerate(prompts):
        try:
            ids, was_cut = encode_prompt(tok, p, limit)
        except ChatError as e:
            raise DataError(f"{source}: record {i + 1}: field 'prompt': {e}") from None
        out.append(ids)
        cut += was_cut
    if cut and verbose:
        print(f"note: {cut} of {len(prompts)} prompts were longer than {limit} tokens (--max_prompt_length) and "
              "were cut as pairs' prompts are")
    return out


def read_prompts(cfg: Config, block_size: int, tok, dist: Dist):
    """The training prompts, their records' other fields (what reward functions take), their token
    ids (cut to --max_prompt_length), the held-out prompts and the tokenizer with the chat template
    the prompts need, every length checked against the
    model's context; DataError, before anything is written, on bad input."""
    prompts, columns = zip(*load_prompt_records(cfg.prompts))
    prompts, columns = list(prompts), list(columns)
    eval_records = load_prompt_records(cfg.eval_prompts)[:cfg.eval_samples] if cfg.eval_prompts else []
    eval_prompts, eval_columns = [p for p, _ in eval_records], [c for _, c in eval_records]
    conversations = any(isinstance(p, list) for p in prompts + eval_prompts)
    if conversations and (cfg.reward == "gold" or cfg.gold_eval):
        raise DataError("--reward gold and --gold_eval score the toy task's text prompts, not conversations")
    tok = tok.with_chat_template(cfg.chat_template, chat_data=conversations)  # under a template prompts are user turns
    if cfg.max_prompt_length is None:
        cfg.max_prompt_length = block_size - cfg.max_new_tokens
    if cfg.max_prompt_length < 1:
        raise DataError(f"--max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in the model's context "
                        f"of {block_size} tokens")
    check_lengths(block_size, ("--max_prompt_length", cfg.max_prompt_length), ("--max_new_tokens", cfg.max_new_tokens))
    prompt_ids = encode_prompts(tok, prompts, cfg.max_prompt_length, dist.master, cfg.prompts)
    if len(prompts) < cfg.batch_size // cfg.samples_per_prompt:
        raise DataError(f"--batch_size {cfg.batch_size} / --samples_per_prompt {cfg.samples_per_prompt}: more than "
                        f"the {len(prompts)} prompts of {cfg.prompts}")
    if eval_prompts:
        longest = max(len(ids) for ids in encode_prompts(tok, eval_prompts, block_size, False, cfg.eval_prompts))
        check_lengths(block_size, ("the longest --eval_prompts prompt", longest),
                      ("--max_new_tokens", cfg.max_new_tokens))
    return prompts, columns, prompt_ids, eval_prompts, eval_columns, tok


def source_metrics(names: list[str], per_source: torch.Tensor, dist: Dist) -> dict:
    """rewards/NAME/mean and rewards/NAME/std of each source's scores (S, B) over every rank's
    responses, a NaN (a function's None) left out."""
    given = ~per_source.isnan()
    values = per_source.nan_to_num()
    sums = all_reduce_sum(torch.stack([given.sum(1).double(), values.sum(1).double(), (values ** 2).sum(1).double()]),
                          dist)
    metrics = {}
    for (n, total, squares), name in zip(sums.T.tolist(), names):
        if n:  # a source that scored nothing in this batch logs nothing
            metrics[f"rewards/{name}/mean"] = total / n
            metrics[f"rewards/{name}/std"] = max(squares / n - (total / n) ** 2, 0.0) ** 0.5
    return metrics


def check_ppo_records(ckpt: dict, path: str) -> None:
    """What a PPO checkpoint keeps besides the weights, as --resume reads it: the KL coefficient
    and the reward normalisation's mean and standard deviation, finite numbers."""
    def finite(v) -> bool:
        return type(v) in (int, float) and math.isfinite(v)
    kl, norm = ckpt.get("kl_coef"), ckpt.get("reward_norm")
    if not (finite(kl) and kl >= 0 and isinstance(norm, list) and len(norm) == 2 and all(map(finite, norm))
            and norm[1] > 0):
        raise DataError(f"{path}: 'kl_coef' or 'reward_norm' is not what PPO records; the checkpoint is damaged")


def train(cfg: Config, dist: Dist) -> dict:
    # settings, then every input read and checked before anything is written
    settle_defaults(cfg, dist)
    check_settings(cfg, dist)
    seed_everything(cfg.seed, dist)
    run = Run(cfg, dist, counts=("tokens",))
    policy, tok = load_gpt(cfg.sft_ckpt, lora_base=cfg.lora_base)
    toy = is_toy_model(cfg.sft_ckpt)  # what the model is, recorded in its checkpoint
    prompts, columns, prompt_ids, eval_prompts, eval_columns, tok = read_prompts(cfg, policy.config.block_size, tok,
                                                                                dist)

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
                               else reward_statistics(policy, scorer, tok, prompts, prompt_ids, cfg, dist, ctx))
    evaluator = None
    if eval_prompts and (dist.master or dist.sharded):  # under FSDP every rank samples with rank 0
        # the toy gold reward, or the run's own reward sources judging the held-out samples' texts
        judge = None if cfg.gold_eval else scorer.judge(tok, ctx, eval_columns)
        with ctx:
            evaluator = PolicyEvaluator(reference, tok, eval_prompts, cfg.max_new_tokens, cfg.eval_temperature,
                                        cfg.seed, judge=judge)
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
        data, P = collect_rollouts(policy, scorer, tok, prompts, prompt_ids, step, cfg, dist, ctx)
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
                       "completions/mean_length": mean_length, "completions/ended_ratio": ended_ratio}
            if critic:
                metrics.update({"loss/value_avg": update["value_loss"], "val/clipfrac_avg": update["vf_clipfrac"]})
            if cfg.advantage == "grpo":
                metrics["loss/kl_avg"] = update["kl_loss"]
            if cfg.reward_fn:  # each source's raw scores, None left out (TRL's names)
                metrics.update(source_metrics(scorer.names, per_source, dist))
            if handoff:
                metrics["reward_model/texts_cut"] = handoff.cut
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
