"""
Supervised fine-tuning: next-token loss on completions (or on whole texts), the first stage of
the pipeline and the reference model of every later one. The loss is here (the labelled
tokens' log-probs the model returns, summed); the loop below shows each step whole, with the
shared pieces from train_utils.py.

    python train_sft.py                                  # the toy task, tiny model, CPU
    torchrun --nproc_per_node 2 train_sft.py             # the same run on 2 processes
    python train_sft.py --chat                           # the toy task as conversations (Zephyr template)
    python train_sft.py --init_from SmolLM2-135M --train_file ultrachat.jsonl --lora_rank 16 --grad_checkpoint
    python train_sft.py --train_file my.jsonl --preset small --device cuda --dtype bfloat16
"""
import dataclasses
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from checkpoint import Run, is_toy_model, load_gpt
from data import hold_out, load_prompts, load_sft, real_tokens, take, tokenize_sft
from distributed import Dist, barrier, seed_everything, wrap_model
from evaluate import sample_completions, sample_metrics
from files import DataError
from model import GPT, IGNORE_INDEX, PRESETS
from tokenizer import Tokenizer
from toy import ToyConfig, gold_reward, prepare_toy_data
from train_utils import (TrainConfig, add_sums, all_reduce_sums, autocast, batch_means, check_batches,
                         check_lengths, check_training_settings, check_weights, clip_grad_norm,
                         default_max_length, global_batch, gradient_sync, lora_record, make_optimizer,
                         micro_batches, n_trainable, prepare_trainable, print_settled, progress_bar,
                         require_inputs, run_script, set_lr, settle_schedule, settle_steps, shard_indices)


# The schedule a run settles where its flags are not given (train_utils.settle_schedule, printed): the
# toy task's, tuned on it, and the learning rate for your own model (the fields' help says which).
TOY_SCHEDULE = dict(max_iters=1000, lr=2e-3, warmup_iters=50)
OWN_MODEL_LR = 2e-5


@dataclass
class Config(TrainConfig):
    out_dir: str = "out/sft"
    """folder for config.json, metrics.jsonl and ckpt.pt"""
    # data
    data_dir: Optional[str] = None
    """the toy task's folder, written on first use (ignored with --train_file); none: data/toy, or
    data/toy_chat with --chat"""
    chat: bool = False
    """the toy task as conversations (python toy.py --chat): a user turn, the assistant's reply, the Zephyr
    template"""
    train_file: str = ""
    """your own SFT JSONL, {"prompt","completion"}, {"text"} or {"messages"} records; empty: the toy task
    (not with a Hugging Face --init_from)"""
    val_file: str = ""
    """held-out JSONL; empty: the last 5% of --train_file's records, or the toy task's sft_val.jsonl"""
    format: Literal["auto", "prompt_completion", "text", "messages", "conversational_prompt_completion",
                    "sharegpt"] = "auto"
    """record format; auto recognises it from the first record"""
    skip_bad: bool = False
    """skip invalid records (and report how many) instead of stopping at the first"""
    tokenizer: str = ""
    """sentencepiece .model; empty: the toy task's, or one trained on --train_file"""
    vocab_size: int = 8000
    """vocabulary cap when a tokenizer is trained on --train_file"""
    max_length: Optional[int] = None
    """longest sequence in tokens, prompt and completion together; longer ones are truncated. none: 64 on the
    toy task, else the model's context up to 1024"""
    max_prompt_length: Optional[int] = None
    """longest prompt; a longer one keeps its last tokens (a conversation its system message, its newest
    turns and the end of its last user turn). none: max_length less one"""
    # model
    preset: Literal["tiny", "small", "medium", "gpt2"] = "tiny"
    """model size (see model.PRESETS)"""
    init_from: str = ""
    """start from this checkpoint instead of a fresh model: a ckpt.pt, or a Hugging Face model folder (its
    tokenizer too)"""
    dropout: float = 0.0
    """dropout probability"""
    # optimisation
    lr: Optional[float] = None
    """peak learning rate; none: 2e-3 on the toy task (and any fresh model), 2e-5 on your own model --init_from
    (TRL's SFT default, and Zephyr's)"""
    # evaluation
    eval_samples: int = 128
    """held-out prompts sampled at each evaluation (toy task: gold reward, well-formedness; yours: stop rate,
    samples printed)"""
    max_new_tokens: int = 40
    """longest sampled completion"""
    temperature: float = 1.0
    """sampling temperature; 0 is greedy"""


def sft_loss(model, batch):
    """Summed next-token cross-entropy over labelled tokens (prompt and pad labels are
    IGNORE_INDEX), and no other metric."""
    token_logps = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])  # (B, T-1)
    return -token_logps.sum(), {}


def n_labels(labels: torch.Tensor) -> int:
    """Tokens that carry loss: the labelled positions after the first (the shift)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def toy_dir(cfg: Config) -> str:
    return cfg.data_dir or ("data/toy_chat" if cfg.chat else "data/toy")


def load_data(cfg: Config, dist: Dist, tok: Tokenizer | None):
    """Tokenised examples, held-out prompts and the tokenizer: `tok` if a checkpoint fixes it,
    else --tokenizer, else the toy task's or one trained on --train_file. Raises DataError on bad
    input, before anything is written."""
    if cfg.train_file:
        examples = load_sft(cfg.train_file, cfg.format, cfg.skip_bad)
        if cfg.val_file:
            val = load_sft(cfg.val_file, cfg.format, cfg.skip_bad)
        else:
            examples, val = hold_out(examples, cfg.train_file, dist.master)
        # sampled at evaluation: the prompts, or each conversation's opening user turn
        prompts = [e.messages[0]["content"] if e.messages else e.prompt for e in val
                   if e.prompt or (e.messages and e.messages[0]["role"] == "user")]
    else:
        data_dir = toy_dir(cfg)
        if dist.master:
            prepare_toy_data(data_dir, ToyConfig(chat=cfg.chat))
        barrier(dist)
        examples = load_sft(os.path.join(data_dir, "sft_train.jsonl"))
        val = load_sft(cfg.val_file or os.path.join(data_dir, "sft_val.jsonl"), cfg.format, cfg.skip_bad)
        prompts = load_prompts(os.path.join(data_dir, "prompts_val.jsonl"))
    if tok is None and cfg.tokenizer:
        tok = Tokenizer.load(cfg.tokenizer)
    elif tok is None and cfg.train_file:
        tok = train_tokenizer_on(examples, cfg.vocab_size)
    elif tok is None:
        tok = Tokenizer.load(os.path.join(toy_dir(cfg), "tokenizer.model"))
    tok = tok.with_chat_template(cfg.chat_template, any(e.messages for e in examples + val))
    train = tokenize_sft(examples, tok, cfg.max_length, cfg.max_prompt_length, verbose=dist.master)
    val = tokenize_sft(val, tok, cfg.max_length, cfg.max_prompt_length, verbose=dist.master)
    return train, val, prompts[:cfg.eval_samples], tok


def train_tokenizer_on(examples, vocab_size: int) -> Tokenizer:
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        for e in examples:
            text = e.text if e.text is not None else " ".join(
                m["content"] for m in e.messages) if e.messages else f"{e.prompt} {e.completion}"
            f.write(text.replace("\n", " ") + "\n")
    try:
        return Tokenizer.train(f.name, vocab_size)
    finally:
        os.remove(f.name)


def evaluate(model, raw_model, val_data, prompts, tok, cfg: Config, dist: Dist, ctx):
    """Held-out loss on every rank's shard; on rank 0, samples for held-out prompts, scored by
    the gold reward on the toy task (under FSDP every rank samples the same, since every forward
    is collective). Returns the metrics and a few samples to print."""
    model.eval()
    sums = {}
    for idx in shard_indices(len(val_data["input_ids"]), dist, cfg.batch_size):
        with torch.no_grad(), ctx:
            sums = add_sums(sums, *sft_loss(model, take(val_data, idx, dist.device)))
    sums = all_reduce_sums(sums, dist)
    metrics, samples = {"eval/loss": sums["loss"] / n_labels(val_data["labels"])}, []
    if prompts and (dist.master or dist.sharded):
        with ctx:
            _, texts, ended = sample_completions(raw_model, tok, prompts, cfg.max_new_tokens, cfg.temperature, cfg.seed)
        toy = not cfg.train_file
        metrics.update(sample_metrics(prompts, texts, ended) if toy else {"eval/eos_rate": statistics.fmean(ended)})
        samples = [f"[{p}] {t}" + (f"   (gold reward {gold_reward(t, p):.2f})" if toy else "")
                   for p, t in list(zip(prompts, texts))[:cfg.print_samples]]
    model.train()
    return metrics, samples


def check_settings(cfg: Config, dist: Dist) -> None:
    """Every setting, each refused with one line naming its flag, before anything is read or written."""
    check_training_settings(cfg)
    if cfg.lora_rank and not cfg.init_from:
        raise DataError("--lora_rank adapts a trained model; give it with --init_from")
    require_inputs(cfg, "init_from")
    if cfg.init_from and not cfg.train_file and not is_toy_model(cfg.init_from):
        raise DataError(f"--train_file: required with your own model (--init_from {cfg.init_from}); "
                        "the toy task is for the toy model")
    for flag in ("max_length", "max_prompt_length", "max_new_tokens"):
        if getattr(cfg, flag) is not None and getattr(cfg, flag) < 1:
            raise DataError(f"--{flag} {getattr(cfg, flag)}: must be at least 1")
    if not 0 <= cfg.dropout < 1:  # a new model's; a loaded config is checked where it is read (hf.check_config)
        raise DataError(f"--dropout {cfg.dropout}: must be in [0, 1)")
    if cfg.eval_samples < 0 or cfg.temperature < 0:
        raise DataError("--eval_samples and --temperature must be 0 or more")
    require_inputs(cfg, "init_from", "train_file", "val_file", "tokenizer")


def settle_defaults(cfg: Config, dist: Dist) -> None:
    """The settings not given, settled before anything is read, and printed: the optimisation of a
    fresh toy model, or of a model --init_from starts from (the toy task's or your own)."""
    before = dataclasses.asdict(cfg)
    settle_schedule(cfg, not cfg.init_from or is_toy_model(cfg.init_from), TOY_SCHEDULE, OWN_MODEL_LR)
    print_settled(before, cfg, dist)


def train(cfg: Config, dist: Dist) -> dict:
    # 1. settings and data (validated before anything is written), model, optimizer, run folder
    check_settings(cfg, dist)
    seed_everything(cfg.seed, dist)
    run = Run(cfg, dist, counts=("tokens",))
    settle_defaults(cfg, dist)  # once the folder is known to be writable: it reads --init_from's record
    raw_model, tok = load_gpt(cfg.init_from, lora_base=cfg.lora_base) if cfg.init_from else (None, None)
    block_size = raw_model.config.block_size if raw_model else PRESETS[cfg.preset]["block_size"]
    default_max_length(cfg, block_size, toy=not cfg.train_file)
    check_lengths(block_size, ("--max_length", cfg.max_length))
    if run.resumed:
        tok = Tokenizer.from_state(run.resumed["tokenizer"], run.ckpt_path)
    train_data, val_data, prompts, tok = load_data(cfg, dist, tok)
    check_batches(len(train_data["input_ids"]), "training sequences", cfg, dist)
    settle_steps(cfg, len(train_data["input_ids"]), dist)
    longest_prompt = max((len(tok.encode_prompt(p)) for p in prompts), default=0)
    check_lengths(block_size, ("the longest held-out prompt", longest_prompt), ("--max_new_tokens", cfg.max_new_tokens))
    if raw_model is None:
        raw_model = GPT.from_preset(cfg.preset, tok.vocab_size, cfg.dropout)
    prepare_trainable(raw_model, cfg)
    model = wrap_model(raw_model, dist, cfg.dtype, cfg.compile)
    optimizer = make_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), dist.device)
    start = run.start(raw_model, optimizer)
    tokens = run.resumed["tokens"] if run.resumed else 0  # real tokens trained on so far
    ctx = autocast(dist.device, cfg.dtype)
    n_examples = len(train_data["input_ids"])
    record = {"toy_task": not cfg.train_file, **lora_record(cfg, cfg.init_from)}  # what each checkpoint notes
    if dist.master:
        print(f"model: {raw_model.num_params() / 1e6:.2f}M parameters ({n_trainable(raw_model) / 1e6:.2f}M training), "
              f"{n_examples} training sequences, {dist.world_size} process(es) on {dist.device}")

    # 2. the model before training, evaluated and checkpointed as step 0 (a resumed run's was, before)
    metrics = {}
    if not run.resumed:
        metrics, samples = evaluate(model, raw_model, val_data, prompts, tok, cfg, dist, ctx)
        run.print(0, metrics, samples)
        run.log(0, metrics)
        run.save(0, raw_model, optimizer, tok, {"tokens": tokens, **record})

    # 3. the loop: one optimizer step on a global batch of sequences each
    bar = progress_bar(cfg.max_iters, start, dist, "sft")
    step = start
    while step < cfg.max_iters:
        # 3a. this step's learning rate and global batch; this rank's micro-batches
        lr = set_lr(optimizer, step, cfg)
        indices = global_batch(n_examples, cfg.batch_size, step, cfg.seed)
        batches = [take(train_data, idx, dist.device) for idx in micro_batches(indices, dist, cfg.grad_accum)]
        step += 1  # counted from 1 from here on: the step's number in messages, logs and checkpoints
        # 3b. forward and backward of each micro-batch: its loss summed over tokens, scaled so that the
        # gradient is the mean over the global batch's tokens (DDP averages over ranks: x world_size)
        n_tokens = n_labels(train_data["labels"][indices])
        sums = {}
        for i, batch in enumerate(batches):
            with gradient_sync(model, dist, sync=i == len(batches) - 1):
                with ctx:
                    loss_sum, metric_sums = sft_loss(model, batch)
                (loss_sum * (dist.world_size / n_tokens)).backward()
            sums = add_sums(sums, loss_sum, metric_sums)
        # 3c. the optimizer step on the gradients of the whole global batch: clip, step, zero
        stats = batch_means(sums, n_tokens, dist, step)
        stats["grad_norm"] = clip_grad_norm(model, cfg.grad_clip, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        check_weights(model, dist, step)
        tokens += real_tokens(train_data, indices)
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", refresh=False)
        # 3d. training metrics every log_interval steps; evaluate and checkpoint every eval_interval
        # steps (early_eval_interval before early_eval_until) and at the end; one metrics.jsonl row a step
        logging = step % cfg.log_interval == 0 or step == cfg.max_iters
        metrics = {**stats, "learning_rate": lr, "tokens": tokens} if logging else {}
        if run.evaluates(step):
            eval_metrics, samples = evaluate(model, raw_model, val_data, prompts, tok, cfg, dist, ctx)
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
