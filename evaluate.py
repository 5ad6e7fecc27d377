"""
The yardstick every method is measured with, so DPO and PPO are compared on the same terms:
sample a completion for each held-out prompt, then report its mean gold reward, its KL from the
reference policy, and how often it beats the reference's own sample by gold reward. The
ceiling that only the study uses (the optimal frontier, best-of-N) is in ceiling.py.
"""
import statistics

import torch

from data import collate
from head import HEAD_CHUNK
from model import IGNORE_INDEX
from tokenizer import Tokenizer
from toy import gold_reward, is_well_formed


def sample_completions(model, tok: Tokenizer, prompts: list[str], max_new_tokens: int,
                       temperature: float = 1.0, seed: int = 0, top_k: int | None = None,
                       top_p: float | None = None, batch_size: int = 64, logits_processor=None):
    """Completion token ids and texts for `prompts`, and whether each ended with a stop token. A private
    generator makes samples repeatable and leaves the training RNG stream untouched."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    ids, texts, ended = [], [], []
    for i in range(0, len(prompts), batch_size):
        prompt_ids = [tok.encode_prompt(p) for p in prompts[i:i + batch_size]]
        out, mask = model.generate(prompt_ids, max_new_tokens, tok.stop_ids, tok.pad_id,
                                   temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                                   logits_processor=logits_processor)
        for row, n in zip(out.tolist(), mask.sum(1).tolist()):
            ids.append(row[:n])
            texts.append(tok.decode(row[:n]))
            ended.append(n > 0 and row[n - 1] in tok.stop_ids)
    return ids, texts, ended


def completion_batches(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                       batch_size: int):
    """Prompt + completion sequences, collated batch_size at a time onto the model's device,
    with labels on the completion tokens only."""
    device = next(model.parameters()).device
    for i in range(0, len(prompt_ids), batch_size):
        batch = collate([(p + c, len(p)) for p, c in zip(prompt_ids[i:i + batch_size],
                                                          completion_ids[i:i + batch_size])], pad_id)
        yield {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def sequence_kl(policy, reference, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                pad_id: int, batch_size: int = 64, temperature: float = 1.0,
                max_logits: int = HEAD_CHUNK) -> torch.Tensor:
    """KL(pi || pi_ref) of each completion: the exact per-token KL over the vocabulary,
    sum_v pi(v | x, y_<t) (log pi(v | x, y_<t) - log pi_ref(v | x, y_<t)), summed over the
    completion's tokens, between the two distributions as sampled at `temperature` (logits
    divided by it). Returns (N,). Each forward holds at most max_logits logits a model: at a real
    vocabulary a few sequences at a time, not the several GB of (64, T, V) float32 logits."""
    longest = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    batch_size = max(1, min(batch_size, max_logits // (longest * policy.config.vocab_size)))
    kls = []
    for batch in completion_batches(policy, prompt_ids, completion_ids, pad_id, batch_size):
        logits = policy(batch["input_ids"], batch["attention_mask"])[:, :-1].float()  # (B, T-1, V)
        logp = (logits / temperature).log_softmax(-1)
        logq = (reference(batch["input_ids"], batch["attention_mask"])[:, :-1].float()
                / temperature).log_softmax(-1)
        token_kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T-1): the logits at t score token t+1
        kls.append((token_kl * (batch["labels"][:, 1:] != IGNORE_INDEX)).sum(-1))
    return torch.cat(kls).cpu()


def sample_metrics(prompts: list[str], texts: list[str], ended: list[bool]) -> dict[str, float]:
    """Toy-task statistics of samples: gold reward (mean, spread), eos rate, and the share that
    end with eos and parse in the toy grammar together with their prompt."""
    rewards = [gold_reward(t, p) for p, t in zip(prompts, texts)]
    return {
        "eval/gold_reward": statistics.fmean(rewards),
        "eval/gold_reward_std": statistics.pstdev(rewards),
        "eval/eos_rate": statistics.fmean(ended),
        "eval/well_formed": statistics.fmean(e and is_well_formed(f"{p} {t}")
                                             for p, t, e in zip(prompts, texts, ended)),
    }


class PolicyEvaluator:
    """eval/gold_reward, eval/kl and eval/win_rate of a policy on held-out prompts.

    The reference is frozen, so its samples and their gold rewards are drawn once, here. The
    policy is sampled with the same seed at every call, and the same seed as the reference
    (common random numbers): evaluations differ only through the policy, and a policy equal
    to the reference ties every prompt (win rate 0.5, KL 0). Win rate counts a tie as half. With
    offload=True the reference waits on the CPU and visits the policy's device only for the KL."""

    def __init__(self, reference, tok: Tokenizer, prompts: list[str], max_new_tokens: int,
                 temperature: float = 1.0, seed: int = 0, offload: bool = False, judge=None):
        if temperature <= 0:
            raise SystemExit("error: the evaluation samples at a temperature > 0 (its KL is that of the "
                             "sampled distributions)")
        self.reference, self.tok, self.prompts, self.offload = reference, tok, prompts, offload
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.prompt_ids = [tok.encode_prompt(p) for p in prompts]
        # judge(prompts, texts) -> scores; None: the toy task's gold reward, with its statistics
        self.judge = judge
        _, texts, _ = sample_completions(reference, tok, prompts, max_new_tokens, temperature, seed)
        self.reference_rewards = self.scores(texts)

    def scores(self, texts: list[str]) -> list[float]:
        if self.judge is None:
            return [gold_reward(t, p) for p, t in zip(self.prompts, texts)]
        return self.judge(self.prompts, texts)

    def __call__(self, policy) -> tuple[dict[str, float], list[str]]:
        """Metrics, and the policy's sample texts (to print a few)."""
        was_training = policy.training
        policy.eval()
        ids, texts, ended = sample_completions(policy, self.tok, self.prompts, self.max_new_tokens,
                                               self.temperature, self.seed)
        rewards = self.scores(texts)
        self.reference.to(next(policy.parameters()).device)
        kl = sequence_kl(policy, self.reference, self.prompt_ids, ids, self.tok.pad_id,
                         temperature=self.temperature)
        if self.offload:
            self.reference.cpu()
        wins = [1.0 if r > q else 0.5 if r == q else 0.0 for r, q in zip(rewards, self.reference_rewards)]
        policy.train(was_training)
        metrics = (sample_metrics(self.prompts, texts, ended) if self.judge is None else
                   {"eval/score": statistics.fmean(rewards), "eval/score_std": statistics.pstdev(rewards),
                    "eval/eos_rate": statistics.fmean(ended)})
        metrics.update({"eval/kl": kl.mean().item(), "eval/win_rate": statistics.fmean(wins)})
        return metrics, texts
