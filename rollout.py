"""
Sampling responses from the policy and scoring them: what PPO, RLOO, GRPO (train_ppo.py) and
online DPO (train_online_dpo.py) share. The settings of it (RolloutConfig), the prompts read and
cut to fit, the reward sources loaded (the reward model, the toy gold reward, reward functions),
a batch of responses sampled and scored (collect_rollouts), the SFT policy's score statistics
that normalise them, and the held-out evaluation of a policy's samples.

A step's responses are cut into chunks of gen_chunk responses, a prompt's samples_per_prompt
responses consecutive in one chunk, spread over ranks; each chunk is sampled with a seed of its
own (the run's seed, the step and the chunk's number), so the samples do not depend on the
number of processes.
"""
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from chat import ChatError
from checkpoint import is_toy_model, load_reward_model
from data import TOY_PROMPTS, encode_prompt, load_prompt_records
from distributed import Dist, all_reduce_sum, place_frozen
from evaluate import PolicyEvaluator, sample_completions
from files import DataError
from ppo import rollout
from rewards import (JudgeConfig, Rewards, TextHandoff, has_judge, load_judge, load_reward_function, model_name,
                     toy_gold_reward)
from toy import gold_reward
from train_utils import check_lengths, frozen_dtype, global_batch, require_inputs, resolve_gold_eval, toy_default

# The seed of a rollout chunk: the run's seed * SEED_STRIDE + step * ITERATION_STRIDE + chunk. Primes far
# apart, so that no two chunks of a run (or of runs a seed apart) share a stream.
SEED_STRIDE, ITERATION_STRIDE = 1_000_003, 1009


@dataclass
class RolloutConfig(JudgeConfig):
    """The settings of sampling and scoring responses; train_ppo.py's and train_online_dpo.py's
    configs take them."""
    reward: Literal["model", "gold", "functions"] = "model"
    """score responses with the reward model, the toy gold reward, or --reward_fn alone; --reward_fn adds to
    either of the first two"""
    reward_ckpt: str = ""
    """reward model: train_rm.py's checkpoint or a downloaded XForSequenceClassification folder (another tokenizer
    or chat template is handed each completion as text); empty: the toy task's out/rm/ckpt.pt (toy model only)"""
    reward_fn: tuple[str, ...] = ()
    """a Python reward function, FILE.py:NAME, with TRL's signature f(prompts, completions, **columns) ->
    list[float | None] (columns: the prompt file's other fields, as lists); give the flag once for each"""
    reward_weights: tuple[float, ...] = ()
    """a weight for each reward source: the reward model or gold reward first, then each --reward_fn in order;
    empty: 1 each. A completion's score is the weighted sum, a None score left out"""
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
    """sampling temperature of the responses (their log-probs are computed at the same temperature)"""
    reward_norm: bool = True
    """score = (raw - mean) / std with the mean and std of the SFT policy's raw scores, for the reward model
    and the gold reward alike"""
    reward_norm_batches: int = 4
    """batches of responses of the SFT policy that give reward_norm its mean and std"""
    missing_eos_penalty: float = 1.0
    """subtracted from the (normalised) score of a response that never emits a stop token (eos or end of
    turn)"""
    gen_chunk: int = 32
    """responses per generate call; chunks are spread over processes, and each chunk has its own seed"""
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


def settle_rollout_defaults(cfg, dist: Dist) -> None:
    """The toy task's prompts and reward model are the defaults for the toy model only, and its
    gold evaluation is on for it."""
    require_inputs(cfg, "sft_ckpt")
    toy, user_prompts = is_toy_model(cfg.sft_ckpt), bool(cfg.prompts)
    cfg.prompts = toy_default(cfg.prompts, TOY_PROMPTS[0], "prompts", cfg.sft_ckpt, toy)
    if cfg.reward == "model":
        cfg.reward_ckpt = toy_default(cfg.reward_ckpt, "out/rm/ckpt.pt", "reward_ckpt", cfg.sft_ckpt, toy)
    resolve_gold_eval(cfg, toy and (not user_prompts or bool(cfg.eval_prompts)) and not has_judge(cfg), dist)
    if cfg.gold_eval:
        cfg.eval_prompts = cfg.eval_prompts or TOY_PROMPTS[1]


def check_rollout_settings(cfg) -> None:
    """The sampling and reward settings, each refused with one line naming its flag."""
    if not (math.isfinite(cfg.temperature) and cfg.temperature > 0 and cfg.eval_temperature > 0):
        raise DataError("--temperature and --eval_temperature must be above 0: the policy is sampled")
    if cfg.reward == "functions" and not cfg.reward_fn:
        raise DataError("--reward functions: give the functions with --reward_fn FILE.py:NAME")
    if not all(map(math.isfinite, cfg.reward_weights)):
        raise DataError(f"--reward_weights {' '.join(map(str, cfg.reward_weights))}: not finite numbers")
    if has_judge(cfg) and (cfg.gold_eval or not cfg.eval_prompts):
        raise DataError("--judge_ckpt and --judge_fn judge the samples of --eval_prompts, in place of --gold_eval: "
                        "give --eval_prompts (and not --gold_eval)")
    require_inputs(cfg, "judge_ckpt")
    if cfg.max_new_tokens < 1 or (cfg.reward_norm and cfg.reward_norm_batches < 1):
        raise DataError("--max_new_tokens and (with --reward_norm) --reward_norm_batches must be at least 1")


def check_reward_norm(ckpt: dict, path: str) -> None:
    """The reward normalisation a checkpoint records, as --resume reads it: a finite mean and a
    standard deviation above 0."""
    norm = ckpt.get("reward_norm")
    if not (isinstance(norm, list) and len(norm) == 2 and all(type(v) in (int, float) and math.isfinite(v)
                                                              for v in norm) and norm[1] > 0):
        raise DataError(f"{path}: 'reward_norm' is not a mean and a standard deviation; the checkpoint is damaged")


@torch.no_grad()
def collect_rollouts(policy, scorer: Rewards, tok, prompts: list, prompt_ids: list[list[int]], step: int,
                     n_responses: int, cfg, dist: Dist, ctx):
    """Sample samples_per_prompt responses for each of this rank's prompts of step `step`'s
    global batch (n_responses responses in all, over every rank), and score them. The global
    batch is cut into chunks of gen_chunk responses (a prompt's k responses consecutive, in one
    chunk), spread over ranks; each chunk is sampled with its own seed, so the samples do not
    depend on the world size.

    Returns the rollout as a dict of this rank's rows (input_ids, attention_mask (B, P + R),
    response_mask (B, R), the raw scores (B,), each reward source's (S, B), NaN where a function gave
    None, and whether each response ended with a stop token (B,)), and P, the prompt width."""
    k = cfg.samples_per_prompt
    indices = global_batch(len(prompts), n_responses // k, step, cfg.seed)
    per_chunk = cfg.gen_chunk // k  # prompts per chunk
    my_indices, chunks = [], []
    for c in range(dist.rank, n_responses // cfg.gen_chunk, dist.world_size):
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
    # the reward model at the last real token (of its own reading of the text, where it reads text
    # otherwise), and reward functions of the text, summed with their weights
    texts = [tok.decode(row[:int(n)]) for row, n in zip(responses.tolist(), response_mask.sum(1).tolist())]
    scores, per_source = scorer.score(my_indices, [prompts[i] for i in my_indices], texts, input_ids, attention_mask,
                                       ctx)
    ended = torch.isin(responses, torch.tensor(tok.stop_ids, device=responses.device)).any(1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "scores": scores, "per_source": per_source, "ended": ended}, P


def reward_statistics(policy, scorer: Rewards, tok, prompts: list, prompt_ids: list[list[int]], n_responses: int,
                      cfg, dist: Dist, ctx) -> tuple[float, float]:
    """Mean and standard deviation of the raw scores of the first reward_norm_batches batches of
    n_responses, sampled before any update, so from the SFT policy (the reward normalisation of
    lm-human-preferences, Ziegler et al. 2019; detail 3 of Huang et al. 2024, "The N
    implementation details of RLHF with PPO"). After it a score of 1 is one standard deviation
    of the SFT policy's rewards, so one KL coefficient (or one missing_eos_penalty) means the same
    pressure for any reward scale."""
    if not cfg.reward_norm:
        return 0.0, 1.0
    raw = torch.cat([collect_rollouts(policy, scorer, tok, prompts, prompt_ids, step, n_responses, cfg, dist,
                                      ctx)[0]["scores"] for step in range(cfg.reward_norm_batches)]).double()
    n, total, squares = all_reduce_sum(torch.stack([torch.tensor(float(len(raw)), device=raw.device, dtype=raw.dtype),
                                                    raw.sum(), (raw ** 2).sum()]), dist).tolist()
    mean = total / n
    return mean, max(squares / n - mean ** 2, 0.0) ** 0.5 or 1.0


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


def read_prompts(cfg, block_size: int, tok, dist: Dist, prompts_per_step: int):
    """The training prompts, their records' other fields (what reward functions take), their token
    ids (cut to --max_prompt_length), the held-out prompts and their fields, and the tokenizer with
    the chat template the prompts need, every length checked against the model's context;
    DataError, before anything is written, on bad input."""
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
    if len(prompts) < prompts_per_step:
        raise DataError(f"--batch_size {cfg.batch_size}: {prompts_per_step} prompts a step, more than the "
                        f"{len(prompts)} prompts of {cfg.prompts}")
    if eval_prompts:
        longest = max(len(ids) for ids in encode_prompts(tok, eval_prompts, block_size, False, cfg.eval_prompts))
        check_lengths(block_size, ("the longest --eval_prompts prompt", longest),
                      ("--max_new_tokens", cfg.max_new_tokens))
    return prompts, columns, prompt_ids, eval_prompts, eval_columns, tok


def reads_as_policy(reward_tok, tok) -> bool:
    """Whether the reward model reads the policy's token ids as they are: the same tokenizer and,
    for prompts rendered as chat, the same template. Otherwise it is handed each completion as text."""
    return (all(reward_tok.state()[k] == tok.state()[k] for k in ("kind", "data", "bos_id", "eos_id", "pad_id"))
            and reward_tok.chat_template == tok.chat_template)


def load_reward(cfg, tok, dist: Dist):
    """The frozen reward model of --reward model, placed (under FSDP sharded), and the
    TextHandoff it reads completions through when it reads text otherwise than the policy (else
    None); (None, None) for the other rewards."""
    if cfg.reward != "model":
        return None, None
    reward_model, reward_tok = load_reward_model(cfg.reward_ckpt, cfg.lora_base)
    handoff = None if reads_as_policy(reward_tok, tok) else TextHandoff.of(reward_model, reward_tok)
    return place_frozen(reward_model.to(frozen_dtype(cfg)), dist, cfg.dtype), handoff


def reward_sources(cfg, reward_model, handoff, columns: list[dict]) -> Rewards:
    """The run's Rewards: the reward model (or the toy gold reward as a function), then each --reward_fn."""
    functions = [load_reward_function(spec) for spec in cfg.reward_fn]
    if cfg.reward == "gold":
        functions.insert(0, ("gold", toy_gold_reward))
    return Rewards(reward_model, handoff, functions, cfg.reward_weights, columns, model_name(cfg.reward_ckpt))


def reward_metrics(cfg, scorer: Rewards, per_source: torch.Tensor, handoff, dist: Dist) -> dict:
    """What a step logs of its reward sources: with --reward_fn each source's raw scores (TRL's
    rewards/NAME/mean and /std), and where the reward model reads text, how many it has cut to its
    context so far."""
    metrics = source_metrics(scorer.names, per_source, dist) if cfg.reward_fn else {}
    if handoff:
        metrics["reward_model/texts_cut"] = handoff.cut
    return metrics


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


def make_evaluator(cfg, reference, scorer: Rewards, tok, eval_prompts: list, eval_columns: list[dict], dist: Dist,
                   ctx):
    """The held-out evaluation (None without held-out prompts, and off rank 0 but under FSDP, where
    every rank samples with rank 0): the toy gold reward, the judge of --judge_ckpt and --judge_fn,
    or the run's own reward sources judging the held-out samples' texts. It samples the reference
    once, here."""
    if not eval_prompts or not (dist.master or dist.sharded):
        return None
    if has_judge(cfg):
        judge = load_judge(cfg.judge_ckpt, cfg.judge_fn, cfg.judge_weights, tok, eval_columns, dist.device, ctx,
                           cfg.lora_base)
    else:
        judge = None if cfg.gold_eval else scorer.judge(tok, ctx, eval_columns)
    with ctx:
        return PolicyEvaluator(reference, tok, eval_prompts, cfg.max_new_tokens, cfg.eval_temperature, cfg.seed,
                               judge=judge)


def evaluate(evaluator, policy, tok, eval_prompts: list, cfg, dist: Dist, ctx):
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
