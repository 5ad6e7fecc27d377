"""A downloaded model folder is untrusted data (issue 24): every config value is checked before a
model is built, weights are read only from inside the folder, and each refusal is one line that
names the file and the field. hf.check_config checks a checkpoint's model_config the same way. Export
leaves no earlier model's files that a loader would read instead of the new ones."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import export
import sample
from conftest import ROOT
from files import DataError
from hf import check_config, load_folder
from model import GPTConfig
from test_hf import CORPUS, FAMILIES, train_bpe_tokenizer_json, train_sentencepiece_model, write_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """family -> a good folder: llama (sentencepiece tokenizer), gpt2 (tokenizer.json) and llama
    sharded into several files by a model.safetensors.index.json."""
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 40) + "\n", encoding="utf-8")
    out = {}
    for name, family, shard in (("llama", "llama_gqa_untied", None), ("gpt2", "gpt2", None),
                                ("sharded", "llama_gqa_untied", "40KB")):
        folder = str(tmp_path_factory.mktemp(name))
        write_model(folder, FAMILIES[family](), **({"max_shard_size": shard} if shard else {}))
        if family == "gpt2":
            train_bpe_tokenizer_json(folder, str(corpus), bos_template=False)
        else:
            train_sentencepiece_model(folder, str(corpus))
        out[name] = folder
    return out


def spoiled(good, tmp_path, base="llama"):
    folder = str(tmp_path / "model")
    shutil.copytree(good[base], folder)
    return folder


def edit_json(path, **changes):
    with open(path) as f:
        data = json.load(f)
    with open(path, "w") as f:
        json.dump({**data, **changes}, f)


def refused_in_one_line(folder, message, capsys):
    """The folder is refused with a DataError, and sample.py says so in one line, exit status 2."""
    with pytest.raises(DataError):
        load_folder(folder)
    assert sample.main([f"--ckpt={folder}", "--prompt=hi", "--device=cpu"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


# -----------------------------------------------------------------------------
# config.json


NAN, INF = float("nan"), float("inf")
BAD_CONFIG = [  # (folder, config.json changes, what the one line says)
    ("llama", dict(num_hidden_layers=10**9),
     "config.json: field 'num_hidden_layers': 1000000000 is not an integer from 1 to 1024"),
    ("llama", dict(num_hidden_layers=10**4), "field 'num_hidden_layers': 10000 is not an integer"),
    ("llama", dict(num_hidden_layers=1e9), "field 'num_hidden_layers': 1000000000.0 is not an integer"),
    ("llama", dict(num_hidden_layers=1000),
     "config.json: field 'num_hidden_layers': 1000 layers, and the weights hold 2"),
    ("llama", dict(num_attention_heads=0), "config.json: field 'num_attention_heads': 0 is not an integer"),
    ("llama", dict(num_attention_heads=-4), "field 'num_attention_heads': -4 is not an integer"),
    ("llama", dict(num_attention_heads=4.0), "field 'num_attention_heads': 4.0 is not an integer"),
    ("llama", dict(num_attention_heads="4"), "field 'num_attention_heads': '4' is not an integer"),
    ("llama", dict(num_attention_heads=True), "field 'num_attention_heads': True is not an integer"),
    ("llama", dict(num_key_value_heads=3),
     "field 'num_key_value_heads': 3 does not divide num_attention_heads (4)"),
    ("llama", dict(hidden_size=30, head_dim=None),
     "field 'hidden_size': 30 is not a multiple of num_attention_heads (4)"),
    ("llama", dict(head_dim=7), "field 'head_dim': rotary positions need an even head size, not 7"),
    ("llama", dict(head_dim=[8]), "field 'head_dim': [8] is not an integer"),
    ("llama", dict(vocab_size=2**30), "field 'vocab_size': 1073741824 is not an integer from 1 to 16777216"),
    ("llama", dict(max_position_embeddings=-1), "field 'max_position_embeddings': -1 is not an integer"),
    ("llama", dict(intermediate_size="48"), "field 'intermediate_size': '48' is not an integer"),
    ("llama", dict(rms_norm_eps=NAN), "field 'rms_norm_eps': nan is not a positive finite number"),
    ("llama", dict(rms_norm_eps=-1e-6), "field 'rms_norm_eps': -1e-06 is not a positive finite number"),
    ("llama", dict(rms_norm_eps=INF), "field 'rms_norm_eps': inf is not a positive finite number"),
    ("llama", dict(rms_norm_eps="1e-6"), "field 'rms_norm_eps': '1e-6' is not a positive finite number"),
    ("llama", dict(rope_parameters=dict(rope_type="default", rope_theta=0)),
     "field 'rope_theta': 0 is not a positive"),
    ("llama", dict(rope_parameters=None, rope_theta=-1e4), "field 'rope_theta': -10000.0 is not a positive"),
    ("llama", dict(rope_parameters=None, rope_theta="big"), "field 'rope_theta': 'big' is not a positive"),
    ("llama", dict(rope_scaling=[1, 2]), "field 'rope_scaling': [1, 2] is not a JSON object"),
    ("llama", dict(rope_parameters=dict(rope_type="yarn", factor=4.0)),
     "config.json: rope scaling 'yarn' is not supported"),
    ("llama", dict(rope_parameters=dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=32)),
     "field 'rope_scaling.factor': None is not a positive finite number"),
    ("llama", dict(rope_parameters=None, rope_scaling=dict(  # how transformers 4 wrote it
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=2.5)),
     "field 'rope_scaling.original_max_position_embeddings': 2.5 is not an integer"),
    ("llama", dict(rope_parameters=None, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=4.0,
        original_max_position_embeddings=32)),
     "rope scaling 'llama3' needs a factor of 1 or more and low_freq_factor below high_freq_factor, "
     "not (8.0, 4.0, 4.0)"),
    ("llama", dict(tie_word_embeddings="yes"), "field 'tie_word_embeddings': 'yes' is not true or false"),
    ("llama", dict(attention_bias=1), "field 'attention_bias': 1 is not true or false"),
    ("llama", dict(model_type="smollm3", no_rope_layers=[1, 0, 1]),
     "field 'no_rope_layers': [1, 0, 1] is not a 0 or 1 for each of the 2 layers"),
    ("llama", dict(model_type="smollm3", no_rope_layers=[1, 0.0]),
     "field 'no_rope_layers': [1, 0.0] is not a 0 or 1 for each of the 2 layers"),
    ("llama", dict(model_type="phi3", rope_parameters=dict(rope_type="longrope", rope_theta=10000.0)),
     "config.json: rope scaling 'longrope' is not supported"),
    ("llama", dict(model_type="phi3", partial_rotary_factor=1.5),
     "field 'partial_rotary_factor': 1.5 is not a number in (0, 1]"),
    ("llama", dict(model_type="olmo2", attention_bias=True),
     "config.json: attention_bias or mlp_bias in a olmo2 config is not supported"),
    ("llama", dict(model_type="qwen3", attention_bias=True),
     "config.json: attention_bias or mlp_bias in a qwen3 config is not supported"),
    ("llama", dict(model_type="gemma3_text", final_logit_softcapping=30.0),
     "config.json: final_logit_softcapping 30.0 is not supported"),
    ("llama", dict(model_type="gemma3_text", attn_logit_softcapping=50.0),
     "config.json: attn_logit_softcapping 50.0 is not supported"),
    ("llama", dict(model_type="gemma3_text", use_bidirectional_attention=True),
     "config.json: use_bidirectional_attention True is not supported"),
    ("llama", dict(model_type="gemma3_text", hidden_activation="gelu"), "config.json: hidden_activation 'gelu' is not supported"),
    ("llama", dict(model_type="gemma3_text", rope_parameters=dict(  # Gemma 3 4B's long-context full layers
        full_attention=dict(rope_type="linear", factor=8.0, rope_theta=1e6),
        sliding_attention=dict(rope_type="default", rope_theta=1e4))), "config.json: rope scaling 'linear' is not supported"),
    ("llama", dict(model_type="gemma3_text", layer_types=["sliding_attention", "local"]),
     "field 'layer_types': ['sliding_attention', 'local'] is not a list of 2 layer types"),
    ("llama", dict(model_type="gemma3", text_config={}), "model_type 'gemma3' is Gemma 3's image-and-text model"),
    ("llama", dict(model_type="qwen2", use_sliding_window=True, max_window_layers="x"),
     "field 'max_window_layers': 'x' is not a count of layers"),
    ("llama", dict(model_type="qwen2", use_sliding_window=True, layer_types=5),
     "field 'layer_types': 5 is not a list"),
    ("llama", dict(model_type="mistral", sliding_window=-1), "field 'sliding_window': -1 is not an integer"),
    ("llama", dict(model_type="mistral", sliding_window="4096"),
     "field 'sliding_window': '4096' is not an integer"),
    ("gpt2", dict(n_head=0), "config.json: field 'n_head': 0 is not an integer"),
    ("gpt2", dict(n_layer=10**6), "config.json: field 'n_layer': 1000000 is not an integer"),
    ("gpt2", dict(n_layer=5), "config.json: field 'n_layer': 5 layers, and the weights hold 2"),
    ("gpt2", dict(n_embd=30), "field 'n_embd': 30 is not a multiple of n_head (4)"),
    ("gpt2", dict(layer_norm_epsilon=-1e-5),
     "field 'layer_norm_epsilon': -1e-05 is not a positive finite number"),
    ("gpt2", dict(layer_norm_epsilon=NAN), "field 'layer_norm_epsilon': nan is not a positive finite number"),
    ("gpt2", dict(activation_function=["gelu"]),
     "config.json: activation_function ['gelu'] is not supported"),
    ("gpt2", dict(scale_attn_weights="no"), "field 'scale_attn_weights': 'no' is not true or false"),
]


@pytest.mark.parametrize("base, changes, message", BAD_CONFIG, ids=[
    f"{base}-{'-'.join(f'{k}={v!r}' for k, v in changes.items())}"[:60] for base, changes, _ in BAD_CONFIG])
def test_a_hostile_config_value_is_refused_in_one_line(good, tmp_path, capsys, base, changes, message):
    folder = spoiled(good, tmp_path, base)
    edit_json(f"{folder}/config.json", **changes)
    refused_in_one_line(folder, message, capsys)


def test_a_billion_layers_is_refused_at_once_through_the_command_line(good, tmp_path):
    """The user's view: no hang, no traceback, exit status 2."""
    folder = spoiled(good, tmp_path)
    edit_json(f"{folder}/config.json", num_hidden_layers=10**9)
    r = subprocess.run([sys.executable, "sample.py", f"--ckpt={folder}", "--prompt=hi", "--device=cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {folder}/config.json: field 'num_hidden_layers': 1000000000 is not an integer "
        "from 1 to 1024"], r.stderr


@pytest.mark.parametrize("file", ["config.json", "generation_config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "not a JSON object but [1, 2]"), ("42", "not a JSON object but 42"),
    ("null", "not a JSON object"),
    ('"llama"', "not a JSON object but 'llama'"), ("[" * 100_000, "invalid JSON (maximum recursion depth"),
    ('{"vocab_size": ' + "9" * 5000 + "}", "invalid JSON (Exceeds the limit (4300 digits)")],
    ids=["list", "number", "null", "string", "deep nesting", "5000 digits"])
def test_a_json_file_that_is_no_object_is_refused_in_one_line(good, tmp_path, capsys, file, text, message):
    folder = spoiled(good, tmp_path)
    with open(f"{folder}/{file}", "w") as f:
        f.write(text)
    refused_in_one_line(folder, f"{file}: {message}", capsys)


@pytest.mark.parametrize("file, bound", [("config.json", "MAX_JSON_BYTES"),
                                         ("tokenizer_config.json", "MAX_JSON_BYTES"),
                                         ("tokenizer.model", "MAX_TOKENIZER_BYTES"),
                                         ("chat_template.jinja", "MAX_TEMPLATE_BYTES")])
def test_a_file_past_its_size_bound_is_refused_before_it_is_read_whole(good, tmp_path, capsys, file, bound):
    """A file one byte past its bound (sparse: zeros on disk cost nothing) is one line naming the
    bound; at the bound it would be read. Real files are far smaller (hf.py's constants)."""
    import hf
    folder = spoiled(good, tmp_path)
    path = f"{folder}/{file}"
    open(path, "ab").close()
    os.truncate(path, getattr(hf, bound) + 1)
    refused_in_one_line(folder, f"{file}: more than {getattr(hf, bound)} bytes (hf.{bound})", capsys)


# -----------------------------------------------------------------------------
# Token ids


def without_special_tokens(folder):
    """Drop tokenizer_config.json's special tokens, so ids come from generation_config.json or config.json."""
    path = f"{folder}/tokenizer_config.json"
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({k: v for k, v in config.items() if not k.endswith("_token")}, f)


BAD_IDS = [  # (file, changes, what the one line says)
    ("generation_config.json", dict(eos_token_id=10**6),
     "generation_config.json: field 'eos_token_id': 1000000 is not a token id below"),
    ("generation_config.json", dict(eos_token_id=[2, -1]),
     "generation_config.json: field 'eos_token_id': -1 is not a token id"),
    ("generation_config.json", dict(eos_token_id="2"),
     "generation_config.json: field 'eos_token_id': '2' is not a token id"),
    ("generation_config.json", dict(eos_token_id=2.0),
     "generation_config.json: field 'eos_token_id': 2.0 is not a token id"),
    ("generation_config.json", dict(bos_token_id=True),
     "generation_config.json: field 'bos_token_id': True is not a token id"),
    ("config.json", dict(eos_token_id=10**5),
     "/config.json: field 'eos_token_id': 100000 is not a token id below"),
    ("config.json", dict(pad_token_id=10**6),
     "/config.json: field 'pad_token_id': 1000000 is not a token id"),
    ("config.json", dict(bos_token_id=-1), "/config.json: field 'bos_token_id': -1 is not a token id"),
    ("tokenizer_config.json", dict(eos_token=["</s>"]),
     "tokenizer_config.json: field 'eos_token': ['</s>'] is not a string"),
    ("tokenizer_config.json", dict(bos_token={"content": 1}),
     "tokenizer_config.json: field 'bos_token': 1 is not a string"),
    ("tokenizer_config.json", dict(add_bos_token="no"),
     "tokenizer_config.json: field 'add_bos_token': 'no' is not true or false"),
]


@pytest.mark.parametrize("file, changes, message", BAD_IDS, ids=[f"{f}-{c}"[:60] for f, c, _ in BAD_IDS])
def test_a_special_token_id_outside_the_vocabulary_is_refused_in_one_line(good, tmp_path, capsys, file,
                                                                           changes, message):
    folder = spoiled(good, tmp_path)
    if file != "tokenizer_config.json":
        without_special_tokens(folder)
    if file == "config.json":
        edit_json(f"{folder}/generation_config.json", eos_token_id=None, bos_token_id=None)
    edit_json(f"{folder}/{file}", **changes)
    refused_in_one_line(folder, message, capsys)


def test_a_chat_template_list_with_odd_names_has_no_default(good, tmp_path):
    folder = spoiled(good, tmp_path)
    edit_json(f"{folder}/tokenizer_config.json", chat_template=[{"name": ["default"], "template": "x"}, "y"])
    assert load_folder(folder)[1].chat_template is None


# -----------------------------------------------------------------------------
# Weight files


def edit_weights(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("name, value, message", [
    ("model.layers.0.self_attn.k_proj.weight", torch.zeros(16, 30),
     "tensor model.layers.0.self_attn.k_proj.weight has shape [16, 30], config.json implies [16, 32]"),
    ("model.layers.1.mlp.down_proj.weight", torch.zeros(32, 48, dtype=torch.int32),
     "tensor model.layers.1.mlp.down_proj.weight has dtype I32, not a floating-point type"),
    ("model.norm.weight", torch.zeros(32, dtype=torch.bool), "tensor model.norm.weight has dtype BOOL")])
def test_a_tensor_of_the_wrong_shape_or_dtype_is_refused_in_one_line(good, tmp_path, capsys, name, value,
                                                                     message):
    folder = spoiled(good, tmp_path)
    edit_weights(folder, lambda t: t.update({name: value}))
    refused_in_one_line(folder, message, capsys)


def shard_names(folder):
    with open(f"{folder}/model.safetensors.index.json") as f:
        return sorted(set(json.load(f)["weight_map"].values()))


def point_index(folder, old, new):
    path = f"{folder}/model.safetensors.index.json"
    with open(path) as f:
        index = json.load(f)
    index["weight_map"] = {k: new if v == old else v for k, v in index["weight_map"].items()}
    with open(path, "w") as f:
        json.dump(index, f)


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_a_shard_outside_the_folder_is_refused_in_one_line(good, tmp_path, capsys, how):
    """The index names a shard by absolute path or with "..": it was read from wherever it pointed."""
    folder = spoiled(good, tmp_path, "sharded")
    shard = shard_names(folder)[0]
    os.makedirs(tmp_path / "outside")
    outside = str(tmp_path / "outside" / shard)
    shutil.move(f"{folder}/{shard}", outside)
    named = outside if how == "absolute" else f"../outside/{shard}"
    point_index(folder, shard, named)
    refused_in_one_line(folder, f"model.safetensors.index.json: shard {named!r} lies outside the folder",
                        capsys)


def cache_snapshot(folder: str, root) -> str:
    """`folder` laid out as the Hugging Face cache keeps a download: every file in
    hub/models--org--name/blobs/ under a hash, linked from snapshots/<revision>/ by name."""
    model = root / "hub" / "models--org--name"
    snapshot, blobs = model / "snapshots" / "0123abcd", model / "blobs"
    os.makedirs(snapshot)
    os.makedirs(blobs)
    for i, name in enumerate(sorted(os.listdir(folder))):
        shutil.copy(f"{folder}/{name}", blobs / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / name)
    return str(snapshot)


def test_a_cache_snapshot_whose_files_all_link_into_its_blobs_loads_the_same_weights(good, tmp_path):
    model, tok = load_folder(cache_snapshot(good["sharded"], tmp_path))
    reference, reference_tok = load_folder(good["sharded"])
    assert all(torch.equal(a, b)
               for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert tok.encode("the film") == reference_tok.encode("the film")


@pytest.mark.parametrize("file", ["config.json", "model.safetensors", "tokenizer.model", "shard"])
def test_a_file_linked_out_of_the_folder_is_refused_in_one_line(file, good, tmp_path, capsys):
    """config.json, model.safetensors and tokenizer.model linked out of the folder were followed
    (a shard too, where the folder is not a cache snapshot): a folder reads no file outside itself."""
    folder = spoiled(good, tmp_path, "sharded" if file == "shard" else "llama")
    name = shard_names(folder)[0] if file == "shard" else file
    os.makedirs(tmp_path / "elsewhere")
    shutil.move(f"{folder}/{name}", tmp_path / "elsewhere" / name)
    os.symlink(tmp_path / "elsewhere" / name, f"{folder}/{name}")
    refused_in_one_line(folder, f"{name}: a link to {tmp_path}/elsewhere/{name}, outside the folder", capsys)


def test_a_snapshot_link_out_of_its_blobs_is_refused(good, tmp_path, capsys):
    snapshot = cache_snapshot(good["llama"], tmp_path)
    os.remove(f"{snapshot}/config.json")
    shutil.copy(f"{good['llama']}/config.json", tmp_path / "config.json")
    os.symlink(tmp_path / "config.json", f"{snapshot}/config.json")
    refused_in_one_line(snapshot, f"config.json: a link to {tmp_path}/config.json, outside the folder",
                        capsys)


def test_an_index_whose_shard_names_are_not_strings_is_refused_in_one_line(good, tmp_path, capsys):
    folder = spoiled(good, tmp_path, "sharded")
    point_index(folder, shard_names(folder)[0], 5)
    refused_in_one_line(folder, "model.safetensors.index.json: field 'weight_map' is not an object of "
                                "tensor names to shard files", capsys)


def test_model_safetensors_wins_over_an_index_as_in_transformers(good, tmp_path):
    """A folder with both (an export over a sharded folder left the index): transformers reads
    model.safetensors and only falls back to the index, and so must this loader."""
    folder = spoiled(good, tmp_path, "sharded")
    write_model(str(tmp_path / "other"), FAMILIES["llama_gqa_untied"](), seed=1)
    shutil.copy(tmp_path / "other" / "model.safetensors", folder)
    ours = load_folder(folder)[0].state_dict()["transformer.wte.weight"]
    name = "model.embed_tokens.weight"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()[name]
    assert torch.equal(ours, theirs) and torch.equal(ours, load_file(f"{folder}/model.safetensors")[name])


# -----------------------------------------------------------------------------
# Export over an earlier model


def test_export_overwrite_of_a_sharded_folder_leaves_no_stale_weights(good, tmp_path, capsys):
    """export.py --overwrite into a folder holding a sharded model (and a tokenizer.json) left the
    index, its shards and the tokenizer.json beside the new files: this loader read the old
    weights and tokenizer, transformers the new. Files that are no model's stay, as does a file
    outside the folder that the old index names."""
    out = str(tmp_path / "out")
    shutil.copytree(good["sharded"], out)
    os.remove(f"{out}/tokenizer.model")
    shutil.copy(f"{good['gpt2']}/tokenizer.json", out)
    shards = shard_names(out)
    (tmp_path / "elsewhere.safetensors").write_bytes(b"not mine")
    point_index(out, shards[0], str(tmp_path / "elsewhere.safetensors"))
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert export.main([f"--ckpt={good['llama']}", f"--out_dir={out}", "--overwrite"]) == 0
    assert "removed the earlier model's model.safetensors.index.json" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "notes.txt", "tokenizer.model", "tokenizer_config.json"]
    assert (tmp_path / "elsewhere.safetensors").read_bytes() == b"not mine"
    source, _ = load_folder(good["llama"])
    exported, tok = load_folder(out)
    assert tok.kind == "sentencepiece"
    for (name, a), b in zip(source.state_dict().items(), exported.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert torch.equal(theirs["model.embed_tokens.weight"], source.state_dict()["transformer.wte.weight"])


# -----------------------------------------------------------------------------
# check_config: a checkpoint's model_config


@pytest.mark.parametrize("changes, message", [
    (dict(n_head=0), "n_head must be an integer from 1 to 4096, got 0"),
    (dict(n_layer=10**9), "n_layer must be an integer from 1 to 1024, got 1000000000"),
    (dict(vocab_size=True), "vocab_size must be an integer from 1 to 16777216, got True"),
    (dict(n_embd=32.0), "n_embd must be an integer from 1 to 65536, got 32.0"),
    (dict(head_dim="8"), "head_dim must be an integer from 1 to 4096, got '8'"),
    (dict(n_kv_head=0), "n_kv_head must be an integer from 1 to 4096, got 0"),
    (dict(block_size=-1), "block_size must be an integer from 1 to 4194304, got -1"),
    (dict(intermediate_size=2**30), "intermediate_size must be an integer from 1 to 262144, got 1073741824"),
    (dict(n_kv_head=3), "n_head (4) must be a multiple of n_kv_head (3)"),
    (dict(n_embd=30), "n_embd (30) must be a multiple of n_head (4) unless head_dim is given"),
    (dict(pos="rope", n_embd=28), "head_dim must be even for rotary positions, got 7"),
    (dict(norm_eps=math.nan), "norm_eps must be a positive finite number, got nan"),
    (dict(norm_eps=0.0), "norm_eps must be a positive finite number, got 0.0"),
    (dict(rope_theta=-1.0), "rope_theta must be a positive finite number, got -1.0"),
    (dict(rope_theta=math.inf), "rope_theta must be a positive finite number, got inf"),
    (dict(dropout=1.0), "dropout must be a number from 0 to below 1, got 1.0"),
    (dict(qk_norm=True), "qk_norm must be one of None, head, projection, got True"),
    (dict(pos="rope", rotary_dim=3), "rotary_dim must be an even number of dims from 2 to head_dim (8), got 3"),
    (dict(norm_after="yes"), "norm_after must be true or false, got 'yes'"),
    (dict(rope_layers=[1, 0, 1]), "rope_layers must hold a 0 or 1 for each of the 2 layers, got [1, 0, 1]"),
    (dict(rope_layers=[True, 2]), "rope_layers must hold a 0 or 1 for each of the 2 layers, got [True, 2]"),
    (dict(pos="rope", rope_scaling=[8.0, 1.0, 4.0]), "rope_scaling must be (factor >= 1, low_freq_factor, "
     "high_freq_factor above it, an original context in tokens), positive numbers, got [8.0, 1.0, 4.0]"),
    (dict(pos="rope", rope_scaling=[8.0, 4.0, 1.0, 32]), "rope_scaling must be (factor >= 1, low_freq_factor, "
     "high_freq_factor above it, an original context in tokens), positive numbers, got [8.0, 4.0, 1.0, 32]"),
    (dict(bias="yes"), "bias must be true or false, got 'yes'"),
    (dict(norm="batchnorm"), "norm must be one of layernorm, rmsnorm, got 'batchnorm'"),
    (dict(mlp=None), "mlp must be one of gelu, gelu_tanh, swiglu, geglu, got None"),
    (dict(norm_offset=1), "norm_offset must be true or false, got 1"),
    (dict(family="bert"), "family must be one of None, llama, mistral, qwen2, qwen3, smollm3, phi3, olmo2, gemma3_text, "
     "gpt2, got 'bert'"),
    (dict(norm_before="yes"), "norm_before must be true or false, got 'yes'"),
    (dict(attn_scale=-0.5), "attn_scale must be a positive finite number, got -0.5"),
    (dict(rope_local_theta=0), "rope_local_theta must be a positive finite number, got 0"),
    (dict(layer_windows=[4]), "layer_windows must hold a window in tokens (0: none) for each of the 2 layers, got [4]"),
    (dict(layer_windows=[4, -1]),
     "layer_windows must hold a window in tokens (0: none) for each of the 2 layers, got [4, -1]")])
def test_check_config_refuses_a_bad_value_naming_the_field(changes, message):
    with pytest.raises(ValueError) as e:
        check_config({**dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32), **changes})
    assert str(e.value) == message


@pytest.mark.parametrize("fields, message", [
    ([1, 2], "model.GPTConfig() argument after ** must be a mapping, not list"),
    (None, "model.GPTConfig() argument after ** must be a mapping, not NoneType"),
    ({1: 2}, "keywords must be strings"),
    (dict(n_experts=8), "GPTConfig.__init__() got an unexpected keyword argument 'n_experts'"),
    (dict(n_head=0, n_experts=8), "GPTConfig.__init__() got an unexpected keyword argument 'n_experts'")])
def test_check_config_leaves_what_is_not_gptconfigs_fields_to_gptconfigs_own_type_error(fields, message):
    """Not a mapping of GPTConfig's fields: GPTConfig's own TypeError, before any value is read."""
    with pytest.raises(TypeError) as e:
        check_config(fields)
    assert str(e.value) == message


def test_check_config_builds_the_config_of_good_fields():
    fields = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, pos="rope")
    assert check_config(fields) == GPTConfig(**fields)
    assert check_config({}) == GPTConfig()
