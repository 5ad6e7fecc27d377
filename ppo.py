"""
PPO for RLHF as pure functions and small classes: rollout, per-token rewards with a KL penalty,
KL controllers, GAE, the critic-free group advantages (RLOO, GRPO), whitening, and the clipped
policy and value losses, on model.py alone. train_ppo.py puts them in order in its loop. The
details follow Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences"),
Ouyang et al. 2022 (InstructGPT) and Huang et al. 2023 ("The N Implementation Details of RLHF
with PPO"), and the names of the logged statistics follow TRL.

Layout: a rollout row is a left-padded prompt of P columns followed by a response of R columns
(right-padded after eos). The logits and values at column P - 1 + t belong to response token t.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from model import IGNORE_INDEX, left_pad


class PolicyAndCritic(nn.Module):
    """Both trained models behind one forward, so DDP wraps, syncs and steps them together."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, input_ids, attention_mask, **policy_kwargs):
        return self.policy(input_ids, attention_mask, **policy_kwargs), self.critic.values(input_ids, attention_mask)


@dataclass
class Rollout:
    input_ids: torch.Tensor       # (B, P + R) prompt then response
    attention_mask: torch.Tensor  # (B, P + R)
    response_mask: torch.Tensor   # (B, R), 1 up to and including the stop token
    n_prompt: int                 # P


@torch.no_grad()
def rollout(policy, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
            temperature: float, generator: torch.Generator) -> Rollout:
    """Sample one response per prompt with the KV-cache generate; generation stops each row at
    its first stop id, and what follows is padding outside the response mask."""
    query, query_mask = left_pad(prompts, pad_id, next(policy.parameters()).device)
    responses, response_mask = policy.generate(prompts, max_new_tokens, stop_ids, pad_id,
                                               temperature=temperature, generator=generator)
    return Rollout(torch.cat([query, responses], 1), torch.cat([query_mask, response_mask], 1),
                   response_mask, query.size(1))


def response_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Rollout rows (B, P + R) as labels of their response tokens alone (the prompt's columns and
    the padding after a stop token IGNORE_INDEX, so no pad meets the head), for the model's
    labelled log-probs. Column P - 1 + t of what it returns, (B, P + R - 1), is response token t
    (0 at a pad): `[:, n_prompt - 1:]` gives the (B, R) response part."""
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :n_prompt] = IGNORE_INDEX
    return labels


def per_token_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef: float, estimator: str = "k1"):
    """Reward at every response token: -kl_coef * KL_t, plus the sequence's score on its last
    token (Ziegler et al. 2019, eq. 2; InstructGPT, eq. 2). KL_t estimates KL(pi || pi_ref) from
    the sampled token: k1 = log pi - log pi_ref (unbiased), or k3 = (r - 1) - log r with
    r = pi_ref / pi (unbiased and never negative; Schulman 2020, "Approximating KL divergence").
    Returns rewards and KL_t, each (B, R), zero outside the response.

    Both estimate KL's value alike, but a reward is a fixed number that the policy gradient
    multiplies by grad log pi, and only k1 then gives KL's gradient: E_pi[k1 grad log pi] =
    grad KL(pi || pi_ref), while E_pi[k3 grad log pi] = grad KL(pi || pi_ref) - grad KL(pi_ref || pi)
    at each token's state, since E_pi[(r - 1) grad log pi] = -grad KL(pi_ref || pi). So k3 in the
    reward regularises towards something other than the KL it reports (Shah et al. 2025, "A Comedy
    of Estimators", arXiv:2512.21852; Liu et al. 2025, "Rethinking KL Regularization in RLHF",
    arXiv:2510.01555); k1, the default, is the principled reward."""
    kl = logprobs - ref_logprobs if estimator == "k1" else k3_kl(logprobs, ref_logprobs)
    kl = kl * response_mask
    rewards = -kl_coef * kl  # R(x, y) = r(x, y) - beta log(pi / pi_ref): Ziegler et al. 2019, eq. 2
    last = response_mask.sum(1).long() - 1  # every response has at least one token
    rewards[torch.arange(len(rewards)), last] += scores
    return rewards, kl


def shaped_scores(raw_scores: torch.Tensor, ended: torch.Tensor, mean: float, std: float,
                  missing_eos_penalty: float) -> torch.Tensor:
    """Step 2's scores (B,): the raw scores normalised by the SFT policy's mean and std, less
    missing_eos_penalty for each response that never emitted a stop token (ended False), so a
    policy cannot gain by rambling to max_new_tokens (TRL's missing_eos_penalty)."""
    return (raw_scores - mean) / std - missing_eos_penalty * (~ended).float()


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: move kl_coef so the policy's KL tracks a target, by a
    proportional error clipped to +-20%, scaled by the samples seen over a horizon."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


def gae(rewards, values, response_mask, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over left-aligned,
    variable-length responses; each (B, R). Past a response's last token the episode has ended:
    the next value there is 0 and no advantage flows back. Returns (advantages, returns), with
    returns = advantages + values the critic's targets."""
    B, R = rewards.shape
    mask = response_mask.float()
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros(B, device=rewards.device)
    zeros = torch.zeros(B, device=rewards.device)
    for t in reversed(range(R)):
        next_mask, next_value = (mask[:, t + 1], values[:, t + 1]) if t + 1 < R else (zeros, zeros)
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]  # TD residual delta_t
        # A_t = delta_t + gamma lam A_{t+1}: eq. 16 as a recursion
        next_advantage = delta + gamma * lam * next_mask * next_advantage
        advantages[:, t] = next_advantage
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def masked_whiten(x, mask, all_reduce=None):
    """(x - mean) / std over the masked entries, where mean and the unbiased variance are taken
    over every process's entries (all_reduce sums a tensor across ranks), so whitening does not
    depend on how the batch is split. Zero outside the mask."""
    mask = mask.float()
    sums = torch.stack([(x * mask).sum(), mask.sum()])
    sums = all_reduce(sums) if all_reduce else sums
    mean = sums[0] / sums[1]
    sq = ((x - mean) ** 2 * mask).sum()
    sq = all_reduce(sq) if all_reduce else sq
    var = sq / (sums[1] - 1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def group_advantages(rewards: torch.Tensor, k: int, estimator: str) -> torch.Tensor:
    """Critic-free advantages of (B,) sequence rewards, B = groups of k samples of one prompt, each
    group's rows consecutive. Returns (B,), one advantage for every token of the sequence.

    rloo  r_i - mean_{j != i} r_j: REINFORCE with the leave-one-out baseline (Kool et al. 2019;
          Ahmadian et al. 2024, eq. 6), unbiased because the baseline does not see r_i.
    grpo  (r_i - mean(r)) / std(r) over the group (Shao et al. 2024, DeepSeekMath, eq. 3's
          outcome-supervision advantage), with std the unbiased spread plus 1e-4 as TRL adds, so a
          group whose rewards are all equal gets zero advantage."""
    r = rewards.view(-1, k)  # (groups, k)
    if estimator == "rloo":
        advantages = r - (r.sum(1, keepdim=True) - r) / (k - 1)
    elif estimator == "grpo":
        advantages = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
    else:
        raise ValueError(f"unknown group estimator {estimator!r}")
    return advantages.flatten()


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from the sampled token, k3 = r - log r - 1 with
    r = pi_ref / pi (Schulman 2020; GRPO's KL term, DeepSeekMath eq. 4): unbiased, never negative,
    and differentiable in pi, so GRPO puts it in the loss rather than in the reward. Differentiated
    in the loss on the policy's own samples, its expected gradient E_pi[(1 - r) grad log pi] is that
    of KL(pi_ref || pi), which agrees with KL(pi || pi_ref)'s only to first order near pi_ref (Tang &
    Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL", arXiv:2506.09477)."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def loss_weights(response_mask: torch.Tensor, average: str) -> tuple[torch.Tensor, torch.Tensor]:
    """How a minibatch's per-token losses are averaged: each response token's weight (B, R), and
    the count (a 0-d tensor) to divide the weighted sum by (the caller sums it over ranks first).

    token     weight 1, count the response tokens: every token counts alike, as in TRL's default
              loss_type "dapo" (Yu et al. 2025, DAPO); Liu et al. 2025 (Dr. GRPO) show that the
              1/|o_i| below gives a long response's tokens less weight each, a length bias.
    sequence  weight 1/|o_i| on response i's tokens, count the responses: each response's token
              mean, then the mean over responses (DeepSeekMath eq. 3)."""
    if average == "token":
        return response_mask.float(), response_mask.sum()
    lengths = response_mask.sum(1, keepdim=True)  # (B, 1): |o_i|
    # 1/G sum_i 1/|o_i| sum_t: Shao et al. 2024, DeepSeekMath eq. 3
    return response_mask / lengths.clamp(min=1), (lengths > 0).sum()


def sequence_ratio_losses(logprobs, old_logprobs, advantages, response_mask, cliprange: float) -> dict:
    """RLOO's clipped surrogate with the whole response as one action, as its paper (Ahmadian et
    al. 2024) and TRL's RLOOTrainer take it: one ratio a response, exp of its summed log-prob
    change, clipped per response; sums over responses (divide by their number). logprobs,
    old_logprobs and response_mask (B, R); advantages (B, R), one value a response (its first
    token's is read). At ratio 1 its gradient is |o_i| times the per-token form's with
    --loss_average sequence, and off-policy it clips whole responses, not tokens."""
    mask = response_mask.float()
    log_ratio = ((logprobs - old_logprobs) * mask).sum(1)  # (B,)
    ratio = log_ratio.exp()
    advantage = advantages[:, 0]
    pg_unclipped = -advantage * ratio
    pg_clipped = -advantage * ratio.clamp(1 - cliprange, 1 + cliprange)
    real = (mask.sum(1) > 0).float()  # an empty response is no action
    return {"policy_loss": (torch.max(pg_unclipped, pg_clipped) * real).sum(),
            "approxkl": (0.5 * log_ratio.detach() ** 2 * real).sum(),
            "clipfrac": ((pg_clipped > pg_unclipped).float().detach() * real).sum(),
            "ratio": (ratio.detach() * real).sum()}


def ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, weights,
               cliprange: float, cliprange_value: float) -> dict[str, torch.Tensor]:
    """Clipped surrogate policy loss (Schulman et al. 2017, eq. 7) and clipped value loss, per
    token, and the statistics TRL logs; every entry is a sum over the response tokens, each
    weighted by `weights`: the 0/1 response mask (divide by the number of tokens for means) or
    loss_weights' weights. All inputs (B, R); values None (RLOO, GRPO: no critic) leaves the
    value terms out."""
    mask = weights.float()
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    # L^CLIP (Schulman et al. 2017, eq. 7) as a loss: max of the negated terms = min of the objectives
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    pg_losses = torch.max(pg_unclipped, pg_clipped)
    sums = {
        "policy_loss": (pg_losses * mask).sum(),
        "approxkl": (0.5 * log_ratio.detach() ** 2 * mask).sum(),
        "clipfrac": ((pg_clipped > pg_unclipped).float().detach() * mask).sum(),
        "ratio": (ratio.detach() * mask).sum(),
    }
    if values is None:
        return sums
    # value clipping around the rollout's values (OpenAI baselines' ppo2; "The 37 Implementation
    # Details of PPO", Huang et al. 2022, detail 9)
    values_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_unclipped, vf_clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    vf_losses = 0.5 * torch.max(vf_unclipped, vf_clipped)
    return {**sums, "value_loss": (vf_losses * mask).sum(),
            "vf_clipfrac": ((vf_clipped > vf_unclipped).float().detach() * mask).sum()}
