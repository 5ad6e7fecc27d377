"""
Checkpoints: reading a ckpt.pt, which is data and never code.
"""
import os
import pickle
import re

import torch

from files import DataError


def load_checkpoint(path: str) -> dict:
    """A ckpt.pt as a dict of tensors and plain values. A checkpoint is data, never code:
    weights_only=True refuses anything else (unpickling another object could run code). A file
    that is not a checkpoint this project wrote is one DataError line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch fails on an empty, cut or foreign file in many ways (EOFError, RuntimeError, ...)
        refused = re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if refused:  # weights_only names the class it refused
            raise DataError(f"{path}: not a checkpoint this project wrote: it holds Python objects other than tensors "
                            f"({refused[1]}), which are never loaded, as loading them could run code") from None
        raise DataError(f"{path}: not a readable checkpoint (empty, truncated or not written by torch.save)") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)  # what the loaders read
            and isinstance(ckpt.get("tokenizer"), (dict, bytes))
            and isinstance(ckpt.get("model_config") or ckpt.get("lora"), dict)):
        raise DataError(f"{path}: not a checkpoint this project wrote (no 'model', 'tokenizer' and 'model_config' "
                        "or 'lora' in it)")
    return ckpt
