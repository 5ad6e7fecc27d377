"""
Write a checkpoint as a Hugging Face model folder, so a trained model is evaluated or served with
the tools people already use:

    python export.py --ckpt out/dpo/ckpt.pt --out_dir out/dpo_hf

    from transformers import AutoModelForCausalLM, AutoTokenizer     # elsewhere, with transformers
    model = AutoModelForCausalLM.from_pretrained("out/dpo_hf")
    tokenizer = AutoTokenizer.from_pretrained("out/dpo_hf")

The folder holds config.json, model.safetensors, generation_config.json and the tokenizer's files.
A model with learned positions (the toy GPT, GPT-2) is written as gpt2, a rotary one as the family
it was read as (llama where it has none). A reward model (train_rm.py's checkpoint) is written as
the family's XForSequenceClassification with one label, which transformers and TRL's trainers
load: AutoModelForSequenceClassification.from_pretrained("out/rm_hf"). transformers scores a text at
its last token that is not pad_token_id, this project's reward model at its last real token: the
two agree unless a text ends in the pad id (a tokenizer padding with eos, on text that ends in eos).
transformers' LlamaTokenizer reads a sentencepiece tokenizer.model with one difference from
sentencepiece itself: it adds no extra word-boundary piece before text that already starts with a
space.
"""
import os
import sys
from dataclasses import dataclass
from typing import Literal

import torch

from checkpoint import is_reward_checkpoint, load_gpt, load_reward_model
from files import DataError, make_out_dir
from hf import save_folder
from reward_model import RewardModel
from train_utils import parse_config


@dataclass
class Config:
    ckpt: str = "out/dpo/ckpt.pt"
    """a model to export: any stage's ckpt.pt (a reward model's too), or a Hugging Face folder"""
    out_dir: str = "out/dpo_hf"
    """the folder to write"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """the weights' dtype in the folder"""
    overwrite: bool = False
    """write into an out_dir that already holds files: an earlier model's weights (a sharded index and
    its shards included) and tokenizer files are removed, so no loader reads them; other files stay"""
    lora_base: str = ""
    """where a LoRA checkpoint's base model is now, if it moved since training (its files are checked)"""


def main(argv=None) -> int:
    cfg = parse_config(Config, argv, __doc__)
    if os.path.isdir(cfg.out_dir) and os.listdir(cfg.out_dir) and not cfg.overwrite:
        print(f"error: {cfg.out_dir} already holds files; give --overwrite to replace them", file=sys.stderr)
        return 2
    try:
        make_out_dir(cfg.out_dir)  # first: a folder that cannot be written is said before a model is read
        if is_reward_checkpoint(cfg.ckpt):
            model, tok = load_reward_model(cfg.ckpt, cfg.lora_base)
            model = model.to(getattr(torch, cfg.dtype))
        else:
            model, tok = load_gpt(cfg.ckpt, dtype=getattr(torch, cfg.dtype), lora_base=cfg.lora_base)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    removed = save_folder(model, tok, cfg.out_dir)
    if removed:
        print(f"removed the earlier model's {', '.join(removed)} from {cfg.out_dir}")
    bias = float(model.head.proj.bias.detach()) if isinstance(model, RewardModel) else 0.0
    if bias:
        # Bradley-Terry sees only differences, so the bias moves by rounding alone, unless --center_coef pulls it
        print(f"note: the reward head's bias ({bias:.4g}) is not written: transformers' score "
              "has none, so the folder's scores are lower by that much, every score alike")
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {cfg.out_dir}: {n / 1e6:.2f}M parameters, {cfg.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
