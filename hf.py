"""
Hugging Face model folders in and out: config.json, safetensors weights (one file or a sharded
index) and the tokenizer, read into this project's GPT and Tokenizer and written back, so that a
downloaded SmolLM2, Qwen2.5, TinyLlama, Mistral or GPT-2 folder trains here and a trained model
loads in transformers. Nothing here downloads: fetch a folder yourself (docs/real-models.md).

Weights map one to one onto model.py's modules, except that the separate query, key and value
projections are concatenated into one `c_attn` matrix, the gate and up projections of SwiGLU into
one `c_fc`, and GPT-2's Conv1D weights (stored input-major) are transposed.

Every model config read from a file is checked here, a checkpoint's model_config too
(check_config): model.py's GPTConfig trusts the code that builds it.

LoRA adapters go out and come in as PEFT's adapter folders (adapter_config.json and
adapter_model.safetensors, what PeftModel.from_pretrained reads onto its base model): an adapter
folder loads as its base with the adapter merged.
"""
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping

import torch

from files import DataError, write_atomic
from lora import LoRALinear, attach_lora, family_targets, merge_lora
from model import GPT, GPTConfig
from reward_model import RewardModel
from tokenizer import Tokenizer

# Llama and its descendants, a row a family: the GPTConfig fields every folder of it has (the rest are read from
# its config.json by config_from_hf), and the norms of its blocks, this project's module: the family's name
_PRE_NORMS = dict(ln_1="input_layernorm", ln_2="post_attention_layernorm")
FAMILIES = {
    "llama": dict(fields={}, norms=_PRE_NORMS),
    "mistral": dict(fields={}, norms=_PRE_NORMS),  # sliding windows in every layer
    "qwen2": dict(fields=dict(qkv_bias=True), norms=_PRE_NORMS),
    "qwen3": dict(fields=dict(qk_norm="head"), norms=_PRE_NORMS),
    "smollm3": dict(fields={}, norms=_PRE_NORMS),  # rope_layers: layers without positions
    "phi3": dict(fields={}, norms=_PRE_NORMS),  # fused q/k/v and gate/up weights; rotary_dim: a partial rotary
    "olmo2": dict(fields=dict(qk_norm="projection", norm_after=True, norm_before=False),
                  norms=dict(ln_attn_out="post_attention_layernorm", ln_mlp_out="post_feedforward_layernorm")),
    "gemma3_text": dict(fields=dict(qk_norm="head", norm_before=True, norm_after=True, norm_offset=True,
                                    embed_scale=True, mlp="geglu"),
                        norms=dict(ln_1="input_layernorm", ln_attn_out="post_attention_layernorm",
                                   ln_2="pre_feedforward_layernorm", ln_mlp_out="post_feedforward_layernorm")),
}
# config.json model_type values this file reads
SUPPORTED = (*FAMILIES, "gpt2")
# the fields of a "llama3" rope scaling, in the order model.GPTConfig.rope_scaling holds them
LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# A downloaded folder is untrusted data: each file is read up to a bound far above real ones, so a
# huge or endless file (a link to /dev/zero) is one error line instead of all the memory there is.
# config, tokenizer_config, generation_config, the shard index: kilobytes in real folders
MAX_JSON_BYTES = 16 << 20
MAX_TOKENIZER_BYTES = 64 << 20  # tokenizer.json or .model: Gemma 3's 262k-token tokenizer.json is about 33 MB
MAX_TEMPLATE_BYTES = 1 << 20  # chat_template.jinja: real templates are a few kilobytes


def _read_bounded(path: str, limit: int, bound: str) -> bytes:
    """A folder file's bytes, refused past `limit` (the module constant named `bound`) before
    more than that is read, and refused where it links out of its folder (_linked_inside)."""
    _linked_inside(path, os.path.dirname(path))
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise DataError(f"{path}: more than {limit} bytes (hf.{bound}), far beyond any real model "
                        "folder's file")
    return data


def _read_text(path: str, limit: int, bound: str) -> str:
    try:
        return _read_bounded(path, limit, bound).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_json(path: str, required: bool = True) -> dict:
    if not os.path.isfile(path):
        if required:
            raise DataError(f"{path}: no such file (a Hugging Face model folder has a config.json)")
        return {}
    text = _read_text(path, MAX_JSON_BYTES, "MAX_JSON_BYTES")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # bad JSON, an integer of 4300+ digits, deep nesting
        raise DataError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a JSON object but {_brief(data)}")
    return data


def _brief(value, limit: int = 60) -> str:
    """repr(value), cut short: untrusted data in a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -----------------------------------------------------------------------------
# A config read from a file, checked: config.json's, or a checkpoint's model_config

# Upper bounds on a configuration's sizes, far above any published model's (Llama-3.1-405B: 126
# layers, n_embd 16384, 128256 tokens; Qwen2.5-1M: 1010000 positions): a checkpoint or config.json
# is untrusted data, and a size no model has is refused before anything is built from it
MAX_SIZE = dict(vocab_size=2**24, block_size=2**22, n_layer=1024, n_head=2**12, n_kv_head=2**12, n_embd=2**16,
                head_dim=2**12, intermediate_size=2**18)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GPTConfig)}


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_config(fields: dict) -> GPTConfig:
    """The GPTConfig of keyword arguments read from a file (a checkpoint's model_config, or what
    config_from_hf makes of a config.json), every value checked before anything is built of them:
    a ValueError naming the field, for what would otherwise crash later or build without bound.
    Anything but a mapping of GPTConfig's fields meets GPTConfig's own TypeError."""
    if not (isinstance(fields, Mapping) and set(fields) <= set(_DEFAULTS)):
        return GPTConfig(**fields)  # its TypeError: not a mapping, or a field it does not have
    values = {**_DEFAULTS, **fields}
    for name, top in MAX_SIZE.items():
        value = values[name]
        if not (value is None and name in ("n_kv_head", "head_dim", "intermediate_size")
                or is_int(value) and 1 <= value <= top):
            raise ValueError(f"{name} must be an integer from 1 to {top}, got {value!r}")
    config = GPTConfig(**fields)  # refuses a head split its defaults cannot be filled in from
    if config.pos == "rope" and config.head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary positions, got {config.head_dim}")
    for name in ("norm_eps", "rope_theta", "attn_scale", "rope_local_theta"):
        value = getattr(config, name)
        optional = value is None and name in ("attn_scale", "rope_local_theta")
        if not (optional or is_real(value) and 0 < value < math.inf):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    windows = config.layer_windows
    if windows is not None and not (isinstance(windows, (list, tuple)) and len(windows) == config.n_layer
                                    and all(is_int(w) and 0 <= w <= MAX_SIZE["block_size"] for w in windows)):
        raise ValueError(f"layer_windows must hold a window in tokens (0: none) for each of the {config.n_layer} "
                         f"layers, got {_brief(windows)}")
    if config.rotary_dim is not None and not (is_int(config.rotary_dim) and config.rotary_dim % 2 == 0
                                              and 2 <= config.rotary_dim <= config.head_dim):
        raise ValueError(f"rotary_dim must be an even number of dims from 2 to head_dim ({config.head_dim}), "
                         f"got {config.rotary_dim!r}")
    layers = config.rope_layers
    if layers is not None and not (isinstance(layers, (list, tuple)) and len(layers) == config.n_layer
                                   and all(v in (0, 1) and not isinstance(v, float) for v in layers)):
        raise ValueError(f"rope_layers must hold a 0 or 1 for each of the {config.n_layer} layers, got {layers!r}")
    scaling = config.rope_scaling
    if scaling is not None and not (
            isinstance(scaling, (list, tuple)) and len(scaling) == 4 and all(is_real(v) for v in scaling)
            and all(0 < v < math.inf for v in scaling) and scaling[0] >= 1 and scaling[1] < scaling[2]
            and is_int(scaling[3])):
        raise ValueError("rope_scaling must be (factor >= 1, low_freq_factor, high_freq_factor above it, an "
                         f"original context in tokens), positive numbers, got {scaling!r}")
    if not (is_real(config.dropout) and 0 <= config.dropout < 1):
        raise ValueError(f"dropout must be a number from 0 to below 1, got {config.dropout!r}")
    for name in ("bias", "qkv_bias", "norm_after", "norm_before", "norm_offset", "embed_scale", "tie_embeddings"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(config, name)!r}")
    for name, choices in (("family", (None, *SUPPORTED)), ("qk_norm", (None, "head", "projection")),
                          ("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "gelu_tanh", "swiglu", "geglu")),
                          ("pos", ("learned", "rope"))):
        if getattr(config, name) not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {getattr(config, name)!r}")
    return config


# -----------------------------------------------------------------------------
# config.json -> GPTConfig


def _size(ours: str):
    return (lambda v: is_int(v) and 1 <= v <= MAX_SIZE[ours]), f"an integer from 1 to {MAX_SIZE[ours]}"


_POSITIVE = (lambda v: is_real(v) and 0 < v < math.inf), "a positive finite number"
_FLAG = (lambda v: isinstance(v, bool)), "true or false"


def config_from_hf(hf: dict, where: str) -> GPTConfig:
    """The GPTConfig of a transformers config.json (model_type llama, mistral, qwen2 or gpt2). The
    file is untrusted: every value is checked (type, range, consistency) with one line naming it."""
    model_type = hf.get("model_type")
    if model_type == "gemma3":
        raise DataError(f"{where}: model_type 'gemma3' is Gemma 3's image-and-text model (4B and up), whose text "
                        "tower is not read here (its long-context layers scale rotary positions linearly); "
                        "gemma-3-270m and gemma-3-1b are text models (gemma3_text) and load")
    if model_type not in SUPPORTED:
        raise DataError(f"{where}: model_type {_brief(model_type)} is not supported "
                        f"(supported: {', '.join(SUPPORTED)})")

    def check(name, value, want):
        ok, description = want
        if not ok(value):
            raise DataError(f"{where}: field {name!r}: {_brief(value)} is not {description}")
        return value

    def field(name, default=KeyError, want=None):
        if hf.get(name) is None:
            if default is KeyError:
                raise DataError(f"{where}: missing field {name!r}")
            return default
        return check(name, hf[name], want) if want else hf[name]

    def unsupported(what):
        raise DataError(f"{where}: {what} is not supported")

    gpt2 = model_type == "gpt2"
    names = dict(vocab_size="vocab_size", block_size="n_positions", n_layer="n_layer", n_head="n_head",
                 n_embd="n_embd", intermediate_size="n_inner") if gpt2 else dict(
        vocab_size="vocab_size", block_size="max_position_embeddings", n_layer="num_hidden_layers",
        n_head="num_attention_heads", n_embd="hidden_size", n_kv_head="num_key_value_heads",
        head_dim="head_dim", intermediate_size="intermediate_size")
    optional = ("n_kv_head", "head_dim") + (("intermediate_size",) if gpt2 else ())
    sizes = {ours: field(theirs, None if ours in optional else KeyError, _size(ours))
             for ours, theirs in names.items()}
    n_embd, n_head, n_kv_head, head_dim = (sizes.get(k)
                                           for k in ("n_embd", "n_head", "n_kv_head", "head_dim"))
    if head_dim is None and n_embd % n_head:
        raise DataError(f"{where}: field {names['n_embd']!r}: {n_embd} is not a multiple of "
                        f"{names['n_head']} ({n_head}), and there is no head_dim")
    if n_kv_head is not None and n_head % n_kv_head:
        raise DataError(f"{where}: field 'num_key_value_heads': {n_kv_head} does not divide "
                        f"num_attention_heads ({n_head})")

    if gpt2:
        act = field("activation_function", "gelu_new")
        mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(
            act) if isinstance(act, str) else None
        if mlp is None:
            unsupported(f"activation_function {_brief(act)}")
        if (not field("scale_attn_weights", True, _FLAG)
                or field("scale_attn_by_inverse_layer_idx", False, _FLAG)):
            unsupported("attention scaling other than 1/sqrt(head_dim)")
        return check_config(dict(
            **sizes, family="gpt2", bias=True, norm="layernorm", norm_eps=field("layer_norm_epsilon", 1e-5, _POSITIVE),
            mlp=mlp, pos="learned", tie_embeddings=field("tie_word_embeddings", True, _FLAG)))

    family, gemma = FAMILIES[model_type], model_type == "gemma3_text"
    act_name, act = ("hidden_activation", "gelu_pytorch_tanh") if gemma else ("hidden_act", "silu")
    if field(act_name, act) != act:
        unsupported(f"{act_name} {_brief(hf[act_name])}")
    biases = field("attention_bias", False, _FLAG) or field("mlp_bias", False, _FLAG)
    if model_type not in ("mistral", "qwen2") and biases:
        unsupported(f"attention_bias or mlp_bias in a {model_type} config")
    if gemma:  # Gemma 3 configs name what Gemma 2 used and Gemma 3 leaves off: each is refused where set
        for name in ("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention"):
            if hf.get(name):
                unsupported(f"{name} {_brief(hf[name])}")
        head_dim = sizes["head_dim"] = head_dim or 256  # transformers' default for Gemma 3
    head_size = head_dim or n_embd // n_head
    if head_size % 2:
        raise DataError(f"{where}: field {'head_dim' if head_dim else 'hidden_size'!r}: rotary positions "
                        f"need an even head size, not {head_size}")
    # rotary settings: transformers 5 writes rope_parameters, older versions rope_theta and rope_scaling;
    # Gemma 3's rope_parameters hold one for each kind of layer
    objects = ((lambda v: isinstance(v, dict)), "a JSON object")
    rope = {**field("rope_scaling", {}, objects), **field("rope_parameters", {}, objects)}
    local_rope = {"rope_theta": field("rope_local_base_freq", 10000.0, _POSITIVE)} if gemma else {}
    if gemma and ("full_attention" in rope or "sliding_attention" in rope):
        local_rope = check("rope_parameters.sliding_attention", rope.get("sliding_attention", local_rope), objects)
        rope = check("rope_parameters.full_attention", rope.get("full_attention", {}), objects)
    for kind in (rope, local_rope):
        rope_type = kind.get("rope_type", kind.get("type", "default"))
        if rope_type not in ("default", "llama3") or gemma and rope_type != "default":
            unsupported(f"rope scaling {_brief(rope_type)}")
    # Phi-3 and Phi-4-mini rotate the first partial_rotary_factor of each head's dims (under rope_parameters
    # in transformers 5, at the top level before)
    factor = rope.get("partial_rotary_factor", field("partial_rotary_factor", 1.0, _POSITIVE))
    factor = check("partial_rotary_factor", factor, ((lambda v: is_real(v) and 0 < v <= 1), "a number in (0, 1]"))
    rotary_dim = int(head_size * factor)
    if rotary_dim % 2 or rotary_dim < 2:
        raise DataError(f"{where}: field 'partial_rotary_factor': {factor} rotates {rotary_dim} dims of each head, "
                        "not an even number")
    rope_scaling = None
    if rope.get("rope_type", rope.get("type")) == "llama3":  # Llama 3.1 and 3.2: every frequency rescaled
        wants = [_POSITIVE, _POSITIVE, _POSITIVE, _size("block_size")]
        rope_scaling = tuple(check(f"rope_scaling.{k}", rope.get(k), want) for k, want in zip(LLAMA3_ROPE, wants))
        if rope_scaling[0] < 1 or rope_scaling[1] >= rope_scaling[2]:
            raise DataError(f"{where}: rope scaling 'llama3' needs a factor of 1 or more and low_freq_factor "
                            f"below high_freq_factor, not {rope_scaling[:3]}")
    theta_default = 1e6 if gemma else 10000.0
    rope_theta = check("rope_theta", rope["rope_theta"], _POSITIVE) if "rope_theta" in rope else field(
        "rope_theta", theta_default, _POSITIVE)
    n = sizes["n_layer"]
    rope_layers = None
    if model_type == "smollm3":  # 1: the layer rotates queries and keys; 0: no positions (NoPE)
        interval = field("no_rope_layer_interval", 4, _size("n_layer"))
        rope_layers = field("no_rope_layers", None, (
            (lambda v: isinstance(v, list) and len(v) == n and all(x in (0, 1) for x in v)
             and not any(isinstance(x, (bool, float)) for x in v)),
            f"a 0 or 1 for each of the {n} layers"))
        rope_layers = tuple(rope_layers or [int((i + 1) % interval != 0) for i in range(n)])
    # Sliding-window attention, as transformers decides it: which layers slide (every layer of Mistral and
    # Phi-3; config.json's layer_types, else each family's default), and the window, where config.json has
    # no sliding_window, the family's default (an explicit null: no window)
    kinds = ("full_attention", "sliding_attention")
    layer_types = field("layer_types", None, ((lambda v: isinstance(v, list) and len(v) == n and all(
        t in kinds for t in v)), f"a list of {n} layer types, each {' or '.join(kinds)}"))
    slides = layer_types and [t == "sliding_attention" for t in layer_types]
    window = {"mistral": 4096, "qwen2": 4096, "qwen3": 4096, "gemma3_text": 4096}.get(model_type)
    if model_type in ("mistral", "phi3"):
        slides = [True] * n
    elif model_type in ("qwen2", "qwen3"):
        if not field("use_sliding_window", False, _FLAG):
            slides = None
        elif not slides:
            first = field("max_window_layers", 28, ((lambda v: is_int(v) and v >= 0), "a count of layers"))
            slides = [i >= first for i in range(n)]
    elif model_type == "smollm3":  # its windows are on the NoPE layers, and off in the released models
        slides = field("use_sliding_window", False, _FLAG) and (slides or [not r for r in rope_layers])
    elif gemma and not slides:  # five sliding layers, then a full one
        pattern = field("sliding_window_pattern", field("_sliding_window_pattern", 6, _size("n_layer")),
                        _size("n_layer"))
        slides = [(i + 1) % pattern != 0 for i in range(n)]
    elif not gemma:
        slides = None
    if "sliding_window" in hf:
        window = field("sliding_window", None, _size("block_size"))
    layer_windows = tuple(window if s else 0 for s in slides) if window and slides and any(slides) else None
    attn_scale = field("query_pre_attn_scalar", 256, _POSITIVE) ** -0.5 if gemma else None
    return check_config(dict(dict(
        **sizes, norm="rmsnorm", norm_eps=field("rms_norm_eps", 1e-6, _POSITIVE), mlp="swiglu", pos="rope",
        rope_theta=float(rope_theta), rope_scaling=rope_scaling, rope_layers=rope_layers,
        rotary_dim=rotary_dim if rotary_dim != head_size else None, layer_windows=layer_windows,
        rope_local_theta=float(check("rope_local_base_freq", local_rope.get("rope_theta", 1e4), _POSITIVE))
        if gemma else None,
        attn_scale=attn_scale, tie_embeddings=field("tie_word_embeddings", gemma, _FLAG), family=model_type),
        **family["fields"]))


def config_to_hf(c: GPTConfig, dtype: torch.dtype, tok: Tokenizer) -> dict:
    """A config.json for `c`: gpt2 for learned positions (the toy model included: its missing
    biases are written as zeros), else the family it has the fields of (family_of)."""
    ids = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    common = dict(vocab_size=c.vocab_size, tie_word_embeddings=c.tie_embeddings,
                  dtype=str(dtype).removeprefix("torch."), **ids)
    if c.pos == "learned":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_positions=c.block_size,
                    n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_inner=c.intermediate_size,
                    activation_function={"gelu": "gelu", "gelu_tanh": "gelu_new"}[c.mlp],
                    layer_norm_epsilon=c.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    model_type = family_of(c)
    windows = sorted(set(c.layer_windows or ()) - {0})
    every_layer = model_type in ("phi3", "mistral")  # whose configs slide every layer or none
    if len(windows) > 1 or windows and (every_layer and 0 in c.layer_windows or model_type == "olmo2"):
        raise ValueError(f"sliding windows {c.layer_windows} cannot be written as a {model_type} config.json")
    architecture = {"gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
                    "smollm3": "SmolLM3ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM"}[model_type]
    rope = dict(rope_type="default", rope_theta=c.rope_theta)
    if c.rope_scaling:
        rope = dict(rope, rope_type="llama3", **dict(zip(LLAMA3_ROPE, c.rope_scaling)))
    if model_type == "phi3":
        rope["partial_rotary_factor"] = (c.rotary_dim or c.head_dim) / c.head_dim
    if model_type == "gemma3_text":
        rope = dict(full_attention=rope, sliding_attention=dict(rope_type="default", rope_theta=c.rope_local_theta))
    sliding = {}
    if windows:
        sliding = dict(sliding_window=windows[0], use_sliding_window=True,
                       layer_types=["sliding_attention" if w else "full_attention" for w in c.layer_windows])
        if every_layer:
            sliding = dict(sliding_window=windows[0])
    elif model_type == "mistral":  # whose config slides by default
        sliding = dict(sliding_window=None)
    elif model_type == "gemma3_text":  # and Gemma 3's
        sliding = dict(sliding_window=None, layer_types=["full_attention"] * c.n_layer)
    return dict(model_type=model_type, architectures=[architecture],
                max_position_embeddings=c.block_size, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, head_dim=c.head_dim,
                hidden_size=c.n_embd, intermediate_size=c.intermediate_size, rms_norm_eps=c.norm_eps,
                rope_parameters=rope, attention_bias=False, **sliding, **common,
                **({"no_rope_layers": list(c.rope_layers)} if model_type == "smollm3" else {}),
                # transformers takes an integer query_pre_attn_scalar; every released Gemma 3 has one
                **(dict(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=round(c.attn_scale ** -2))
                   if model_type == "gemma3_text" else dict(hidden_act="silu")))


def family_of(c: GPTConfig) -> str:
    """The model_type a rotary model is written as: the one it was read as, else the family whose
    fixed fields it has (FAMILIES), Mistral for a Llama that slides, Llama where nothing else
    distinguishes it."""
    if c.family in FAMILIES:
        return c.family
    if c.rotary_dim:
        return "phi3"
    if c.rope_layers and 0 in c.rope_layers:
        return "smollm3"
    for model_type in ("gemma3_text", "olmo2", "qwen3", "qwen2"):
        if all(getattr(c, k) == v for k, v in FAMILIES[model_type]["fields"].items()):
            return model_type
    return "mistral" if c.layer_windows else "llama"


# -----------------------------------------------------------------------------
# Weight names: one table, read in both directions


def weight_table(c: GPTConfig, model_type: str, reward: bool = False) -> list[tuple[str, list[str], str]]:
    """(this project's name, the Hugging Face names it is made of, how): how is "copy", "cat"
    (concatenated along the output dimension) or "T" (GPT-2's Conv1D, stored transposed). With
    reward, a RewardModel's: the backbone without a language-model head, and transformers'
    XForSequenceClassification head, `score` (one label, no bias), as the scalar head."""
    if reward:
        rows = [("backbone." + ours, theirs, how) for ours, theirs, how in weight_table(c, model_type)
                if ours != "lm_head.weight"]
        return rows + [("head.proj.weight", ["score.weight"], "copy")]
    rows = []
    if model_type == "gpt2":
        rows += [("transformer.wte.weight", ["transformer.wte.weight"], "copy"),
                 ("transformer.wpe.weight", ["transformer.wpe.weight"], "copy"),
                 ("transformer.ln_f.weight", ["transformer.ln_f.weight"], "copy"),
                 ("transformer.ln_f.bias", ["transformer.ln_f.bias"], "copy")]
        for i in range(c.n_layer):
            p = f"transformer.h.{i}."
            for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.bias",
                         "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"):
                rows.append((p + name, [p + name], "copy"))
            for name in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
                rows.append((p + name, [p + name], "T"))
        if not c.tie_embeddings:
            rows.append(("lm_head.weight", ["lm_head.weight"], "copy"))
        return rows
    rows += [("transformer.wte.weight", ["model.embed_tokens.weight"], "copy"),
             ("transformer.ln_f.weight", ["model.norm.weight"], "copy")]
    for i in range(c.n_layer):
        p, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        fused = model_type == "phi3"  # Phi-3 stores q, k, v and gate, up fused, in this project's order
        rows += [(p + f"{ours}.weight", [hf + f"{theirs}.weight"], "copy")
                 for ours, theirs in FAMILIES[model_type]["norms"].items()]
        rows += [(p + "attn.c_attn.weight", [hf + "self_attn.qkv_proj.weight"] if fused
                  else [hf + f"self_attn.{x}_proj.weight" for x in "qkv"], "copy" if fused else "cat"),
                 (p + "attn.c_proj.weight", [hf + "self_attn.o_proj.weight"], "copy"),
                 (p + "mlp.c_fc.weight", [hf + "mlp.gate_up_proj.weight"] if fused
                  else [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"], "copy" if fused else "cat"),
                 (p + "mlp.c_proj.weight", [hf + "mlp.down_proj.weight"], "copy")]
        if c.qkv_bias:
            rows.append((p + "attn.c_attn.bias", [hf + f"self_attn.{x}_proj.bias" for x in "qkv"], "cat"))
        if c.qk_norm:
            rows += [(p + f"attn.{x}_norm.weight", [hf + f"self_attn.{x}_norm.weight"], "copy") for x in "qk"]
    if not c.tie_embeddings:
        rows.append(("lm_head.weight", ["lm_head.weight"], "copy"))
    return rows


def _hf_name(name: str, model_type: str) -> str:
    """GPT-2 checkpoints come with and without the "transformer." prefix; use one spelling."""
    if model_type == "gpt2" and not name.startswith(("transformer.", "lm_head.", "score.")):
        return "transformer." + name
    return name


def _ignored(name: str, model_type: str, c: GPTConfig, reward: bool = False) -> bool:
    """Stored tensors that are not weights: GPT-2's causal-mask buffers, Llama's rotary inv_freq,
    and a tied model's copy of the output head (any, in a reward model's folder)."""
    return (name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))
            or (name == "lm_head.weight" and (c.tie_embeddings or reward)))


class _SafetensorsFiles:
    """The tensors of a folder's model.safetensors or model.safetensors.index.json shards (or
    another `weights` name's: adapter_model), opened lazily so a tensor is read from disk only when
    it is used."""

    def __init__(self, folder: str, model_type: str, weights: str = "model"):
        from safetensors import safe_open
        index_path = os.path.join(folder, f"{weights}.safetensors.index.json")
        # transformers' choice: model.safetensors where there is one, the sharded index otherwise
        if os.path.isfile(os.path.join(folder, f"{weights}.safetensors")):
            files = [f"{weights}.safetensors"]
        elif os.path.isfile(index_path):
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise DataError(f"{index_path}: field 'weight_map' is not an object of tensor names to "
                                "shard files")
            files = sorted(set(weight_map.values()))
        else:
            raise DataError(f"{folder}: no {weights}.safetensors or {weights}.safetensors.index.json "
                            "(.bin and .pth weights are not read: they can run code when loaded)")
        self.handles, self.where = {}, {}
        for file in files:
            path = os.path.join(folder, file)
            if not os.path.isfile(path):
                raise DataError(f"{index_path}: shard {_brief(file, 300)} is missing")
            if not _inside(path, folder):  # an absolute path or ".."
                raise DataError(f"{index_path}: shard {_brief(file, 300)} lies outside the folder")
            _linked_inside(path, folder)
            try:
                handle = safe_open(path, framework="pt")
                for name in handle.keys():
                    self.where[_hf_name(name, model_type)] = (path, name)
            except Exception as e:  # safetensors raises its own error type for a bad header
                raise DataError(f"{path}: not a readable safetensors file ({e})") from None
            self.handles[path] = handle

    def header(self, name: str) -> tuple[list[int], str]:
        """A tensor's shape and dtype ("F32", "BF16", ...), from the file's header alone."""
        path, stored = self.where[name]
        part = self.handles[path].get_slice(stored)
        return part.get_shape(), part.get_dtype()

    def get(self, name: str) -> torch.Tensor:
        path, stored = self.where[name]
        try:
            return self.handles[path].get_tensor(stored)
        except Exception as e:
            raise DataError(f"{path}: tensor {stored} cannot be read, the file may be truncated "
                            f"({e})") from None


def _inside(path: str, folder: str) -> bool:
    """Whether `path`, as named, lies in `folder` (an absolute name or one with .. may not)."""
    root = os.path.abspath(folder)
    return os.path.commonpath([root, os.path.abspath(path)]) == root


def _linked_inside(path: str, folder: str) -> None:
    """The one rule for every file a folder's loader reads: a symbolic link is followed where it
    ends inside the folder, or, in a Hugging Face cache snapshot (hub/models--org--name/snapshots/
    <revision>/), inside that model's blobs/, where the cache keeps every file the snapshot links
    to. Any other link (to a file elsewhere, /dev/zero) is refused: a downloaded folder reads no
    file outside itself."""
    root = os.path.abspath(folder)
    real = os.path.realpath(path)
    allowed = [os.path.realpath(root)]
    if os.path.basename(os.path.dirname(root)) == "snapshots":
        allowed.append(os.path.realpath(os.path.join(root, "..", "..", "blobs")))
    if not any(os.path.commonpath([a, real]) == a for a in allowed):
        raise DataError(f"{path}: a link to {real}, outside the folder (only links inside it, or a "
                        "Hugging Face cache snapshot's into its blobs/, are followed)")


def load_folder(folder: str, dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer of a Hugging Face folder, in the checkpoint's dtype unless `dtype`
    is given. The model is built on the meta device and the loaded tensors are assigned to it,
    so a billion-parameter model never exists twice in memory. The folder is untrusted: its
    config.json is checked against the weight files' headers before anything is built or read."""
    return _load(folder, dtype, reward=False)


def load_reward_folder(folder: str, dtype: torch.dtype | None = None) -> tuple[RewardModel, Tokenizer]:
    """A downloaded reward model: a transformers XForSequenceClassification folder with one label,
    of any family load_folder reads, as a RewardModel that scores where transformers does (the
    last token that is not config.json's pad_token_id)."""
    return _load(folder, dtype, reward=True)


def is_reward_folder(folder: str) -> bool:
    """Whether a folder's config.json names a sequence-classification model (a reward model's)."""
    architectures = _read_json(os.path.join(folder, "config.json")).get("architectures")
    return isinstance(architectures, list) and any(
        isinstance(a, str) and a.endswith("ForSequenceClassification") for a in architectures)


def _load(folder: str, dtype: torch.dtype | None, reward: bool):
    config_path = os.path.join(folder, "config.json")
    hf = _read_json(config_path)
    config = config_from_hf(hf, config_path)
    model_type = hf["model_type"]
    pad_id = None
    if reward:
        if not is_reward_folder(folder):
            raise DataError(f"{config_path}: not a reward model (its architectures name no "
                            "...ForSequenceClassification)")
        labels = hf.get("id2label", {"0": "LABEL_0"})
        if not isinstance(labels, dict) or len(labels) != 1:
            raise DataError(f"{config_path}: field 'id2label': a reward model scores with one label, not "
                            f"{len(labels) if isinstance(labels, dict) else _brief(labels)}")
        pad_id = hf.get("pad_token_id")
        if pad_id is not None and not (is_int(pad_id) and 0 <= pad_id < config.vocab_size):
            raise DataError(f"{config_path}: field 'pad_token_id': {_brief(pad_id)} is not a token id")
    elif is_reward_folder(folder):
        raise DataError(f"{folder}: a reward model (sequence classification), not a language model")
    tok = load_tokenizer(folder, hf)
    if tok.vocab_size > config.vocab_size:
        raise DataError(f"{folder}: the tokenizer has {tok.vocab_size} tokens, more than the "
                        f"embedding's {config.vocab_size} rows")
    files = _SafetensorsFiles(folder, model_type)
    layers = {int(m[1]) for n in files.where
              if (m := re.match(r"(?:model\.layers|transformer\.h)\.(\d+)\.", n))}
    # before a model is built: config.json may claim far more layers than there are
    if config.n_layer != len(layers):
        name = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
        raise DataError(f"{config_path}: field {name!r}: {config.n_layer} layers, and the weights hold "
                        f"{len(layers)}")
    table = weight_table(config, model_type, reward)
    wanted = {n for _, names, _ in table for n in names}
    missing = sorted(n for n in wanted if n not in files.where)
    unexpected = sorted(n for n in files.where if n not in wanted and not _ignored(n, model_type, config, reward))
    if missing or unexpected:
        raise DataError(f"{folder}: weights do not match config.json: missing {missing[:8] or 'none'}"
                        f"{' ...' if len(missing) > 8 else ''}; unexpected {unexpected[:8] or 'none'}"
                        f"{' ...' if len(unexpected) > 8 else ''}")
    with torch.device("meta"):
        model = RewardModel(config, pad_id) if reward else GPT(config)
    expected = dict(model.state_dict())
    for ours, names, how in table:  # every shape and dtype, from the headers, before a tensor is read
        want = list(expected[ours].shape)
        for n in names:
            shape, stored_dtype = files.header(n)
            part = want[::-1] if how == "T" else [tensor_rows(config, n), *want[1:]] if how == "cat" else want
            if shape != part:
                raise DataError(f"{folder}: tensor {n} has shape {shape}, config.json implies {part} "
                                f"(for {ours})")
            if stored_dtype not in ("F16", "BF16", "F32", "F64"):
                raise DataError(f"{folder}: tensor {n} has dtype {stored_dtype}, not a floating-point type")
    state = {}
    for ours, names, how in table:
        parts = [files.get(n) for n in names]
        tensor = parts[0].t() if how == "T" else torch.cat(parts) if how == "cat" else parts[0]
        state[ours] = tensor.contiguous().to(dtype or tensor.dtype)
    biases = [n for n in state if n.endswith(".bias")]
    if hf.get("toy_task") is True and model_type == "gpt2" and not any(state[n].any() for n in biases):
        # the toy model as export.py wrote it, read back as its checkpoint is: without the zero biases gpt2's
        # format made it write, and initialised before its weights are put in (checkpoint._checkpointed), so a
        # seeded run draws the same numbers from it as from the checkpoint
        config = dataclasses.replace(config, bias=False)
        model = RewardModel(config, pad_id) if reward else GPT(config)
        state = {n: t for n, t in state.items() if n not in biases}
    backbone = model.backbone if reward else model
    prefix = "backbone." if reward else ""
    if reward:
        state["head.proj.bias"] = torch.zeros(1, dtype=state["head.proj.weight"].dtype)  # transformers' has none
    if config.tie_embeddings:
        state[prefix + "lm_head.weight"] = state[prefix + "transformer.wte.weight"]
    model.load_state_dict(state, assign=True)
    backbone.tie_weights()
    return model, tok


# -----------------------------------------------------------------------------
# Tokenizers


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or a dict with "content"."""
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(folder: str, hf_config: dict) -> Tokenizer:
    """The folder's tokenizer.json (read by `tokenizers`, as transformers reads it) or, when it has
    none, its sentencepiece tokenizer.model. Special ids come from tokenizer_config.json, then
    generation_config.json, then config.json. A model with no pad token pads with eos: padding is
    always masked, so its id never reaches attention or a loss."""
    tok_config = _read_json(os.path.join(folder, "tokenizer_config.json"), required=False)
    gen_config = _read_json(os.path.join(folder, "generation_config.json"), required=False)
    json_path, sp_path = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "tokenizer.model")
    if os.path.isfile(json_path):
        kind, data = "tokenizers", _read_text(json_path, MAX_TOKENIZER_BYTES, "MAX_TOKENIZER_BYTES")
        from tokenizers import Tokenizer as HFTokenizer
        try:
            backend = HFTokenizer.from_str(data)
        except Exception as e:
            raise DataError(f"{json_path}: not a readable tokenizer.json ({e})") from None
        token_to_id, n_tokens = backend.token_to_id, backend.get_vocab_size(with_added_tokens=True)
    elif os.path.isfile(sp_path):
        kind, data = "sentencepiece", _read_bounded(sp_path, MAX_TOKENIZER_BYTES, "MAX_TOKENIZER_BYTES")
        import sentencepiece as spm
        try:
            backend = spm.SentencePieceProcessor(model_proto=data)
        except Exception as e:
            raise DataError(f"{sp_path}: not a readable sentencepiece model ({e})") from None
        pieces = {backend.id_to_piece(i): i for i in range(backend.get_piece_size())}
        token_to_id, n_tokens = pieces.get, backend.get_piece_size()
    else:
        raise DataError(f"{folder}: no tokenizer.json or tokenizer.model")

    def ids(file, source, name):  # a config's token id field: an id, a list of ids or null
        value = source.get(name)
        value = value if isinstance(value, list) else [] if value is None else [value]
        for i in value:
            if not is_int(i) or not 0 <= i < n_tokens:
                raise DataError(f"{folder}/{file}: field {name!r}: {_brief(i)} is not a token id "
                                f"below {n_tokens}")
        return value

    def special(name):
        text = _token_text(tok_config.get(f"{name}_token"))
        if text is not None and not isinstance(text, str):
            raise DataError(f"{folder}/tokenizer_config.json: field '{name}_token': {_brief(text)} "
                            "is not a string")
        if text is not None and token_to_id(text) is not None:
            return token_to_id(text)
        for file, source in (("generation_config.json", gen_config), ("config.json", hf_config)):
            if found := ids(file, source, f"{name}_token_id"):
                return found[0]
        return None

    bos, eos, pad = special("bos"), special("eos"), special("pad")
    if eos is None:
        raise DataError(f"{folder}: no eos token in tokenizer_config.json, generation_config.json or "
                        "config.json")
    # transformers' generate stops at any of generation_config.json's eos ids (config.json's without one)
    file, source = (("generation_config.json", gen_config) if "eos_token_id" in gen_config
                    else ("config.json", hf_config))
    eos_ids = {eos, *ids(file, source, "eos_token_id")}
    if kind == "tokenizers":  # transformers adds bos as the tokenizer.json's post-processor says
        add_bos = bos is not None and backend.encode("a", add_special_tokens=True).ids[:1] == [bos]
    else:  # LlamaTokenizer's default
        add_bos = tok_config.get("add_bos_token", True)
        if not isinstance(add_bos, bool):
            raise DataError(f"{folder}/tokenizer_config.json: field 'add_bos_token': {_brief(add_bos)} "
                            "is not true or false")
    # the file chat_template() reads first, named in template errors
    jinja = os.path.join(folder, "chat_template.jinja")
    template_file = os.path.join(folder, "tokenizer_config.json") if not os.path.isfile(jinja) else jinja
    args, template = (kind, data, bos, eos, eos if pad is None else pad, add_bos), chat_template(folder, tok_config)
    try:
        return Tokenizer(*args, template, sorted(eos_ids), template_file)
    except DataError as e:  # its template fails the stop-token probe: refused where a run takes it (auto),
        tok = Tokenizer(*args, None, sorted(eos_ids), template_file)  # so --chat_template none still loads
        tok.template_problem = str(e)
        return tok


def chat_template(folder: str, tok_config: dict) -> str | None:
    """The folder's chat template: chat_template.jinja (as transformers 4.43+ writes it), else the
    "chat_template" of tokenizer_config.json (a string, or a list of named ones: "default")."""
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        return _read_text(path, MAX_TEMPLATE_BYTES, "MAX_TEMPLATE_BYTES")
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise DataError(f"{folder}/tokenizer_config.json: field 'chat_template': expected a Jinja string")
    return template


def tokenizer_files(tok: Tokenizer) -> dict[str, bytes | str]:
    """The files that give `tok` back to transformers' AutoTokenizer, its chat template included."""
    special = tok.special_tokens()
    config = dict(bos_token=special["bos_token"] or None, eos_token=special["eos_token"],
                  pad_token=special["pad_token"], add_bos_token=tok.add_bos, add_eos_token=False)
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    if tok.kind == "sentencepiece":
        return {"tokenizer.model": tok.data,
                "tokenizer_config.json": json.dumps(dict(tokenizer_class="LlamaTokenizer", **config),
                                                    indent=2)}
    return {"tokenizer.json": tok.data,
            "tokenizer_config.json": json.dumps(dict(tokenizer_class="PreTrainedTokenizerFast", **config),
                                                indent=2)}


# -----------------------------------------------------------------------------
# Export


def is_toy_folder(folder: str) -> bool:
    """Whether a Hugging Face folder is the toy task's model as export.py wrote it: its config.json
    records it (toy_task: true), as a stage's checkpoint does. A downloaded folder never is."""
    return _read_json(os.path.join(folder, "config.json"), required=False).get("toy_task") is True


def save_folder(model: GPT | RewardModel, tok: Tokenizer, out_dir: str, toy_task: bool = False) -> list[str]:
    """Write `model` and `tok` as a Hugging Face folder: config.json, model.safetensors, the
    tokenizer files and, for a language model, generation_config.json; a RewardModel as the
    family's XForSequenceClassification with one label (its head's bias, which transformers'
    score has not, left out: it shifts every score alike). Biases the model does not have (the toy
    GPT written as gpt2) are written as zeros, which computes the same function. Returns the files
    of an earlier model it removed from out_dir (_stale_files); other files are left alone.
    toy_task records that the model is the toy task's (is_toy_folder)."""
    c, reward = model.config, isinstance(model, RewardModel)
    dtype = next(model.parameters()).dtype
    hf_config = config_to_hf(c, dtype, tok) | ({"toy_task": True} if toy_task else {})
    model_type = hf_config["model_type"]
    if reward:  # transformers' sequence classifier reads one score at the last token that is not pad
        name = hf_config["architectures"][0].replace("LMHeadModel", "ForCausalLM")
        hf_config.update(architectures=[name.replace("ForCausalLM", "ForSequenceClassification")],
                         id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    ours = model.state_dict()
    tensors = {}
    for name, hf_names, how in weight_table(c, model_type, reward):
        w = ours.get(name)
        if w is None:  # a bias the toy model leaves out: LayerNorm's is zero, as are Linear's
            w = torch.zeros(_zero_bias_size(model, name), dtype=dtype)
        if how == "T":
            tensors[hf_names[0]] = w.t().contiguous()
        elif how == "cat":
            sizes = [tensor_rows(c, n) for n in hf_names]
            for n, part in zip(hf_names, w.split(sizes), strict=True):
                tensors[n] = part.contiguous()
        else:
            tensors[hf_names[0]] = w.contiguous()
    os.makedirs(out_dir, exist_ok=True)
    tok_files = tokenizer_files(tok)
    # before writing: an old index may name them
    stale = _stale_files(out_dir, {"model.safetensors", "config.json", "generation_config.json", *tok_files})
    _write_safetensors(tensors, os.path.join(out_dir, "model.safetensors"))
    for file in stale:  # after model.safetensors is in place, which every loader reads before an index
        os.remove(os.path.join(out_dir, file))
    write_atomic(os.path.join(out_dir, "config.json"), json.dumps(hf_config, indent=2) + "\n")
    if not reward:  # every stop id, so transformers' generate stops where ours does (at the end-of-turn token too)
        generation = dict(bos_token_id=tok.bos_id, eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id)
        write_atomic(os.path.join(out_dir, "generation_config.json"), json.dumps(generation, indent=2) + "\n")
    for file, content in tok_files.items():
        write_atomic(os.path.join(out_dir, file), content)
    return stale


def _write_safetensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Save `tensors` as `path` through a temporary file, with the mode a user's new file gets."""
    from safetensors.torch import save_file
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.detach().cpu() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    umask = os.umask(0)  # reading the umask means setting it
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600 (its own temporary file); open() gives this
    os.replace(tmp, path)


def _stale_files(folder: str, keep: set[str]) -> list[str]:
    """The files of an earlier model in `folder` that a loader would read in place of or beside
    the `keep` files written now: a sharded index (first, so that no index outlives its shards),
    the shards it names inside the folder, transformers' shard files (model-*.safetensors), and the
    model's, adapter's and tokenizer's files not in `keep` (a full model over an adapter folder,
    which transformers would read as that adapter, or the reverse)."""
    index, shards = os.path.join(folder, "model.safetensors.index.json"), []
    if os.path.isfile(index):
        try:
            weight_map = json.loads(_read_text(index, MAX_JSON_BYTES, "MAX_JSON_BYTES"))["weight_map"]
            shards = [os.path.normpath(name) for name in weight_map.values() if isinstance(name, str)]
        except Exception:  # an unreadable index goes all the same; its shards are found by name below
            pass
    shards += sorted(f for f in os.listdir(folder) if f.startswith("model-") and f.endswith(".safetensors"))
    files = ["model.safetensors.index.json", *(f for f in shards if f.endswith(".safetensors")), "model.safetensors",
             "config.json", "generation_config.json", "adapter_model.safetensors", "adapter_config.json",
             "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"]
    return list(dict.fromkeys(f for f in files if f not in keep and os.path.isfile(os.path.join(folder, f))
                              and _inside(os.path.join(folder, f), folder)))


def tensor_rows(c: GPTConfig, hf_name: str) -> int:
    """Output rows of one of the projections that model.py concatenates."""
    if "q_proj" in hf_name:
        return c.n_head * c.head_dim
    if "k_proj" in hf_name or "v_proj" in hf_name:
        return c.n_kv_head * c.head_dim
    return c.intermediate_size  # gate_proj, up_proj


def _zero_bias_size(model: GPT, name: str) -> int:
    module = model.get_submodule(name.removesuffix(".bias"))
    return module.weight.shape[0]


# -----------------------------------------------------------------------------
# LoRA adapters as PEFT folders

# PEFT's key of an adapter matrix: the base model's module under PeftModelForCausalLM's prefix
PEFT_KEY = "base_model.model.{module}.lora_{matrix}.weight"
# adapter_config.json's fields that leave the adapted model plain LoRA's W + (lora_alpha / r) B A:
# PEFT's bookkeeping, how the adapter was initialised before training, its training dropout, and
# settings of features that are off. Every other field must be off (null, false, empty): each turns
# on something this loader does not compute (use_dora, use_rslora, rank_pattern, modules_to_save, ...)
_ADAPTER_INERT = {"base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
                  "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "lora_dropout",
                  "megatron_core", "qalora_group_size", "ensure_weight_tying"}


def is_adapter_folder(path: str) -> bool:
    """Whether `path` is a PEFT adapter folder: an adapter_config.json and no config.json."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "adapter_config.json"))
            and not os.path.isfile(os.path.join(path, "config.json")))


def peft_targets(model: GPT) -> tuple[str, ...]:
    """The module names a PEFT adapter of `model` targets: its family's projections, under the
    names its Hugging Face folders give them. A ValueError for a model of no Llama-like family
    (GPT-2 fuses q, k and v in one Conv1D, c_attn: LoRA here adapts parts of it)."""
    if model.config.family not in FAMILIES:
        raise ValueError(f"PEFT adapters are read and written for the Llama-like families ({', '.join(FAMILIES)}), "
                         f"and this model is {model.config.family or 'none of them'}")
    return family_targets(model)


def peft_modules(model: GPT) -> list[tuple[str, LoRALinear, int, int, int]]:
    """Where each LoRA adapter of `model` lies in PEFT's layout, as (the Hugging Face module's
    name, its LoRALinear, the adapter's slice, rows lo:hi of that slice's B). An adapter on one
    Hugging Face projection is that module's; one over several whole projections (qkv_proj on
    Llama's separate q_proj, k_proj and v_proj) is theirs, its A shared and its B split by rows,
    the same function. A ValueError where an adapter covers part of a projection (q_proj on Phi-3's
    fused qkv_proj): PEFT adapts a module whole, with one A and one B."""
    peft_targets(model)  # refuses a family whose projections PEFT names otherwise
    c, found = model.config, []
    for ours, names, how in weight_table(c, c.family):
        lora = model.get_submodule(ours.rsplit(".", 1)[0])
        if not (ours.endswith(".weight") and isinstance(lora, LoRALinear)):
            continue
        rows = [tensor_rows(c, n) for n in names] if how == "cat" else [lora.out_features]
        for k, (start, end) in enumerate(lora.slices):
            for name, a, n in zip(names, [sum(rows[:i]) for i in range(len(rows))], rows):
                if start <= a and a + n <= end:
                    found.append((name.removesuffix(".weight"), lora, k, a - start, a + n - start))
                elif a < end and start < a + n:
                    raise ValueError(f"an adapter covers part of {name.removesuffix('.weight')}, and PEFT adapts "
                                     "a module whole, with one A and one B: Phi-3's fused qkv_proj and gate_up_proj "
                                     "take --lora_targets qkv_proj and gate_up_proj, not their parts")
    return found


def save_adapter(model: GPT, tok: Tokenizer, out_dir: str, base: str, lora: dict,
                 dtype: torch.dtype) -> list[str]:
    """Write the LoRA adapters on `model` as a PEFT adapter folder for the Hugging Face folder
    `base`: adapter_config.json and adapter_model.safetensors (which
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir) reads), and
    the run's tokenizer files, since its chat template may be one the base does not have. `lora`
    is the checkpoint's record (rank, alpha, dropout). A ValueError where PEFT cannot express
    the adapters (peft_modules); returns the files of an earlier model removed from out_dir."""
    tensors = {}
    for module, layer, k, lo, hi in peft_modules(model):  # copies: safetensors writes no shared tensors
        tensors[PEFT_KEY.format(module=module, matrix="A")] = layer.lora_A[k].detach().to(dtype, copy=True)
        tensors[PEFT_KEY.format(module=module, matrix="B")] = layer.lora_B[k][lo:hi].detach().to(dtype, copy=True)
    targets = sorted({key.split(".")[-3] for key in tensors})
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base, revision=None,
                  inference_mode=True, r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                  target_modules=targets, bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=False,
                  modules_to_save=None, init_lora_weights=True, layers_to_transform=None, layers_pattern=None,
                  rank_pattern={}, alpha_pattern={})
    os.makedirs(out_dir, exist_ok=True)
    tok_files = tokenizer_files(tok)
    stale = _stale_files(out_dir, {"adapter_model.safetensors", "adapter_config.json", *tok_files})
    _write_safetensors(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    for file in stale:
        os.remove(os.path.join(out_dir, file))
    write_atomic(os.path.join(out_dir, "adapter_config.json"), json.dumps(config, indent=2) + "\n")
    for file, content in tok_files.items():
        write_atomic(os.path.join(out_dir, file), content)
    return stale


def _check_adapter_config(adapter: dict, where: str) -> None:
    """What of adapter_config.json can be checked without the base: a plain LoRA adapter of a
    causal language model, its rank, alpha and targets of the right types (against the base:
    load_adapter_folder)."""
    def refuse(name, what):
        raise DataError(f"{where}: field {name!r}: {_brief(adapter.get(name))} {what}")

    if adapter.get("peft_type") != "LORA":
        refuse("peft_type", "is not LORA (only LoRA adapters are read)")
    if adapter.get("task_type") not in ("CAUSAL_LM", None):
        refuse("task_type", "is not CAUSAL_LM (a language model's adapter)")
    if adapter.get("bias", "none") != "none":
        refuse("bias", "is not none (trained biases are not read)")
    if not (is_int(adapter.get("r")) and adapter["r"] >= 1):
        refuse("r", "is not a positive integer")
    if not (is_real(adapter.get("lora_alpha")) and math.isfinite(adapter["lora_alpha"])):
        refuse("lora_alpha", "is not a finite number")
    targets = adapter.get("target_modules")
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        refuse("target_modules", "is not a list of module names (a regular expression is not read)")
    checked = _ADAPTER_INERT | {"peft_type", "task_type", "bias", "r", "lora_alpha", "target_modules"}
    for name, value in adapter.items():
        off = value is None or value is False or isinstance(value, (str, list, dict)) and not value
        if name not in checked and not off:
            refuse(name, "is not supported (a plain LoRA adapter is read: W + lora_alpha / r * B A on each target)")


def load_adapter_folder(folder: str, dtype: torch.dtype | None, lora_base: str = "") -> tuple[GPT, Tokenizer]:
    """A PEFT LoRA adapter folder as the model it makes: its base, `lora_base` or else the local
    folder its base_model_name_or_path names, with the adapter merged, and the adapter folder's
    tokenizer where it has one (export.py --adapter writes the run's), else the base's. The folder
    is untrusted: adapter_config.json is checked field by field, and every tensor's name, shape
    and dtype against the base from the file's header, before any adapter weight is read."""
    config_path = os.path.join(folder, "adapter_config.json")
    adapter = _read_json(config_path)
    _check_adapter_config(adapter, config_path)
    base = lora_base or adapter.get("base_model_name_or_path")
    if not (isinstance(base, str) and os.path.isfile(os.path.join(base, "config.json"))):
        raise DataError(f"{folder}: an adapter of the base model {_brief(base)}, which is not a Hugging Face model "
                        "folder here (nothing is downloaded): give the base folder with --lora_base")
    model, tok = load_folder(base, dtype)
    r, targets = adapter["r"], adapter["target_modules"]
    try:
        known = peft_targets(model)
    except ValueError as e:
        raise DataError(f"{folder}: {e}") from None
    if not set(targets) <= set(known):
        raise DataError(f"{config_path}: field 'target_modules': {_brief(targets)} are not all projections of a "
                        f"{model.config.family} model ({', '.join(known)})")
    if r > model.config.n_embd:  # a rank past every projection's smaller side adds nothing; it bounds memory
        raise DataError(f"{config_path}: field 'r': {r} is more than the base's hidden size ({model.config.n_embd})")
    modules = peft_modules(attach_lora(model, r, adapter["lora_alpha"], targets))  # one slice per target
    files = _SafetensorsFiles(folder, model.config.family, "adapter_model")
    expected = {}
    for module, layer, k, lo, hi in modules:
        expected[PEFT_KEY.format(module=module, matrix="A")] = [r, layer.in_features]
        expected[PEFT_KEY.format(module=module, matrix="B")] = [hi - lo, r]
    unexpected = sorted(files.where.keys() - expected.keys())
    if unexpected:
        raise DataError(f"{folder}: tensor {unexpected[0]} is not an adapter of target_modules on this base")
    for name, shape in expected.items():
        if name not in files.where:
            raise DataError(f"{folder}: no tensor {name} in adapter_model.safetensors")
        stored, stored_dtype = files.header(name)
        if stored != shape or stored_dtype not in ("F16", "BF16", "F32", "F64"):
            raise DataError(f"{folder}: tensor {name} has shape {stored} and dtype {stored_dtype}, the base and "
                            f"adapter_config.json imply {shape} and a floating-point type")
    with torch.no_grad():
        for module, layer, k, lo, hi in modules:
            layer.lora_A[k].copy_(files.get(PEFT_KEY.format(module=module, matrix="A")))
            layer.lora_B[k][lo:hi] = files.get(PEFT_KEY.format(module=module, matrix="B"))
    merge_lora(model)
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer.model")):
        tok = load_tokenizer(folder, _read_json(os.path.join(base, "config.json")))
        if tok.vocab_size > model.config.vocab_size:
            raise DataError(f"{folder}: the tokenizer has {tok.vocab_size} tokens, more than the base's "
                            f"{model.config.vocab_size} embeddings")
    return model, tok
