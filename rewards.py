"""
Where a score comes from: a reward model, and Python reward functions, for PPO, RLOO and GRPO's
training (Rewards), and as the judge of finished texts (TextJudge: a held-out evaluation's
eval/score and win rate, sample.py's judged pairs).

- A reward model that reads text as the policy does (the same tokenizer and chat template) scores
  the policy's token ids as they are.
- One with another tokenizer or template (a downloaded reward model) is handed each completion as
  text, as TRL hands it over (TextHandoff): decoded, rendered with its prompt by the reward
  model's own template (plain prompt + completion when it has none), encoded by its tokenizer.
- A reward function has TRL's signature, f(prompts, completions, **columns) -> list[float | None]:
  completions are texts, or [{"role": "assistant", "content": text}] for conversational prompts,
  and the prompt file's other fields (say "answer") come as keyword lists. None is no score.

The score of a completion is the weighted sum of its sources' scores, a None left out, as TRL's
nansum leaves it. The toy task's gold reward is one such function (toy_gold_reward).
"""
import importlib.util
import math
import os
from dataclasses import dataclass

import torch

from files import DataError
from toy import gold_reward


def toy_gold_reward(prompts, completions, **columns) -> list[float]:
    """The toy task's gold reward (toy.gold_reward) as a reward function."""
    return [gold_reward(c, p) for c, p in zip(completions, prompts)]


def load_reward_function(spec: str, flag: str = "--reward_fn"):
    """The function NAME of the Python file FILE, from "FILE.py:NAME" (given as `flag`)."""
    path, _, name = spec.rpartition(":")
    if not (path.endswith(".py") and name.isidentifier()):
        raise DataError(f"{flag} {spec}: not FILE.py:NAME")
    if not os.path.isfile(path):
        raise DataError(f"{flag} {spec}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"reward_fn_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: whatever it raises on import is its failure
        raise DataError(f"{flag} {spec}: importing {path} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise DataError(f"{flag} {spec}: {path} defines no function {name}")
    return name, fn


class TextHandoff:
    """A completion as the reward model reads text: decoded by the policy's tokenizer, rendered
    with its prompt by the reward model's chat template (its tokenizer's bos where it adds one and
    plain prompt + completion without a template), encoded by the reward model's tokenizer and cut
    on the right to its context, counted in `cut`."""

    def __init__(self, reward_tok, block_size: int):
        self.tok, self.block_size, self.cut = reward_tok, block_size, 0

    @classmethod
    def of(cls, reward_model, reward_tok) -> "TextHandoff":
        """The handoff to a loaded reward model: its tokenizer with its own template, if it has one."""
        return cls(reward_tok.with_chat_template("auto", chat_data=False), reward_model.config.block_size)

    def text(self, prompt, completion: str) -> str:
        if self.tok.chat_template:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.tok.render(messages + [{"role": "assistant", "content": completion}])
        if isinstance(prompt, list):
            raise DataError("the reward model has no chat template to render a conversational prompt with")
        return prompt + completion

    def ids(self, prompt, completion: str) -> list[int]:
        if self.tok.chat_template:
            return self.tok.encode_with_offsets(self.text(prompt, completion))[0]
        return self.tok.encode_prompt(self.text(prompt, completion))

    def batch(self, prompts: list, completions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (B, T) ids and mask of the reward model's reading of each completion."""
        rows = [self.ids(p, c) for p, c in zip(prompts, completions)]
        self.cut += sum(len(r) > self.block_size for r in rows)
        rows = [r[:self.block_size] for r in rows]
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), self.tok.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), T), dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, device=device)
            mask[i, :len(r)] = 1
        return ids, mask


def model_name(reward_ckpt: str) -> str:
    """A reward model's name in logs: its folder's (a run folder's for its ckpt.pt)."""
    return os.path.basename(reward_ckpt.removesuffix("/ckpt.pt").rstrip("/"))


@dataclass
class JudgeConfig:
    """The judge of a run's held-out samples, apart from whatever the run trains on (compare.py's
    --judge); train_dpo.py's, train_ppo.py's and train_online_dpo.py's configs take it."""
    judge_ckpt: str = ""
    """judge of the samples of --eval_prompts: a reward model (train_rm.py's, or a downloaded sequence
    classifier, handed each completion as text); logs eval/score and eval/win_rate against the SFT model beside
    eval/kl. PPO and online DPO without a judge are judged by their own reward sources"""
    judge_fn: tuple[str, ...] = ()
    """a judging reward function, FILE.py:NAME with TRL's signature; the flag once for each"""
    judge_weights: tuple[float, ...] = ()
    """the judges' weights, --judge_ckpt's first; empty: 1 each"""


def has_judge(cfg) -> bool:
    return bool(cfg.judge_ckpt or cfg.judge_fn)


def load_judge(reward_ckpt: str, reward_fns, weights, tok, columns: list[dict], device, ctx,
               lora_base: str = "", flag: str = "--judge_fn") -> "TextJudge":
    """The judge of held-out samples that --judge_ckpt, --judge_fn and --judge_weights name (a
    reward model, frozen on `device`, and functions, given as `flag`), for the policy's tokenizer
    `tok`."""
    from checkpoint import load_reward_model  # checkpoint.py imports the model stack; the functions need none of it
    reward_model = handoff = None
    if reward_ckpt:
        reward_model, reward_tok = load_reward_model(reward_ckpt, lora_base)
        reward_model.to(device).eval().requires_grad_(False)
        handoff = TextHandoff.of(reward_model, reward_tok)
    functions = [load_reward_function(spec, flag) for spec in reward_fns]
    return Rewards(reward_model, handoff, functions, weights, None, model_name(reward_ckpt)).judge(tok, ctx, columns)


class TextJudge:
    """A run's reward sources scoring finished completions from their text alone (the held-out
    evaluation's judge): a reward model reads each through a TextHandoff, its own tokenizer and
    template or, where they are the policy's, the policy's (the text encoded again, which may split
    a token differently where the completion meets its prompt)."""

    def __init__(self, rewards: "Rewards", tok, ctx, columns: list[dict] | None):
        model = rewards.reward_model
        handoff = rewards.handoff or (TextHandoff(tok, model.config.block_size) if model is not None else None)
        self.rewards = Rewards(model, handoff, rewards.functions, rewards.weights, columns, rewards.names[0])
        self.device = next(model.parameters()).device if model is not None else torch.device("cpu")
        self.ctx = ctx

    def __call__(self, prompts: list, texts: list[str], columns: list[dict] | None = None) -> list[float]:
        """Scores of texts completing the held-out prompts, or other prompts with their `columns`."""
        unread = torch.zeros((len(texts), 1), dtype=torch.long, device=self.device)  # every source reads the text
        scores, _ = self.rewards.score(list(range(len(texts))), prompts, texts, unread, unread, self.ctx, columns)
        return scores.tolist()


class Rewards:
    """Every source of a run's scores, with their weights: the reward model first (if any), then the
    reward functions in the order given. `columns` are the prompt file's other fields, a dict a
    prompt."""

    def __init__(self, reward_model=None, handoff: TextHandoff | None = None, functions=(), weights=(),
                 columns=None, model_name: str = "reward_model"):
        self.reward_model, self.handoff, self.functions = reward_model, handoff, list(functions)
        self.names = ([model_name] if reward_model is not None else []) + [name for name, _ in self.functions]
        self.weights = list(weights) or [1.0] * len(self.names)
        if len(self.weights) != len(self.names):
            raise DataError(f"--reward_weights: {len(self.weights)} weights for {len(self.names)} reward sources "
                            f"({', '.join(self.names)})")
        self.columns = columns

    def score(self, indices: list[int], prompts: list, completions: list[str], input_ids, attention_mask, ctx,
              columns: list[dict] | None = None):
        """(B,) weighted scores of one batch of completions of the prompts at `indices`, and each
        source's (S, B) scores, NaN where a function gave None. input_ids and attention_mask are the
        policy's rows, prompt and completion, which a reward model of the policy's tokenizer reads.
        `columns`, a dict a prompt, stand in for the prompts' own (self.columns at `indices`)."""
        device = input_ids.device
        parts = []
        if self.reward_model is not None:
            if self.handoff is not None:
                input_ids, attention_mask = self.handoff.batch(prompts, completions, device)
            with ctx:
                parts.append(self.reward_model(input_ids, attention_mask).float())
        conversational = any(isinstance(p, list) for p in prompts)
        given = [[{"role": "assistant", "content": c}] for c in completions] if conversational else completions
        if columns is None:
            columns = [self.columns[i] for i in indices] if self.columns is not None else [{}] * len(prompts)
        keyword_lists = {k: [c.get(k) for c in columns] for k in dict.fromkeys(k for c in columns for k in c)}
        for name, fn in self.functions:
            parts.append(self._call(name, fn, indices, prompts, given, keyword_lists, device))
        per_source = torch.stack(parts)  # (S, B)
        weights = torch.tensor(self.weights, device=device)[:, None]
        return (per_source * weights).nansum(0), per_source

    def judge(self, tok, ctx, columns: list[dict] | None = None) -> "TextJudge":
        """These sources as a judge of finished texts, of held-out prompts with `columns`."""
        return TextJudge(self, tok, ctx, columns)

    @staticmethod
    def _call(name, fn, indices, prompts, completions, columns, device) -> torch.Tensor:
        try:
            values = fn(prompts=prompts, completions=completions, **columns)
        except Exception as e:  # the user's function: one line naming it and the first prompt it fails on
            for j, i in enumerate(indices):
                try:
                    fn(prompts=prompts[j:j + 1], completions=completions[j:j + 1],
                       **{k: v[j:j + 1] for k, v in columns.items()})
                except Exception as single:
                    e = single
                    break
            else:
                i = f"{indices[0]}..{indices[-1]} (together)"
            raise DataError(f"reward function {name} raised on prompt {i}: {type(e).__name__}: {e}") from None
        if not isinstance(values, (list, tuple)) or len(values) != len(prompts):
            raise DataError(f"reward function {name} returned {type(values).__name__} "
                            f"{len(values) if hasattr(values, '__len__') else ''}, not a list of {len(prompts)} "
                            "scores (floats or None)")
        for i, v in zip(indices, values):
            if not (v is None or isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise DataError(f"reward function {name} gave prompt {i} the score {v!r}, not a finite number or None")
        return torch.tensor([math.nan if v is None else float(v) for v in values], device=device)
