"""
The reward model of RLHF: a GPT backbone with a scalar head, trained on preference pairs with the
Bradley-Terry loss (Ouyang et al. 2022, eq. 1; Stiennon et al. 2020). PPO's critic is the same
architecture read at every position instead of the last. Pure functions and the module itself,
on model.py alone: the training loop is train_rm.py's, loading a trained one checkpoint.py's.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, GPTConfig, concatenate_pairs


class ScalarHead(nn.Module):
    """One number per position from hidden states (B, T, C) -> (B, T): the reward model's and the
    critic's head. Weights drawn with std 1/sqrt(C + 1), as in OpenAI's lm-human-preferences,
    so a new head's outputs start at about unit scale."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.proj = nn.Linear(n_embd, 1)
        torch.nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(n_embd + 1))
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, hidden):
        return self.proj(hidden).squeeze(-1)


class RewardModel(nn.Module):
    """GPT backbone + scalar head. `forward` scores a sequence at its last real token, so the
    score does not depend on padding or batching; `values` gives a scalar at every position
    (the critic's use). A downloaded reward model (hf.load_reward_folder) scores where
    transformers' XForSequenceClassification does: at the last token that is not `pad_id`, its
    config's pad_token_id, a real token or not (a text ending in that id is scored before it)."""

    def __init__(self, config: GPTConfig, pad_id: int | None = None):
        super().__init__()
        self.pad_id = pad_id
        self.backbone = GPT(config)
        if not config.tie_embeddings:
            # an untied language-model head is never used by a score: left in, it would be a
            # trainable weight without a gradient, which DDP refuses at the first step (and
            # wasted memory: 131M parameters for Llama-3's vocabulary)
            self.backbone.lm_head = None
        self.head = ScalarHead(config.n_embd)

    @property
    def config(self) -> GPTConfig:
        return self.backbone.config

    @classmethod
    def from_gpt(cls, gpt: GPT) -> "RewardModel":
        """A reward model (or critic) whose backbone starts from a trained GPT, e.g. the SFT policy."""
        model = cls(gpt.config)
        model.backbone.load_state_dict(backbone_state(gpt.state_dict(), gpt.config))
        return model

    def values(self, input_ids, attention_mask=None):
        """(B, T) scalars, one per position."""
        # a fresh tensor, not the head's squeezed view: FSDP2 warns when a unit returns a view,
        # since an in-place op on it would bypass its backward hook
        return self.head(self.backbone.hidden_states(input_ids, attention_mask)).clone()

    def forward(self, input_ids, attention_mask):
        """(B,) score of each sequence, read at its last real token (left or right padding)."""
        values = self.values(input_ids, attention_mask)  # (B, T)
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        scored = attention_mask.bool() if self.pad_id is None else input_ids != self.pad_id
        last = (scored * positions).argmax(1)  # index of the last scored token in each row
        return values[torch.arange(len(values), device=values.device), last]


def backbone_state(state: dict, config: GPTConfig) -> dict:
    """A GPT's state dict as a reward model's backbone holds it: without an untied lm_head (a
    reward model's checkpoint written before it was dropped holds one too)."""
    if config.tie_embeddings:
        return state
    return {k: v for k, v in state.items() if k.removeprefix("backbone.") != "lm_head.weight"}


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: float = 0.0, center_coef: float = 0.0) -> torch.Tensor:
    """Per-pair loss, (B,) from (B,) scores: -log sigmoid(r_chosen - r_rejected - margin), the
    negative log-likelihood of the preference under Bradley-Terry, with an optional margin the
    difference must clear (Llama 2's margin loss, Touvron et al. 2023). The loss sees only
    differences, so scores can drift; center_coef * (r_chosen + r_rejected)^2 pulls their mean
    to zero (the centering auxiliary loss of Eisenstein et al. 2023)."""
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - margin)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return losses


def rm_metric_sums(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """accuracy, margin and mean_reward, as sums over the batch (divide by the number of pairs)."""
    return {
        "accuracy": (chosen_rewards > rejected_rewards).float().sum(),
        "margin": (chosen_rewards - rejected_rewards).detach().sum(),
        "mean_reward": ((chosen_rewards + rejected_rewards) / 2).detach().sum(),
    }


def pair_scores(model: RewardModel, batch: dict[str, torch.Tensor]):
    """Scores of chosen and rejected in one forward pass of 2B rows; each (B,)."""
    input_ids, attention_mask, _ = concatenate_pairs(batch)  # (2B, T)
    scores = model(input_ids, attention_mask)  # (2B,)
    B = batch["chosen_input_ids"].size(0)
    return scores[:B], scores[B:]
