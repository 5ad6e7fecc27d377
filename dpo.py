"""
Direct Preference Optimization as pure functions: per-sequence log-probs (the labelled tokens'
log-probs the model returns, summed), the concatenated chosen/rejected forward pass, the DPO loss
and its variants, and the metrics TRL logs. On model.py alone: the loop, the reference and the data are train_dpo.py's.

DPO (Rafailov et al. 2023, eq. 7) fits the policy to preference pairs directly:
    L = -log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )
where y_w is the chosen and y_l the rejected response; beta * log(pi / pi_ref) is the implicit reward.
"""
import torch
import torch.nn.functional as F

from model import IGNORE_INDEX, concatenate_pairs

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def sequence_logps(logps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each sequence's labelled tokens.

    logps (B, T - 1), each next token's log-prob (head.token_logps, or the model called with
    labels, both 0 where the label is IGNORE_INDEX), and labels (B, T), IGNORE_INDEX on prompt
    and pad tokens. Returns (B,): the sum over labelled tokens."""
    return logps.sum(-1)


def response_lengths(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) labelled tokens of each pair, (B,) each, at least 1: the lengths IPO's
    loss divides the log-ratios by. A label on the first token, which nothing predicts, never counts."""
    return tuple((batch[f"{side}_labels"][:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
                 for side in ("chosen", "rejected"))


def concatenated_forward(model, batch: dict[str, torch.Tensor]):
    """Chosen and rejected sequences through the model in one batch of 2B rows, split after.

    batch holds chosen_/rejected_ input_ids, attention_mask and labels, all (B, T): pairs are
    padded to one length so they stack. One forward pass instead of two halves the kernel
    launches and, under DDP, keeps one autograd graph per step. The model is given the labels,
    so it computes the labelled tokens' log-probs without the (2B, T, V) logits (label_logps).
    Returns (chosen_logps, rejected_logps), each (B,)."""
    input_ids, attention_mask, labels = concatenate_pairs(batch)  # (2B, T)
    logps = sequence_logps(model(input_ids, attention_mask, labels=labels), labels)  # (2B,)
    B = batch["chosen_input_ids"].size(0)
    return logps[:B], logps[B:]


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             reference_free: bool = False, lengths: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The DPO loss and its variants for a batch of pairs; every argument tensor is (B,).

    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), the log-ratio margin.
    loss_type:
      sigmoid  DPO, -log sigmoid(beta h) (Rafailov et al. 2023, eq. 7). With label_smoothing
               eps > 0, conservative DPO: labels flipped with probability eps (Mitchell 2023),
               -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
      robust   rDPO (Chowdhury et al. 2024, "Provably Robust DPO"): unbiased under label-flip rate
               eps, (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps).
      hinge    SLiC-HF's calibration loss (Zhao et al. 2023), margin 1/beta: max(0, 1 - beta h).
      ipo      IPO's sampled loss (Azar et al. 2023): (h - 1 / (2 beta))^2, beta playing tau, with
               each log-ratio divided by its response's length (`lengths`, (chosen, rejected)
               from response_lengths), as TRL does.
    reference_free=True takes pi_ref as uniform (reference log-probs 0).
    Returns (losses, chosen_rewards, rejected_rewards), each (B,); the rewards are the implicit
    rewards beta * (log pi - log pi_ref) of the summed log-probs, detached, for every loss_type
    (TRL's IPO logs these too: only its loss is length-normalised)."""
    if reference_free:
        reference_chosen_logps = torch.zeros_like(reference_chosen_logps)
        reference_rejected_logps = torch.zeros_like(reference_rejected_logps)
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    h = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":  # DPO, Rafailov et al. 2023 eq. 7; eps > 0: conservative DPO (Mitchell 2023)
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":  # rDPO, Chowdhury et al. 2024: the unbiased loss under flip rate eps
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":  # SLiC-HF calibration loss, Zhao et al. 2023, margin 1 / beta
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":  # IPO's empirical loss, Azar et al. 2023: regress h onto 1 / (2 tau), tau = beta
        if lengths is None:
            raise ValueError("the ipo loss takes the responses' lengths (response_lengths)")
        h = chosen_logratios / lengths[0] - rejected_logratios / lengths[1]  # length-normalised, as TRL
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def dpo_metric_sums(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    """TRL's DPO metrics, as sums over the batch (divide by the number of pairs for means)."""
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": policy_chosen_logps.detach().sum(),
        "logps/rejected": policy_rejected_logps.detach().sum(),
    }


def rollout_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, scores: torch.Tensor, k: int,
                  n_prompt: int):
    """Online DPO's pairs (Guo et al. 2024): of each prompt's k sampled responses, the best-scored
    one chosen and the worst rejected, as the batch concatenated_forward reads.

    input_ids, attention_mask (B k, P + R): rollout rows, a prompt's k responses consecutive, its
    prompt left-padded to P = n_prompt columns; scores (B k,). Returns the
    batch (chosen_/rejected_ input_ids, attention_mask and labels, (B, P + R) each, labels on the
    response tokens alone) and weights (B,): 1, or 0 for a tie (every response of the prompt
    scored alike), which carries no preference and is left out of the loss, as sample.py leaves
    ties out of offline pairs."""
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :n_prompt] = IGNORE_INDEX  # the prompt is not trained on
    grouped = scores.view(-1, k)  # (B, k)
    base = torch.arange(0, len(scores), k, device=scores.device)
    chosen, rejected = base + grouped.argmax(1), base + grouped.argmin(1)  # first of equals: a tie's weight is 0
    batch = {}
    for side, rows in (("chosen", chosen), ("rejected", rejected)):
        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("labels", labels)):
            batch[f"{side}_{name}"] = t[rows]
    return batch, (grouped.max(1).values > grouped.min(1).values).float()
