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

With --adapter, a LoRA checkpoint of a language model trained on a Hugging Face folder is written
as PEFT's adapter folder instead, adapter_config.json and adapter_model.safetensors (with the
run's tokenizer files), for that folder:

    python export.py --ckpt out/dpo_lora --adapter --out_dir out/dpo_adapter

    from peft import PeftModel                                       # elsewhere, with peft
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("BASE"), "out/dpo_adapter")

Every place that reads a model reads such a folder back as its base with the adapter merged.
"""
import os
import sys
from dataclasses import dataclass
from typing import Literal

import torch

from checkpoint import (fingerprint, is_reward_checkpoint, is_toy_model, load_checkpoint, load_gpt, load_reward_model,
                        model_file)
from files import DataError, make_out_dir
from hf import peft_modules, save_adapter, save_folder
from model import GPT
from reward_model import RewardModel
from tokenizer import Tokenizer
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
    """where a LoRA checkpoint's base model is now, if it moved since training (its files are checked); a PEFT
    adapter folder's base, where its adapter_config.json names none here"""
    adapter: bool = False
    """write a LoRA checkpoint's adapters as a PEFT adapter folder for the Hugging Face folder they were trained on,
    instead of the merged model"""


def lora_adapters(cfg: Config) -> tuple[GPT, Tokenizer, str, dict]:
    """What --adapter writes: a LoRA checkpoint's model with its adapters on, unmerged, its
    tokenizer, the Hugging Face folder of its base, and its LoRA record. One DataError line for
    any other checkpoint: a PEFT adapter holds a language model's adapters on a Hugging Face model."""
    path = model_file(cfg.ckpt)
    if is_reward_checkpoint(path):
        raise DataError(f"{path}: a reward model; --adapter writes a language model's LoRA adapters (export the "
                        "reward model without --adapter)")
    ckpt = {} if os.path.isdir(path) else load_checkpoint(path, mmap=True)
    if "lora" not in ckpt:
        raise DataError(f"{path}: not the checkpoint of a LoRA run (--lora_rank), so it holds no adapters to write; "
                        "export it without --adapter")
    model, tok = load_gpt(path, getattr(torch, cfg.dtype), cfg.lora_base, merge=False)
    lora = ckpt["lora"]  # the base load_gpt found: --lora_base where it holds the recorded files
    moved = os.path.exists(cfg.lora_base) and lora.get("fingerprint") in (None, fingerprint(cfg.lora_base))
    base = model_file(cfg.lora_base if moved else lora["base"])
    if not os.path.isdir(base):
        raise DataError(f"{path}: its adapters are on {base}, this project's checkpoint, and a PEFT adapter goes on "
                        "a Hugging Face folder; export the merged model without --adapter")
    try:
        peft_modules(model)
    except ValueError as e:
        raise DataError(f"{path}: {e}; export the merged model without --adapter") from None
    return model, tok, os.path.abspath(base), lora


def main(argv=None) -> int:
    cfg = parse_config(Config, argv, __doc__)
    if os.path.isdir(cfg.out_dir) and os.listdir(cfg.out_dir) and not cfg.overwrite:
        print(f"error: {cfg.out_dir} already holds files; give --overwrite to replace them", file=sys.stderr)
        return 2
    created = not os.path.isdir(cfg.out_dir)
    try:
        make_out_dir(cfg.out_dir)  # first: a folder that cannot be written is said before a model is read
        if cfg.adapter:
            model, tok, base, lora = lora_adapters(cfg)
        elif is_reward_checkpoint(cfg.ckpt):
            model, tok = load_reward_model(cfg.ckpt, cfg.lora_base)
            model = model.to(getattr(torch, cfg.dtype))
        else:
            model, tok = load_gpt(cfg.ckpt, dtype=getattr(torch, cfg.dtype), lora_base=cfg.lora_base)
    except DataError as e:
        if created and os.path.isdir(cfg.out_dir) and not os.listdir(cfg.out_dir):  # bad input leaves nothing
            os.rmdir(cfg.out_dir)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.adapter:
        removed = save_adapter(model, tok, cfg.out_dir, base, lora, getattr(torch, cfg.dtype))
    else:
        removed = save_folder(model, tok, cfg.out_dir, toy_task=is_toy_model(cfg.ckpt))
    if removed:
        print(f"removed the earlier model's {', '.join(removed)} from {cfg.out_dir}")
    if cfg.adapter:
        n = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
        print(f"wrote {cfg.out_dir}: a PEFT LoRA adapter of rank {lora['rank']} ({n / 1e6:.2f}M parameters, "
              f"{cfg.dtype}) for {base}")
        return 0
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
