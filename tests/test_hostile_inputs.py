"""A downloaded folder, checkpoint or chat template is untrusted data (issue 24): a chat template
that loops without end, builds a huge text or number (with an operator, a filter or a method),
renders nothing, or does not parse is stopped within its bounds, a JSONL record past its bound is
refused before it is tokenized, and a checkpoint or DPO cache holding a pickle payload (or garbage) is
refused without running it; every script says so in one line and exits with status 2.

    python -m pytest -q tests/test_hostile_inputs.py
"""
import dataclasses
import json
import os
import signal
import threading
import time
import zipfile
from contextlib import nullcontext

import pytest
import torch

import chat
import sample
import train_dpo
import train_rm
import train_sft
from distributed import Dist
from files import DataError
from model import GPT, GPTConfig
from tokenizer import Tokenizer

LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
# template -> what its one-line refusal says
HOSTILE = {
    "nested_loops": (LOOP, "took more than 0.2 s to render"),
    # the inner loop runs over a range made before it: no sandbox hook is called while it spins
    "a_range_reused": ("{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
                       "took more than 0.2 s to render"),
    "big_multiplication": ("{{ 'a' * 10**10 }}", "builds a text or list of 10000000000 items"),
    "huge_power": ("{{ 10 ** (10 ** 10) }}", "computes a number of more than 65536 bits"),
    "doubling": ("{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                 "{% endfor %}",
                 "builds a text or list of 33554432 items"),
    "flood": ("{% for i in range(100000) %}{% for j in range(100000) %}{{ 'a' * 1000 }}{% endfor %}"
              "{% endfor %}",
              "writes more than 16777216 characters"),
    "huge_range": ("{{ range(10**9) }}", "calls safe_range with 1000000000, more than 16777216"),
    # what a filter or method allocates: refused before it runs (center asked for 10 GB first)
    "center": ("{{ 'a'|center(10**10) }}", "calls center with 10000000000, more than 16777216"),
    "method": ("{{ 'a'.ljust(10**10) }}", "calls ljust with 10000000000, more than 16777216"),
    "format_width": ("{{ '%1000000000s'|format('a') }}",
                     "calls format with a format width of more than 16777216"),
    "percent_width": ("{{ '%1000000000s' % 'a' }}", "calls % with a format width of more than 16777216"),
    "str_format_width": ("{{ '{:>1000000000}'.format('a') }}",
                         "calls format with a format width of more than"),
    "replace": ("{{ ('a' * 1000000)|replace('', 'b' * 1000) }}",
                "builds a text of 1001001000 characters with replace"),
    "join": ("{{ ('b' * 100000).join(['a'] * 1000) }}", "builds a text of 99901000 characters with join"),
    "syntax_error": ("{% for m in messages %}{{ m }", "does not parse: unexpected '}' (line 1)"),
    "raise_exception": ("{{ raise_exception('no\nchat here') }}", "refused the conversation: no chat here"),
}
MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Fine"}]


@pytest.fixture(autouse=True)
def quick_timeout(monkeypatch):
    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.2)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("the movie was great .\ni loved the film .\nhi there , fine .\n" * 50)
    return Tokenizer.train(str(corpus), vocab_size=300)


def write_checkpoint(path, tok, template=None):
    """A tiny model's ckpt.pt as train_sft.py writes it, its tokenizer carrying `template`."""
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)
    torch.save({"model": GPT(config).state_dict(), "model_config": dataclasses.asdict(config),
                "tokenizer": {**tok.state(), "chat_template": template}}, path)
    return str(path)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def test_a_render_stops_after_render_seconds_and_leaves_no_timer_behind():
    t0 = time.perf_counter()
    with pytest.raises(chat.ChatError,
                       match=r"^the chat template \(t.jinja\) took more than 0.2 s to render"):
        chat.render(LOOP, MESSAGES, {}, source="t.jinja")
    assert time.perf_counter() - t0 < 2
    assert (chat.render(chat.ZEPHYR_TEMPLATE, MESSAGES, {"eos_token": "</s>"})
            == "<|user|>\nHi</s>\n<|assistant|>\nFine</s>\n")
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # nothing left to go off later


def test_a_render_off_the_main_thread_has_no_timer_but_its_other_bounds(monkeypatch):
    """Signals reach only the main thread, so there a render cannot be timed; it still renders,
    and a huge text is still refused."""
    # as in a process that never rendered
    monkeypatch.setattr(signal, "getsignal", lambda signum: signal.SIG_DFL)
    results = []

    def render(template):
        try:
            results.append(chat.render(template, MESSAGES, {"eos_token": "</s>"}))
        except chat.ChatError as e:
            results.append(e)

    for template in (chat.ZEPHYR_TEMPLATE, HOSTILE["big_multiplication"][0]):
        thread = threading.Thread(target=render, args=(template,))
        thread.start()
        thread.join()
    assert results[0] == "<|user|>\nHi</s>\n<|assistant|>\nFine</s>\n"
    assert "builds a text or list of 10000000000 items" in str(results[1])


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_template_in_a_checkpoint_stops_sample_with_one_line_naming_it(case, tok, tmp_path, capsys):
    template, message = HOSTILE[case]
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", tok, template)
    t0 = time.perf_counter()
    assert sample.main([f"--ckpt={ckpt}", "--prompt=hi", "--device=cpu", "--max_new_tokens=2"]) == 2
    assert time.perf_counter() - t0 < 10
    line = one_error_line(capsys)
    assert line.startswith(f"error: the chat template ({ckpt}) ") and message in line, line


def test_a_template_that_fails_only_on_the_prompt_stops_sample_with_one_line(tok, tmp_path, capsys):
    """The template renders the test conversation a tokenizer is checked with when loaded, and
    refuses the prompt only when sampling starts."""
    template = ("{% if messages[0]['content'] == 'hi' %}{{ raise_exception('not hi') }}{% endif %}"
                + chat.ZEPHYR_TEMPLATE)
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", tok, template)
    assert sample.main([f"--ckpt={ckpt}", "--prompt=hi", "--device=cpu", "--max_new_tokens=2"]) == 2
    assert one_error_line(capsys) == f"error: the chat template ({ckpt}) refused the conversation: not hi"


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_a_hostile_template_in_a_model_folder_names_its_file(where, tmp_path, capsys):
    """Refused where sample.py takes the folder's own template (--chat_template auto); with
    --chat_template none the folder samples."""
    import transformers
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    backend = HFTokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hi": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, eos_token_id=1)).save_pretrained(tmp_path)
    capsys.readouterr()
    config = {"eos_token": "</s>"}
    if where == "chat_template.jinja":
        (tmp_path / where).write_text(LOOP)
    else:
        config["chat_template"] = LOOP
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert sample.main([f"--ckpt={tmp_path}", "--prompt=hi", "--device=cpu"]) == 2
    assert one_error_line(capsys).startswith(f"error: the chat template ({tmp_path / where}) took more "
                                             "than 0.2 s")
    assert sample.main([f"--ckpt={tmp_path}", "--prompt=hi", "--device=cpu", "--chat_template=none", "--n=1",
                        "--max_new_tokens=2"]) == 0


def sft_on_chat_data(tok, tmp_path, template: str) -> int:
    """train_sft.py on four conversations with `template` as the --chat_template file t.jinja."""
    tok.save(str(tmp_path / "tokenizer.model"))
    (tmp_path / "t.jinja").write_text(template)
    data = tmp_path / "chat.jsonl"
    record = {"messages": [{"role": "user", "content": "the movie"},
                           {"role": "assistant", "content": "was great ."}]}
    data.write_text((json.dumps(record) + "\n") * 4)
    return train_sft.main([f"--train_file={data}", f"--tokenizer={tmp_path / 'tokenizer.model'}",
                           f"--chat_template={tmp_path / 't.jinja'}", f"--out_dir={tmp_path / 'run'}",
                           "--device=cpu", "--max_iters=1"])


def test_a_hostile_chat_template_file_stops_train_sft_with_one_line(tok, tmp_path, capsys):
    assert sft_on_chat_data(tok, tmp_path, LOOP) == 2
    assert one_error_line(capsys).startswith(f"error: the chat template (--chat_template "
                                             f"{tmp_path / 't.jinja'}) took more than 0.2 s to render")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", [train_dpo, train_rm])
def test_a_hostile_chat_template_file_stops_the_preference_scripts_with_one_line(script, tok, tmp_path,
                                                                                 capsys):
    ckpt = write_checkpoint(tmp_path / "sft.pt", tok)
    (tmp_path / "big.jinja").write_text(HOSTILE["big_multiplication"][0])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "the movie", "chosen": "was great .", "rejected": "was bad ."})
                     + "\n")
    assert script.main([f"--sft_ckpt={ckpt}", f"--train_file={pairs}", f"--val_file={pairs}",
                        f"--chat_template={tmp_path / 'big.jinja'}", f"--out_dir={tmp_path / 'run'}",
                        "--device=cpu", "--max_iters=1"]) == 2
    assert one_error_line(capsys).startswith(f"error: the chat template (--chat_template "
                                             f"{tmp_path / 'big.jinja'}) "
                                             "builds a text or list of 10000000000 items")


def test_a_chat_template_file_that_is_not_text_is_one_line(tok, tmp_path):
    (tmp_path / "t.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(DataError,
                       match=f"^--chat_template {tmp_path / 't.jinja'}: cannot be read as UTF-8 text"):
        tok.with_chat_template(str(tmp_path / "t.jinja"), chat_data=True)


def test_a_chat_template_file_past_the_bound_is_refused_before_it_is_read_whole(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(chat, "MAX_CHARS", 100)
    monkeypatch.setattr("tokenizer.MAX_CHARS", 100)
    (tmp_path / "t.jinja").write_text("{# " + "x" * 200 + " #}" + chat.ZEPHYR_TEMPLATE)
    with pytest.raises(DataError, match=f"^--chat_template {tmp_path / 't.jinja'}: more than 100 characters"):
        tok.with_chat_template(str(tmp_path / "t.jinja"), chat_data=True)


def test_a_template_that_renders_nothing_is_refused_in_one_line_by_sample_and_sft(tok, tmp_path, capsys):
    """{{ '' }} ended in an IndexError in sample.py (a prompt of no tokens) and a RuntimeError in SFT."""
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", tok, "{{ '' }}")
    assert sample.main([f"--ckpt={ckpt}", "--prompt=hi", "--device=cpu", "--max_new_tokens=2"]) == 2
    assert one_error_line(capsys) == (f"error: the chat template ({ckpt}) renders a test prompt without "
                                      "its text: the user turn 'Hi' with the generation prompt became ''")
    assert sft_on_chat_data(tok, tmp_path, "{{ '' }}") == 2
    assert ("renders a test prompt without its text" in one_error_line(capsys)
            and not (tmp_path / "run").exists())


def test_a_record_past_the_bound_is_refused_before_it_is_parsed_or_tokenized(tmp_path, monkeypatch):
    """A 100 MB line took 165 s and 17 GB to tokenize; --skip_bad drops it and keeps the lines after."""
    import data
    monkeypatch.setattr(data, "MAX_RECORD_BYTES", 1000)
    path = tmp_path / "sft.jsonl"
    lines = [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": "x" * 5000},
             {"prompt": "c", "completion": "d"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(DataError, match=f"^{path}:2: a record of more than 1000 bytes"):
        data.load_sft(str(path))
    assert ([(e.prompt, e.where) for e in data.load_sft(str(path), skip_bad=True)]
            == [("a", f"{path}:1"), ("c", f"{path}:3")])


# -----------------------------------------------------------------------------
# Pickle payloads and garbage in ckpt.pt and the DPO reference cache


class Payload:
    """What a malicious checkpoint holds: unpickling it calls os.mkdir (a harmless marker here)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def save_payload(path, marker, **state):
    torch.save({**state, "model": {"w": Payload(marker)}}, path)
    torch.load(path, weights_only=False)  # the payload is live: a load that allows objects runs it
    assert marker.exists()
    marker.rmdir()


def test_a_pickle_payload_in_a_checkpoint_is_refused_in_one_line_and_never_runs(tok, tmp_path, capsys):
    ckpt, marker = tmp_path / "ckpt.pt", tmp_path / "payload_ran"
    save_payload(ckpt, marker, tokenizer=tok.state(), model_config={})
    assert sample.main([f"--ckpt={ckpt}", "--prompt=hi", "--device=cpu"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {ckpt}: not a checkpoint this project wrote: it holds Python objects "
                           "other than tensors (") and "mkdir" in line
    assert not marker.exists()


def _truncated(path, tok):
    write_checkpoint(path, tok)
    path.write_bytes(path.read_bytes()[:2000])


def _foreign_zip(path, tok):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a.txt", "not a checkpoint")


UNREADABLE = {
    "empty": (lambda path, tok: path.write_bytes(b""), "not a readable checkpoint"),
    "random_bytes": (lambda path, tok: path.write_bytes(os.urandom(4096)), "not a readable checkpoint"),
    "text": (lambda path, tok: path.write_text("hello\n"), "not a readable checkpoint"),
    "truncated": (_truncated, "not a readable checkpoint"),
    "foreign_zip": (_foreign_zip, "not a readable checkpoint"),
    "a_list": (lambda path, tok: torch.save([1, 2], path), "not a checkpoint this project wrote (no 'model'"),
    "no_tokenizer": (lambda path, tok: torch.save({"model": {}, "model_config": {}}, path),
                     "not a checkpoint this project wrote (no 'model'"),
}


@pytest.mark.parametrize("case", UNREADABLE)
def test_a_checkpoint_that_is_not_one_is_refused_in_one_line(case, tok, tmp_path, capsys):
    write, message = UNREADABLE[case]
    ckpt = tmp_path / "ckpt.pt"
    write(ckpt, tok)
    assert sample.main([f"--ckpt={ckpt}", "--prompt=hi", "--device=cpu"]) == 2
    assert one_error_line(capsys).startswith(f"error: {ckpt}: {message}")


def test_a_bad_dpo_reference_cache_is_computed_again_with_a_warning(tmp_path, monkeypatch, capsys):
    """It is a cache: a payload (never run), garbage, or log-probs of the wrong shape under the
    right key are replaced by fresh ones, with one warning line where it did not load."""
    ckpt, marker = tmp_path / "ckpt.pt", tmp_path / "payload_ran"
    ckpt.write_bytes(b"weights")
    monkeypatch.setattr(train_dpo, "reference_logps", lambda reference, data, *_: torch.ones(3, 2))
    pairs = {"train": {"chosen_input_ids": torch.arange(6).view(3, 2)}}
    cfg = train_dpo.Config(out_dir=str(tmp_path / "dpo"), sft_ckpt=str(ckpt))
    cache = tmp_path / "dpo" / "reference_logps.pt"

    def cached():
        return train_dpo.cached_reference_logps(cfg, None, pairs, Dist(False, 0, 0, 1, torch.device("cpu")),
                                                nullcontext())

    assert torch.equal(cached()["train"], torch.ones(3, 2))
    good = cache.read_bytes()
    for spoil in (lambda: save_payload(cache, marker), lambda: cache.write_bytes(good[:100]),
                  lambda: cache.write_bytes(b"")):
        spoil()
        assert torch.equal(cached()["train"], torch.ones(3, 2))
        err = capsys.readouterr().err
        assert (err.startswith(f"warning: {cache}: not a cache this script wrote")
                and err.count("\n") == 1), err
        assert cache.read_bytes() == good  # written again
    assert not marker.exists()
    # right key, wrong rows
    torch.save({**torch.load(cache, weights_only=True), "logps": {"train": torch.zeros(2, 2)}}, cache)
    assert torch.equal(cached()["train"], torch.ones(3, 2))


def spoil_checkpoint(path, tok, model_config=None, tokenizer=None, model=None):
    """write_checkpoint's ckpt.pt with some of its model_config, tokenizer or weights replaced."""
    write_checkpoint(path, tok)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"].update(model_config or {})
    ckpt["tokenizer"].update(tokenizer or {})
    ckpt["model"].update(model or {})
    torch.save(ckpt, path)


# a checkpoint's model_config or tokenizer -> what its one-line refusal says
SPOILED_CHECKPOINTS = {
    "a_billion_layers": (dict(model_config=dict(n_layer=10**9)), "model_config: n_layer must be an integer"),
    "a_thousand_wide_layers": (dict(model_config=dict(n_layer=1000, n_embd=65536, n_head=1, n_kv_head=1,
                                                      head_dim=None, intermediate_size=None)),
                               "model_config says 1000 layers, the weights hold 1"),
    "wider_than_its_weights": (dict(model_config=dict(n_embd=32, head_dim=None, intermediate_size=None)),
                               "transformer.wte.weight is not a floating-point tensor of shape [300, 32]"),
    "zero_heads": (dict(model_config=dict(n_head=0)), "model_config: n_head must be an integer"),
    "negative_heads": (dict(model_config=dict(n_head=-2)), "model_config: n_head must be an integer"),
    "float_heads": (dict(model_config=dict(n_head=2.0)), "model_config: n_head must be an integer"),
    "string_width": (dict(model_config=dict(n_embd="16")), "model_config: n_embd must be an integer"),
    "nan_eps": (dict(model_config=dict(norm_eps=float("nan"))), "model_config: norm_eps"),
    "unknown_field": (dict(model_config=dict(n_experts=8)), "model_config: "),
    "integer_weights": (
        dict(model=dict(**{"transformer.wte.weight": torch.zeros(300, 16, dtype=torch.long)})),
        "transformer.wte.weight is not a floating-point tensor of shape"),
    "eos_outside_the_vocabulary": (dict(tokenizer=dict(eos_id=10**6)),
                                   "special token ids [1000000] lie outside the tokenizer's"),
    "a_string_eos": (dict(tokenizer=dict(eos_id="3")), "its tokenizer is not one this project wrote"),
    "unknown_tokenizer_kind": (dict(tokenizer=dict(kind="pickle")),
                               "its tokenizer is not one this project wrote"),
    "unknown_tokenizer_field": (dict(tokenizer=dict(run_me="os.system")),
                                "its tokenizer is not one this project wrote"),
    "garbage_tokenizer_data": (dict(tokenizer=dict(data=b"not a sentencepiece model")),
                               "its tokenizer cannot be read"),
}


@pytest.mark.parametrize("case", SPOILED_CHECKPOINTS)
def test_a_hostile_checkpoint_field_is_refused_in_one_line_before_anything_is_built(case, tok, tmp_path,
                                                                                    capsys):
    spoil, message = SPOILED_CHECKPOINTS[case]
    ckpt = tmp_path / "ckpt.pt"
    spoil_checkpoint(ckpt, tok, **spoil)
    assert sample.main([f"--ckpt={ckpt}", "--prompt=hi", "--device=cpu"]) == 2
    assert one_error_line(capsys).startswith(f"error: {ckpt}: {message}")
