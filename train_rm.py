"""
Reward model: the SFT backbone plus a scalar head, trained with the Bradley-Terry loss on
preference pairs. The first half of RLHF; train_ppo.py optimises the policy against it.

    python train_rm.py                                 # on out/pairs from sample.py --pairs
    torchrun --nproc_per_node 2 train_rm.py            # the same run on 2 processes
    python train_rm.py --train_file hh_train.jsonl --val_file hh_test.jsonl --gold_eval false

InstructGPT (Ouyang et al. 2022) trained its reward model for a single epoch, since it overfits
fast; the defaults here make about two passes over the toy pairs.
"""
import sys
from dataclasses import dataclass

import torch

from data import gold_reward, take
from reward_model import RewardModel, bradley_terry_loss, pair_scores, rm_metric_sums
from train_utils import (Dist, PairsConfig, Run, all_reduce_sum, fit, load_gpt, load_pairs, make_optimizer,
                         run_script, seed_everything)


@dataclass
class Config(PairsConfig):
    out_dir: str = "out/rm"
    """folder for config.json, metrics.jsonl and ckpt.pt"""
    # loss
    margin: float = 0.0
    """the score difference the chosen response must clear"""
    center_coef: float = 0.0
    """weight of the (r_chosen + r_rejected)^2 term that keeps scores centred at 0"""
    gold_eval: bool = True
    """also report how often the model orders held-out pairs as the toy gold reward does"""
    # learning rate for the toy task
    lr: float = 3e-4
    """peak learning rate"""
    min_lr: float = 3e-5
    """learning rate at the end of the cosine decay"""


def gold_order(pairs) -> torch.Tensor:
    """(N,) +1 where the gold reward prefers the chosen response, -1 the rejected, 0 a tie."""
    return torch.tensor([float((gold_reward(p.chosen, p.prompt) > gold_reward(p.rejected, p.prompt)) -
                               (gold_reward(p.chosen, p.prompt) < gold_reward(p.rejected, p.prompt)))
                         for p in pairs])


def train(cfg: Config, dist: Dist) -> dict:
    seed_everything(cfg.seed, dist)
    run = Run(cfg, dist)
    # 1. data, validated before anything is written
    sft, tok, _ = load_gpt(cfg.sft_ckpt)
    train_data, val_pairs, val_data = load_pairs(cfg, tok)
    if cfg.gold_eval:
        val_data["gold_order"] = gold_order(val_pairs)

    # 2. the reward model: SFT backbone, new scalar head
    model = RewardModel.from_gpt(sft).to(dist.device)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), dist.device)
    if dist.master:
        print(f"reward model: {model.backbone.num_params() / 1e6:.2f}M parameters, "
              f"{len(train_data['chosen_input_ids'])} training pairs, {len(val_pairs)} held-out, "
              f"{dist.world_size} process(es) on {dist.device}")

    # 3. the Bradley-Terry loss of a batch of pairs, chosen and rejected in one forward pass
    def loss_fn(model, batch):
        chosen, rejected = pair_scores(model, batch)
        losses = bradley_terry_loss(chosen, rejected, cfg.margin, cfg.center_coef)
        return losses.sum(), rm_metric_sums(chosen, rejected)

    # 4. held-out metrics, sharded over ranks, and agreement with the gold reward's order
    @torch.no_grad()
    def evaluate(model, ctx):
        model.eval()
        sums = torch.zeros(6, device=dist.device)  # loss, accuracy, margin, mean_reward, gold agreements, gold pairs
        for idx in torch.arange(len(val_pairs))[dist.rank::dist.world_size].split(cfg.batch_size):
            batch = {k: v.to(dist.device) for k, v in take(val_data, idx).items()}
            with ctx:
                chosen, rejected = pair_scores(model, batch)
            losses = bradley_terry_loss(chosen.float(), rejected.float(), cfg.margin, cfg.center_coef)
            metrics = rm_metric_sums(chosen.float(), rejected.float())
            agree = torch.zeros(2, device=dist.device)
            if cfg.gold_eval:
                order = batch["gold_order"]
                agree = torch.stack([((chosen - rejected).sign() == order)[order != 0].float().sum(),
                                     (order != 0).float().sum()])
            sums += torch.cat([torch.stack([losses.sum(), *metrics.values()]), agree])
        sums = all_reduce_sum(sums, dist)
        names = ["eval/loss", "eval/accuracy", "eval/margin", "eval/mean_reward"]
        result = dict(zip(names, (sums[:4] / len(val_pairs)).tolist()))
        if cfg.gold_eval:
            result["eval/gold_agreement"] = (sums[4] / sums[5].clamp(min=1)).item()
        model.train()
        return result, []

    return fit(cfg, dist, run, model, optimizer, tok, train_data, loss_fn, lambda data, idx: len(idx),
               evaluate, "rm")


def main(argv=None) -> int:
    return run_script(Config, train, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
