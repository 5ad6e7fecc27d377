"""Hugging Face folders against transformers, the reference: each family's logits and greedy
generation, tokenizers, sharded weights, export round trips, and one-line errors for bad folders."""
import copy
import json
import math
import os
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import sample
from conftest import read_metrics, run_python
from files import DataError
from hf import config_from_hf, load_folder, save_folder

V = 400  # model vocabulary; the test tokenizers have fewer tokens
STRINGS = ["Hello world", "Café naïve résumé, déjà vu", "日本語のテキストです", "emoji 😀 and 🎉", "  leading spaces",
           "a   b    c", "", " ", "tab\tand\nnewline", "digits 12345"]
CORPUS = ["Hello world, this is a test of the tokenizer.", "Café naïve résumé — déjà vu.", "日本語のテキストです。中文也可以。",
          "emoji 😀 🎉 fine", "  leading spaces   and   repeats", "digits 12345 and 3.14", "The capital of France is Paris."]

FAMILIES = {  # tiny random configurations of each supported family
    "llama_gqa_untied": lambda: transformers.LlamaConfig(
        num_key_value_heads=2, tie_word_embeddings=False, **_LLAMA_SIZE),
    "llama_tied_rope_theta": lambda: transformers.LlamaConfig(  # SmolLM's shape of config
        num_key_value_heads=4, tie_word_embeddings=True, rope_theta=50000.0, **_LLAMA_SIZE),
    "llama3_rope_scaling": lambda: transformers.LlamaConfig(  # Llama 3.2's: llama3 frequencies, tied; its
        # wavelengths (6.3, 19.9, 62.8, 199 tokens at theta 100) fall in each of the scaling's three bands
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=100.0, **_LLAMA_SIZE,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32)),
    "mistral": lambda: transformers.MistralConfig(  # a window of 4, shorter than the tests' sequences
        num_key_value_heads=2, sliding_window=4, **_LLAMA_SIZE),
    "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **_LLAMA_SIZE),
    "qwen3": lambda: transformers.Qwen3Config(  # q/k norms; head_dim 16, not hidden_size / heads (8)
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, **_LLAMA_SIZE),
    "smollm3": lambda: transformers.SmolLM3Config(  # its second layer without positions (NoPE)
        num_key_value_heads=2, no_rope_layers=[1, 0], tie_word_embeddings=True, pad_token_id=None, **_LLAMA_SIZE),
    "olmo2": lambda: transformers.Olmo2Config(  # norms after attention and MLP, q/k norms over the projections
        num_key_value_heads=2, pad_token_id=None, **_LLAMA_SIZE),
    "phi3": lambda: transformers.Phi3Config(  # fused projections; half of each head rotates (Phi-4-mini: 3/4)
        num_key_value_heads=2, partial_rotary_factor=0.5, pad_token_id=None, **_LLAMA_SIZE),
    "gemma3": lambda: transformers.Gemma3TextConfig(  # sliding and full layers, each with its own rotary base
        **{**_LLAMA_SIZE, "num_hidden_layers": 3}, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        pad_token_id=0, sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters=dict(full_attention=dict(rope_type="default", rope_theta=1000.0),
                             sliding_attention=dict(rope_type="default", rope_theta=100.0))),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            initializer_range=0.1, bos_token_id=0, eos_token_id=0),
}
_LLAMA_SIZE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=64, initializer_range=0.1, bos_token_id=1, eos_token_id=2)


def train_bpe_tokenizer_json(folder, corpus_file, bos_template: bool):
    """A byte-level BPE tokenizer.json (GPT-2, SmolLM2 and Qwen2's kind); with bos_template its
    post-processor puts <s> before a text, as Llama-3-style tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([corpus_file], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>"],
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = dict(tokenizer_class="PreTrainedTokenizerFast", eos_token="<|endoftext|>",
                  bos_token="<s>" if bos_template else "<|endoftext|>")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)


def train_sentencepiece_model(folder, corpus_file):
    """A tokenizer.model trained with Llama-2's settings: BPE, byte fallback, digits split."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        input=corpus_file, model_prefix=os.path.join(folder, "tokenizer"), vocab_size=V, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    os.remove(os.path.join(folder, "tokenizer.vocab"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(dict(tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                       add_bos_token=True), f)


def write_model(folder, hf_config, seed=0, auto=transformers.AutoModelForCausalLM, **save_kwargs):
    """A random transformers model (an `auto` class's) saved with save_pretrained; every 1-d
    weight (norms, biases) is moved away from its initial value so that a loader that drops one
    gives different logits."""
    torch.manual_seed(seed)
    model = auto.from_config(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder, **save_kwargs)
    return model


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(CORPUS * 40) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, corpus_file):
    """name -> (folder, the transformers model saved in it), one per family; Llama folders get the
    sentencepiece tokenizer, the others a tokenizer.json (transformers 5 converts a Mistral folder's
    lone tokenizer.model differently from sentencepiece; real ones ship a tokenizer.json)."""
    out = {}
    for name, make_config in FAMILIES.items():
        folder = str(tmp_path_factory.mktemp(name))
        model = write_model(folder, make_config())
        if name.startswith("llama"):
            train_sentencepiece_model(folder, corpus_file)
        else:
            train_bpe_tokenizer_json(folder, corpus_file, bos_template=False)
        out[name] = (folder, model)
    return out


def padded_batch(pad_side: str):
    """Two sequences of 10 and 6 tokens, padded on one side: ids, mask and the positions of the
    real tokens (what transformers' generate passes; a plain forward would number pads too)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 250, (2, 10), generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    if pad_side == "left":
        mask[1, :4] = 0
    else:
        mask[1, 6:] = 0
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_logits_equal_transformers(folders, family, pad_side):
    folder, reference = folders[family]
    model, _ = load_folder(folder)
    ids, mask, positions = padded_batch(pad_side)
    with torch.no_grad():
        ours = model.eval()(ids, mask)
        theirs = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert theirs[real].abs().max() > 0.5  # the logits are not all near zero, so 1e-4 is a real bound
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_transformers(folders, family, use_cache):
    folder, reference = folders[family]
    model, tok = load_folder(folder)
    prompts = [[5, 17, 42, 99, 7, 300], [8, 21, 33]]
    ours, _ = model.generate(prompts, 16, stop_ids=tok.stop_ids, pad_id=tok.pad_id, temperature=0, use_cache=use_cache)
    ids = torch.tensor([prompts[0], [tok.pad_id] * 3 + prompts[1]])
    mask = torch.tensor([[1] * 6, [0] * 3 + [1] * 3])
    theirs = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id)[:, 6:]
    theirs = torch.nn.functional.pad(theirs, (0, 16 - theirs.size(1)), value=tok.pad_id)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_batch_gives_the_padded_batchs_logits(folders, family):
    """Three sequences (10, 3 and 6 tokens) packed into two rows: the sliding windows, q/k norms and
    rotary bases of each family see the same positions as in the padded batch."""
    model, _ = load_folder(folders[family][0])
    ids = torch.randint(3, 250, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1] * 10, [1] * 3 + [0] * 7, [0] * 4 + [1] * 6])
    with torch.no_grad():
        packed = model.eval()(ids, mask)
        model.packing = False
        padded = model(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=0)


def test_sharded_index_loads_the_same_weights(folders, tmp_path):
    folder, _ = folders["llama_gqa_untied"]
    sharded = str(tmp_path / "sharded")
    write_model(sharded, FAMILIES["llama_gqa_untied"](), max_shard_size="40KB")
    for file in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(folder, file), sharded)
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) >= 2
    whole, _ = load_folder(folder)
    split, _ = load_folder(sharded)
    for (name, a), b in zip(whole.state_dict().items(), split.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_load_keeps_the_stored_dtype_unless_asked(folders, tmp_path):
    folder, reference = folders["qwen2"]
    bf16 = str(tmp_path / "bf16")
    copy.deepcopy(reference).to(torch.bfloat16).save_pretrained(bf16)  # the shared model stays float32
    shutil.copy(os.path.join(folder, "tokenizer.json"), bf16)
    assert {p.dtype for p in load_folder(bf16)[0].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_folder(bf16, torch.float32)[0].parameters()} == {torch.float32}



@pytest.mark.parametrize("family, settings", [
    ("mistral", {}), ("mistral", dict(sliding_window=None)),
    ("qwen2", dict(use_sliding_window=True, max_window_layers=0)),  # every layer slides
    ("qwen2", dict(use_sliding_window=True, max_window_layers=1)),  # the last layer slides
    ("qwen2", dict(use_sliding_window=True, max_window_layers=2)),  # none slides
    ("qwen2", dict(use_sliding_window=False)),
    ("qwen3", dict(use_sliding_window=True, max_window_layers=1)),
    ("gemma3", dict(num_hidden_layers=7)),  # five sliding layers, a full one, a sliding one
    ("gemma3", dict(num_hidden_layers=2, sliding_window_pattern=2))])
def test_a_sliding_window_missing_from_config_json_is_transformers_default(family, settings, tmp_path):
    """A config.json without sliding_window (or layer_types) gets transformers' defaults: a window
    of 4096 in the layers that slide."""
    config = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
              "qwen3": transformers.Qwen3Config, "gemma3": transformers.Gemma3TextConfig}[family](
        **{**_LLAMA_SIZE, "max_position_embeddings": 8192, "num_key_value_heads": 2, **settings})
    config.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        hf = json.load(f)
    for key in ("sliding_window", "layer_types"):
        if settings.get(key, 0) is not None:  # an explicit null stays: it means no window
            hf.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    kinds = ["sliding_attention"] * theirs.num_hidden_layers if family == "mistral" else theirs.layer_types
    windows = tuple(theirs.sliding_window if kind == "sliding_attention" else 0 for kind in kinds)
    ours = config_from_hf(hf, "config.json")
    assert ours.layer_windows == (windows if theirs.sliding_window and any(windows) else None)
    assert ours.block_size == 8192


# -----------------------------------------------------------------------------
# Tokenizers


@pytest.mark.parametrize("bos_template", [False, True])
def test_tokenizer_json_ids_equal_transformers(corpus_file, tmp_path, bos_template):
    """transformers 5 picks the tokenizer class from config.json's model_type, and its Qwen2Tokenizer
    swaps in Qwen2's own pre-tokenizer (which real Qwen2 folders ship anyway), so this generic
    byte-level tokenizer sits in gpt2 and llama folders."""
    train_bpe_tokenizer_json(str(tmp_path), corpus_file, bos_template)
    write_model(str(tmp_path), FAMILIES["llama_gqa_untied" if bos_template else "gpt2"]())
    _, tok = load_folder(str(tmp_path))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for s in STRINGS:
        assert tok.encode(s) == reference(s, add_special_tokens=False).input_ids, s
        assert tok.encode_prompt(s) == reference(s).input_ids, s
        assert tok.decode(tok.encode(s)) == s


def test_sentencepiece_ids_equal_transformers(folders):
    """transformers 5 turns a tokenizer.model into a Metaspace tokenizer that puts no word-boundary
    piece before a text that already starts with a space; sentencepiece, which the model was
    trained with, does. Those strings are compared with sentencepiece's pieces instead."""
    folder, _ = folders["llama_gqa_untied"]
    _, tok = load_folder(folder)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    for s in STRINGS:
        if s.startswith(" "):
            assert "".join(tok.sp.id_to_piece(i) for i in tok.encode(s)).startswith("\u2581" * (len(s) - len(s.lstrip()) + 1))
        else:
            assert tok.encode(s) == reference(s, add_special_tokens=False).input_ids, s
            assert tok.encode_prompt(s) == reference(s).input_ids, s
        assert tok.decode(tok.encode(s)) == s
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # no pad token: eos pads


# -----------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip_gives_transformers_the_same_logits(folders, family, tmp_path):
    folder, reference = folders[family]
    model, tok = load_folder(folder)
    save_folder(model, tok, str(tmp_path))
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids, mask, positions = padded_batch("right")
    with torch.no_grad():
        a = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        b = exported(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf_tok("Hello world").input_ids == tok.encode_prompt("Hello world")



def test_exported_files_get_the_mode_of_a_users_new_file(folders, tmp_path):
    """model.safetensors was left 0600, the mode of safetensors' own temporary file."""
    model, tok = load_folder(folders["llama_gqa_untied"][0])
    save_folder(model, tok, str(tmp_path))
    with open(tmp_path / "probe", "w"):
        pass
    mode = lambda name: os.stat(tmp_path / name).st_mode & 0o777  # noqa: E731
    assert {name: mode(name) for name in os.listdir(tmp_path)} == dict.fromkeys(os.listdir(tmp_path), mode("probe"))


def test_toy_checkpoint_exports_to_transformers_with_the_same_logits(toy_dir, tmp_path):
    sft_dir, hf_dir = str(tmp_path / "sft"), str(tmp_path / "sft_hf")
    r = run_python("train_sft.py", f"--data_dir={toy_dir}", f"--out_dir={sft_dir}", "--device=cpu", "--max_iters=2",
                   "--eval_interval=2", "--eval_samples=0", "--print_samples=0")
    assert r.returncode == 0, r.stderr
    r = run_python("export.py", f"--ckpt={sft_dir}/ckpt.pt", f"--out_dir={hf_dir}")
    assert r.returncode == 0, r.stderr
    from checkpoint import load_gpt
    model, tok = load_gpt(f"{sft_dir}/ckpt.pt")
    text = "the plot was great . i loved the cast ."
    ids = torch.tensor([tok.encode_prompt(text)])
    exported = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), exported(input_ids=ids).logits, atol=1e-4, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(hf_dir)(text).input_ids == tok.encode_prompt(text)
    from checkpoint import is_toy_model
    assert is_toy_model(hf_dir)  # the folder records what the model is, so every script takes it as the toy model
    _edit_config(hf_dir, toy_task=None)
    assert not is_toy_model(hf_dir)  # without the record (any downloaded folder) it is not
    r = run_python("export.py", f"--ckpt={sft_dir}/ckpt.pt", f"--out_dir={hf_dir}")
    assert r.returncode == 2 and "--overwrite" in r.stderr  # an existing export is not replaced by accident


# -----------------------------------------------------------------------------
# Scripts on a folder, and bad folders


def test_sample_sft_and_dpo_run_from_a_folder(folders, toy_dir, sft_pairs, tmp_path):
    folder, _ = folders["qwen2"]
    r = run_python("sample.py", f"--ckpt={folder}", "--prompt=Hello", "--n=2", "--max_new_tokens=5", "--device=cpu")
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 2, r.stderr
    r = run_python("train_sft.py", f"--init_from={folder}", f"--train_file={toy_dir}/sft_val.jsonl", f"--out_dir={tmp_path}/sft",
                   "--device=cpu", "--max_iters=2", "--eval_interval=2", "--eval_samples=0", "--print_samples=0",
                   "--max_length=48", "--max_new_tokens=8")
    assert r.returncode == 0, r.stderr
    from checkpoint import load_gpt
    model, tok = load_gpt(f"{tmp_path}/sft/ckpt.pt")
    assert model.config.pos == "rope" and tok.kind == "tokenizers"
    _, pairs = sft_pairs
    r = run_python("train_dpo.py", f"--sft_ckpt={folder}", f"--train_file={pairs}/pairs_train.jsonl",
                   f"--val_file={pairs}/pairs_val.jsonl", f"--out_dir={tmp_path}/dpo", "--device=cpu", "--max_iters=2",
                   "--eval_interval=100", "--gold_eval=false", "--print_samples=0", "--log_interval=1", "--batch_size=8")
    assert r.returncode == 0, r.stderr
    first = read_metrics(f"{tmp_path}/dpo")[1]  # the policy starts as the reference: DPO's loss is log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margins"] == 0


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, **changes}, f)


def _edit_weights(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


BAD_FOLDERS = {  # case -> (how to spoil a good llama folder, what the one line must say)
    "no config.json": (lambda d: os.remove(f"{d}/config.json"), "config.json: no such file"),
    "unsupported model_type": (lambda d: _edit_config(d, model_type="bert"),
                               "model_type 'bert' is not supported (supported: llama, mistral, qwen2, qwen3, smollm3, phi3, olmo2, gemma3_text, gpt2)"),
    "missing tensor": (lambda d: _edit_weights(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       "missing ['model.layers.1.mlp.up_proj.weight']"),
    "unexpected tensor": (lambda d: _edit_weights(d, lambda t: t.update({"model.extra.weight": torch.zeros(2)})),
                          "unexpected ['model.extra.weight']"),
    "wrong shape": (lambda d: _edit_config(d, intermediate_size=40),
                    "tensor model.layers.0.mlp.gate_proj.weight has shape [48, 32], config.json implies [40, 32]"),
    "truncated safetensors": (lambda d: _truncate(f"{d}/model.safetensors"), "model.safetensors"),
    "tokenizer larger than the embedding": (lambda d: _edit_weights(d, lambda t: t.update(
        {k: v[:200] for k, v in t.items() if k in ("model.embed_tokens.weight", "lm_head.weight")}))
        or _edit_config(d, vocab_size=200), "the tokenizer has"),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_folder_gives_one_line_through_the_command_line(folders, tmp_path, case, capsys):
    spoil, message = BAD_FOLDERS[case]
    folder = str(tmp_path / "model")
    shutil.copytree(folders["llama_gqa_untied"][0], folder)
    spoil(folder)
    with pytest.raises(DataError):
        load_folder(folder)
    if case == "no config.json":  # once through a shell: the exit status, and no traceback
        r = run_python("sample.py", f"--ckpt={folder}", "--prompt=Hello", "--device=cpu")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        err = r.stderr
    else:
        assert sample.main([f"--ckpt={folder}", "--prompt=Hello", "--device=cpu"]) == 2
        err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_every_eos_id_of_generation_config_stops_generation_and_export_writes_them_all(folders, tmp_path):
    """generation_config.json's eos list (Llama-3 and Qwen2.5-Instruct list two) was cut to its
    first id, and export wrote one id back; transformers stops at every one of them."""
    folder = str(tmp_path / "model")
    shutil.copytree(folders["qwen2"][0], folder)
    _, reference = folders["qwen2"]
    with open(f"{folder}/generation_config.json") as f:
        generation = json.load(f)
    model, tok = load_folder(folder)
    prompts = [[5, 6, 7], [8, 9]]
    free, _ = model.generate(prompts, 12, stop_ids=[], pad_id=tok.pad_id, temperature=0)
    second = int(free[1, 2])  # a token the model emits greedily: make it a second eos
    generation["eos_token_id"] = [tok.eos_id, second]
    with open(f"{folder}/generation_config.json", "w") as f:
        json.dump(generation, f)
    model, tok = load_folder(folder)
    assert tok.eos_ids == sorted({tok.eos_id, second}) and tok.stop_ids == tok.eos_ids
    _, mask = model.generate(prompts, 12, stop_ids=tok.stop_ids, pad_id=tok.pad_id, temperature=0)
    assert mask[1].sum() <= 3
    save_folder(model, tok, str(tmp_path / "exported"))
    exported = transformers.GenerationConfig.from_pretrained(str(tmp_path / "exported"))
    assert sorted(exported.eos_token_id) == tok.stop_ids
    generation["eos_token_id"] = [tok.eos_id, 10**6]  # not a token: refused with the file and field named
    with open(f"{folder}/generation_config.json", "w") as f:
        json.dump(generation, f)
    with pytest.raises(DataError, match="generation_config.json: field 'eos_token_id': 1000000"):
        load_folder(folder)


def test_your_models_checkpoint_is_not_the_toy_model_whatever_its_path(folders, toy_dir, sft_pairs, tmp_path, capsys):
    """Whether a run is the toy task is decided by what the model is (the record its checkpoint
    carries), never by the path's shape: an SFT checkpoint of a folder's model, given as a file or
    as its run folder, gets the model's context as DPO's and the reward model's default
    max_length (not the toy's 64), never the toy task's pairs, and no toy gold reward in sample.py."""
    import train_dpo
    import train_rm
    import train_sft
    from checkpoint import is_toy_model
    folder = str(tmp_path / "qwen2")
    shutil.copytree(folders["qwen2"][0], folder)
    _edit_config(folder, max_position_embeddings=256)  # a context the toy's 64 is not
    sft = tmp_path / "sft"
    quiet = ["--device=cpu", "--eval_samples=0", "--print_samples=0"]
    assert train_sft.main([f"--init_from={folder}", f"--train_file={toy_dir}/sft_val.jsonl", f"--out_dir={sft}",
                           "--max_iters=1", "--max_new_tokens=8", *quiet]) == 0
    assert not is_toy_model(str(sft)) and not is_toy_model(f"{sft}/ckpt.pt") and is_toy_model(sft_pairs[0])
    _, pairs = sft_pairs
    data = [f"--train_file={pairs}/pairs_train.jsonl", f"--val_file={pairs}/pairs_val.jsonl", "--batch_size=8",
            "--max_iters=1", "--device=cpu"]
    for script, sft_flag in ((train_dpo, f"{sft}/ckpt.pt"), (train_rm, str(sft))):
        out = tmp_path / script.__name__
        assert script.main([f"--sft_ckpt={sft_flag}", f"--out_dir={out}", *data]) == 0, capsys.readouterr().err
        assert json.load(open(out / "config.json"))["max_length"] == 256
        assert "gold evaluation is off" in capsys.readouterr().out
    assert train_dpo.main([f"--sft_ckpt={sft}/ckpt.pt", f"--out_dir={tmp_path}/none", "--device=cpu"]) == 2
    assert capsys.readouterr().err.startswith("error: --train_file: required with your own model")
    assert not (tmp_path / "none").exists()
    for ckpt, toy in ((str(sft), False), (sft_pairs[0], True)):
        assert sample.main([f"--ckpt={ckpt}", "--prompt=the plot", "--n=1", "--max_new_tokens=3", "--device=cpu"]) == 0
        assert ("gold reward" in capsys.readouterr().out) == toy


@pytest.mark.parametrize("family", FAMILIES)
def test_one_lora_dpo_step_on_each_family_lowers_the_loss_and_trains_only_adapters(folders, family):
    """LoRA on every projection under the family's names ("all": Phi-3's fused qkv_proj and
    gate_up_proj as one adapter each), reference = adapters off, one DPO step on two pairs
    (padded, each longer than the 4-token windows): the first loss is log 2, the step lowers it,
    and no base weight moves."""
    from dpo import concatenated_forward, dpo_loss
    from lora import AdaptersOff, LoRALinear, attach_lora
    model, _ = load_folder(folders[family][0])
    base = {k: v.clone() for k, v in model.state_dict().items()}
    attach_lora(model, rank=2, alpha=4, targets=["all"])
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    slices = {len(m.slices) for m in lora if m.out_features > model.config.n_embd}  # c_attn and a gated c_fc
    assert slices == ({1} if family == "phi3" else {3, 2} if family != "gpt2" else {3, 1})
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 250, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 9:] = mask[3, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # a 5-token prompt
    batch = {f"{side}_{k}": v[rows] for side, rows in (("chosen", [0, 1]), ("rejected", [2, 3]))
             for k, v in (("input_ids", ids), ("attention_mask", mask), ("labels", labels))}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    reference = AdaptersOff(model)
    losses = []
    for _ in range(2):
        with torch.no_grad():
            ref = concatenated_forward(reference, batch)
        loss = dpo_loss(*concatenated_forward(model.train(), batch), *ref, beta=0.5)[0].mean()
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[1] < losses[0] - 1e-3
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_sft_dpo_reward_model_and_ppo_run_on_todays_families(folders, toy_dir, sft_pairs, tmp_path, family):
    """The pipeline on the two families furthest from Llama (Gemma 3: four norms a block, sliding
    layers, GeGLU; Phi-3: fused projections, a partial rotary): SFT, DPO with LoRA on the family's
    projections, the reward model with gradient checkpointing, and PPO (GAE with a critic) scored
    by that reward model, one step each; each writes a checkpoint that loads."""
    import train_dpo
    import train_ppo
    import train_rm
    import train_sft
    from checkpoint import load_checkpoint
    folder, out = folders[family][0], tmp_path
    quiet = ["--device=cpu", "--max_iters=1", "--eval_interval=1", "--print_samples=0", "--lr=1e-3", "--warmup_iters=0"]
    assert train_sft.main([f"--init_from={folder}", f"--train_file={toy_dir}/sft_val.jsonl", f"--out_dir={out}/sft",
                           "--max_length=48", "--max_new_tokens=8", "--eval_samples=0", *quiet]) == 0
    _, pairs = sft_pairs
    data = [f"--sft_ckpt={out}/sft", f"--train_file={pairs}/pairs_train.jsonl", f"--val_file={pairs}/pairs_val.jsonl",
            "--batch_size=4", "--max_length=48", *quiet]
    assert train_dpo.main([*data, f"--out_dir={out}/dpo", "--lora_rank=2"]) == 0
    assert train_rm.main([*data, f"--out_dir={out}/rm", "--grad_checkpoint=true"]) == 0
    assert train_ppo.main([f"--sft_ckpt={out}/sft", f"--reward_ckpt={out}/rm", f"--prompts={toy_dir}/prompts_val.jsonl",
                           f"--out_dir={out}/ppo", "--batch_size=4", "--gen_chunk=4", "--max_new_tokens=6",
                           "--eval_samples=0", "--ppo_epochs=1", *quiet]) == 0
    adapters = load_checkpoint(f"{out}/dpo/ckpt.pt")["model"]
    n_layer = load_checkpoint(f"{out}/sft/ckpt.pt")["model_config"]["n_layer"]
    # every projection of every layer; Phi-3's fused ones with one adapter each, not one per slice
    assert all("lora" in k for k in adapters) and len({k.split(".lora")[0] for k in adapters}) == 4 * n_layer
    assert any(".c_attn.lora_A.1" in k for k in adapters) == (family != "phi3")
    for stage in ("sft", "ppo"):
        assert read_metrics(f"{out}/{stage}")[-1]["step"] == 1
