"""
The ceiling the study measures every method against, which no run trains with: the optimal
reward-KL frontier pi*_beta = pi_ref exp(r/beta) / Z estimated by importance weights (from the
reference and its sentiment tilts, weighted against their mixture), and best-of-N. Only
compare.py uses it; the per-run yardstick (sampling, exact KL, win rate) is evaluate.py's.
"""
import math

import torch

from evaluate import completion_batches
from head import token_logps
from tokenizer import Tokenizer
from toy import POLARITY


def optimal_frontier(rewards: torch.Tensor, betas: list[float], log_ratio: torch.Tensor | None = None,
                     min_ess: float = 16.0) -> list[tuple[float, float, float, bool]]:
    """The ceiling: gold reward and KL of pi*_beta(y|x) = pi_ref(y|x) exp(r(x,y)/beta) / Z(x), the
    optimal policy of the KL-regularised objective (DPO paper, eq. 4), for each beta.

    rewards (M, K): gold rewards of K samples for each of M prompts, drawn from pi_ref or from a
    proposal q; log_ratio (M, K): log pi_ref(y|x) - log q(y|x) of each sample (None: q = pi_ref).
    Self-normalised importance weights w_i = softmax(r_i / beta + log_ratio_i) over a prompt's
    samples turn them into pi* samples: E_pi*[r] = sum_i w_i r_i, and with Z estimated by
    Z = mean_i exp(r_i / beta + log_ratio_i), KL(pi* || pi_ref) = sum_i w_i r_i / beta - log Z
    (for q = pi_ref this is sum_i w_i log(K w_i), which cannot exceed log K). Both are averaged
    over prompts. The estimate holds while the weights are spread over many samples, so a point
    is marked reached when the median prompt's effective sample size 1 / sum_i w_i^2 is at
    least min_ess. Returns (beta, gold reward, KL, reached) per beta."""
    rewards = rewards.double()
    log_ratio = torch.zeros_like(rewards) if log_ratio is None else log_ratio.double()
    K = rewards.size(1)
    out = []
    for beta in betas:
        logits = rewards / beta + log_ratio  # (M, K): log of pi*(y) Z / q(y)
        w = logits.softmax(dim=1)
        log_z = logits.logsumexp(dim=1) - math.log(K)
        gold = (w * rewards).sum(1).mean().item()
        kl = ((w * rewards).sum(1) / beta - log_z).mean().item()
        ess = 1.0 / (w ** 2).sum(1)
        out.append((beta, gold, kl, ess.median().item() >= min_ess))
    return out


def mixture_log_ratio(logp_ref: torch.Tensor, logp_policies: torch.Tensor) -> torch.Tensor:
    """log pi_ref(y) - log q(y) for q the equal mixture of C policies, the weight of a sample in
    deterministic-mixture importance sampling (Owen & Zhou 2000): equal numbers of samples drawn
    from each policy and every sample weighted against the mixture, not against the policy that
    drew it, so a sample any one policy makes likely keeps a bounded weight.
    logp_ref (N,), logp_policies (C, N): log-probabilities of the same N samples."""
    return logp_ref - (logp_policies.logsumexp(0) - math.log(logp_policies.size(0)))


class SentimentTilt:
    """A proposal for the ceiling: the reference with every next token's logit raised by strength
    x the change that token makes to the gold reward's net sentiment count (+1 for a positive
    word, -1 for a negative one, the sign flipped after "not" in the same sentence, as
    data.gold_reward reads it), and eos lowered by half the strength, since ending forgoes every
    later word (without it the strong tilts end before pi*'s longest, most positive completions
    at KL ~ 8). So q(y) = prod_t pi_ref(y_t | y<t) exp(s_t(y_t)) / Z_t, s_t the shift, leans
    towards pi* = pi_ref exp(r / beta) / Z as a trained policy does, yet its density is exact from
    the reference's logits and it depends on no training run; strength 0 is the reference itself.
    Words that are not one token are left untilted: the proposal is then further from pi*, never
    wrong, since importance weights correct for any proposal."""

    def __init__(self, tok: Tokenizer, strength: float):
        self.strength = strength
        one_token = lambda word: ids[0] if len(ids := tok.encode(word)) == 1 else -1  # -1 matches no token
        self.polarity = torch.zeros(tok.vocab_size)  # (V,)
        for word, sign in POLARITY.items():
            if (i := one_token(word)) >= 0:
                self.polarity[i] = sign
        self.ending = torch.zeros(tok.vocab_size)  # (V,)
        self.ending[tok.eos_id] = -0.5
        self.not_id, self.stop_id = one_token("not"), one_token(".")

    def sign(self, ids: torch.Tensor) -> torch.Tensor:
        """After each position of ids (B, T), -1 inside a negated sentence, else 1: (B, T)."""
        pos = torch.arange(ids.size(1), device=ids.device)
        last_not = torch.where(ids == self.not_id, pos, -1).cummax(1).values
        last_stop = torch.where(ids == self.stop_id, pos, -1).cummax(1).values
        return 1.0 - 2.0 * (last_not > last_stop).float()

    def shift(self, sign: torch.Tensor) -> torch.Tensor:
        """The logit shift for signs of any shape (...): (..., V)."""
        return self.strength * (sign[..., None] * self.polarity.to(sign.device) + self.ending.to(sign.device))

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """GPT.generate's logits_processor: the next token's logits (B, V), shifted."""
        return logits + self.shift(self.sign(ids)[:, -1])


@torch.no_grad()
def completion_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                        batch_size: int = 64, tilts: list[SentimentTilt] | None = None) -> torch.Tensor:
    """log pi(y | x) of each completion at temperature 1, summed over its tokens: (N,). With
    tilts, the log-probability under each tilt of the model instead, from the same forward
    passes: (len(tilts), N)."""
    out = []
    for batch in completion_batches(model, prompt_ids, completion_ids, pad_id, batch_size):
        logits = model(batch["input_ids"], batch["attention_mask"]).float()  # (B, T, V)
        rows = []
        for tilt in tilts or [None]:
            tilted = logits if tilt is None else logits + tilt.shift(tilt.sign(batch["input_ids"]))
            rows.append(token_logps(tilted, batch["labels"]).sum(-1))  # (B,)
        out.append(torch.stack(rows))
    out = torch.cat(out, dim=1).cpu()
    return out if tilts else out[0]


def best_of_n(gold: torch.Tensor, scores: torch.Tensor, ns: list[int]) -> list[tuple[int, float, float]]:
    """Best-of-N sampling: of the first n samples of each prompt, keep the one the reward model
    scores highest. gold, scores (M, K) with K >= max(ns). Returns (n, mean gold reward of the
    kept samples, KL bound) per n, where log n - (n - 1) / n bounds KL(best-of-n || pi_ref)
    (Stiennon et al. 2020; Beirami et al. 2024)."""
    out = []
    for n in ns:
        best = scores[:, :n].argmax(1)
        kept = gold[:, :n].gather(1, best[:, None]).squeeze(1)
        out.append((n, kept.mean().item(), math.log(n) - (n - 1) / n))
    return out
