"""JSONL readers, truncation and collation.

    python -m pytest -q tests/test_data.py
"""
import json

import pytest
import torch

from data import (IGNORE_INDEX, Example, collate, encode_example, load_preferences, load_prompts, load_sft,
                  take, tokenize_sft)
from files import DataError


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_the_three_preference_formats_read_to_the_same_pairs(tmp_path):
    plain = _write(tmp_path / "plain.jsonl",
                   [{"prompt": "Human: hi?", "chosen": "hello!", "rejected": "go away"}])
    hh = _write(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: hi?\n\nAssistant: hello!",
                                         "rejected": "\n\nHuman: hi?\n\nAssistant: go away"}])
    uf = _write(tmp_path / "uf.jsonl", [{"prompt": "hi?",
                                         "chosen": [{"role": "user", "content": "hi?"},
                                                    {"role": "assistant", "content": "hello!"}],
                                         "rejected": [{"role": "user", "content": "hi?"},
                                                      {"role": "assistant", "content": "go away"}]}])
    for path, prompt in [(plain, "Human: hi?"), (hh, "\n\nHuman: hi?\n\nAssistant:"), (uf, "hi?")]:
        (pair,) = load_preferences(path)
        assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, "hello!", "go away")
        assert pair.where == f"{path}:1"


def test_an_implicit_prompt_is_the_shared_prefix_less_its_trailing_space(tmp_path):
    path = _write(tmp_path / "implicit.jsonl", [
        {"chosen": "Q: sky colour? A: blue.", "rejected": "Q: sky colour? A: green."},
        {"chosen": "Say hi.\nhello there", "rejected": "Say hi.\nhi"},  # cut inside a word, as TRL's
    ])
    pairs = load_preferences(path)
    assert [(p.prompt, p.chosen, p.rejected, p.prompt_messages) for p in pairs] == [
        ("Q: sky colour? A:", " blue.", " green.", None), ("Say hi.\nh", "ello there", "i", None)]
    assert [p.where for p in pairs] == [f"{path}:1", f"{path}:2"]


USER_HI = [{"role": "user", "content": "hi?"}]


def test_sharegpt_pairs_read_as_a_prompt_conversation_and_two_replies(tmp_path):
    path = _write(tmp_path / "sharegpt.jsonl", [{
        "system": "be kind", "conversations": [{"from": "human", "value": "hi?"}],
        "chosen": {"from": "gpt", "value": "hello!"}, "rejected": {"from": "gpt", "value": "go away"}}])
    (pair,) = load_preferences(path)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("hi?", "hello!", "go away")
    assert pair.prompt_messages == [{"role": "system", "content": "be kind"}] + USER_HI


GOOD_PAIR = {"implicit": {"chosen": "Q: a b", "rejected": "Q: a c"},
             "sharegpt": {"conversations": [{"from": "human", "value": "hi?"}],
                          "chosen": {"from": "gpt", "value": "a"},
                          "rejected": {"from": "gpt", "value": "b"}}}
BAD_PAIRS = {
    "no_shared_prefix": ("implicit", {"chosen": "yes", "rejected": "no"},
                         "field 'rejected': shares no prompt"),
    "shared_whitespace_only": ("implicit", {"chosen": "\n yes", "rejected": "\n no"},
                               "field 'rejected': shares no prompt"),
    "chosen_is_the_prefix": ("implicit", {"chosen": "Q: a", "rejected": "Q: a b"},
                             "field 'chosen': empty response after"),
    "rejected_is_the_prefix": ("implicit", {"chosen": "Q: a b", "rejected": "Q: a "},
                               "field 'rejected': empty response after"),
    "sharegpt_sft_record": ("sharegpt", {"conversations": [{"from": "human", "value": "hi?"},
                                                           {"from": "gpt", "value": "yo"}]},
                            "field 'conversations': a ShareGPT conversation without 'chosen' and 'rejected'"),
    "sharegpt_reply_not_gpt": ("sharegpt",
                               {**GOOD_PAIR["sharegpt"], "chosen": {"from": "human", "value": "a"}},
                               "field 'chosen': expected a ShareGPT reply"),
    "sharegpt_unknown_speaker": ("sharegpt", {**GOOD_PAIR["sharegpt"],
                                              "conversations": [{"from": "bot", "value": "hi?"}]},
                                 "field 'conversations\\[0\\].from': unknown speaker 'bot'"),
    "sharegpt_in_a_plain_file": ("plain", GOOD_PAIR["sharegpt"],
                                 "field 'conversations': a ShareGPT record in a file read as plain"),
}


@pytest.mark.parametrize("case", BAD_PAIRS)
def test_bad_implicit_and_sharegpt_pairs_are_refused_naming_line_and_field(case, tmp_path):
    fmt, record, message = BAD_PAIRS[case]
    # the first record sets the format
    first = GOOD_PAIR.get(fmt, {"prompt": "a", "chosen": "b", "rejected": "c"})
    path = _write(tmp_path / "p.jsonl", [first, record])
    with pytest.raises(DataError, match=rf"p.jsonl:2: {message}"):
        load_preferences(path)


def test_conversational_prompt_completion_and_sharegpt_sft_records_are_conversations(tmp_path):
    reply = {"role": "assistant", "content": "hello!"}
    pc = _write(tmp_path / "pc.jsonl", [{"prompt": USER_HI, "completion": [reply]}])
    sharegpt = _write(tmp_path / "sharegpt.jsonl", [{"conversations": [
        {"from": "system", "value": "be kind"}, {"from": "human", "value": "hi?"},
        {"from": "gpt", "value": "hello!"}]}])
    assert load_sft(pc) == [Example("", "", f"{pc}:1", USER_HI + [reply], prompt_turns=1)]
    assert load_sft(sharegpt) == [Example("", "", f"{sharegpt}:1",
                                          [{"role": "system", "content": "be kind"}, *USER_HI, reply])]


BAD_SFT = {
    "completion_from_the_user": ({"prompt": USER_HI, "completion": USER_HI},
                                 "field 'completion\\[0\\].role': expected 'assistant'"),
    "completion_a_string": ({"prompt": USER_HI, "completion": "hello!"},
                            "field 'completion': expected a non-empty list"),
    "sharegpt_unknown_speaker": ({"conversations": [{"from": "human", "value": "hi?"},
                                                    {"from": "bot", "value": "yo"}]},
                                 "field 'conversations\\[1\\].from': unknown speaker 'bot' "
                                 "\\(ShareGPT's are human, gpt, system\\)"),
    "sharegpt_no_value": ({"conversations": [{"from": "human"}]},
                          "field 'conversations\\[0\\]': expected ShareGPT"),
    "sharegpt_no_reply": ({"conversations": [{"from": "human", "value": "hi?"}]},
                          "field 'conversations': no assistant turn"),
}


@pytest.mark.parametrize("case", BAD_SFT)
def test_bad_conversational_sft_records_are_refused_naming_line_and_field(case, tmp_path):
    record, message = BAD_SFT[case]
    with pytest.raises(DataError, match=rf"s.jsonl:1: {message}"):
        load_sft(_write(tmp_path / "s.jsonl", [record]))


def test_prompts_may_be_conversations_ending_in_a_user_turn(tmp_path):
    system = {"role": "system", "content": "be kind"}
    path = _write(tmp_path / "prompts.jsonl", [{"prompt": "the movie"}, {"prompt": [system, *USER_HI]}])
    assert load_prompts(path) == ["the movie", [system, *USER_HI]]
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": USER_HI + [{"role": "assistant", "content": "yo"}]}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'prompt': last message is not from the user"):
        load_prompts(bad)


def test_skip_bad_drops_and_counts_bad_records(tmp_path, capsys):
    path = _write(tmp_path / "p.jsonl", ['{"prompt": "a", "chosen": "b", "rejected": "c"}', "{oops",
                                         {"prompt": "a", "chosen": "b", "rejected": "b"},
                                         {"prompt": "d", "chosen": "e", "rejected": "f"}])
    with pytest.raises(DataError, match=r"p.jsonl:2: invalid JSON"):
        load_preferences(path)
    pairs = load_preferences(path, skip_bad=True)
    assert [p.prompt for p in pairs] == ["a", "d"]
    assert "skipped 2 bad records" in capsys.readouterr().err


def test_truncation_keeps_the_end_of_the_prompt_and_the_start_of_the_response(tok):
    prompt, response = "i loved the film . the plot was", "great . i would recommend it ."
    p, r = tok.encode(prompt), tok.encode(response)
    assert encode_example(tok, prompt, response, max_length=64, max_prompt_length=None, where="x") == (
        [tok.bos_id] + p + r + [tok.eos_id], len(p) + 1, False)  # it fits: nothing cut
    assert encode_example(tok, prompt, response, max_length=8, max_prompt_length=4, where="x") == (
        [tok.bos_id] + p[-3:] + r[:4], 4, True)  # bos kept, the prompt's end, the response's start
    # no max_prompt_length: the prompt keeps max_length less one tokens, so the response keeps one
    assert encode_example(tok, prompt, response, max_length=len(p) + 1, max_prompt_length=None,
                          where="x") == ([tok.bos_id] + p[-(len(p) - 1):] + r[:1], len(p), True)
    # bos alone fills max_length
    with pytest.raises(DataError, match="x: field 'prompt': 1 tokens leave no room"):
        encode_example(tok, prompt, response, max_length=1, max_prompt_length=None, where="x")


def test_collate_right_pads_and_masks_prompt_and_pad_labels():
    batch = collate([([2, 10, 11, 12, 3], 2), ([2, 20, 3], 1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 10, 11, 12, 3], [2, 20, 3, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    I = IGNORE_INDEX
    assert batch["labels"].tolist() == [[I, I, 11, 12, 3], [I, 20, 3, I, I]]
    trimmed = take(batch, torch.tensor([1]))
    assert trimmed["input_ids"].tolist() == [[2, 20, 3]]


def test_plain_text_records_are_labelled_everywhere_but_bos(tmp_path, tok):
    path = _write(tmp_path / "t.jsonl", [{"text": "i saw the film ."}])
    (example,) = load_sft(path)
    assert example == Example("", "", f"{path}:1", text="i saw the film .")
    labels = tokenize_sft([example], tok, 64, None)["labels"][0].tolist()
    assert labels == [IGNORE_INDEX] + tok.encode("i saw the film .") + [tok.eos_id]


RECORD_OF_KIND = {"sft": {"prompt": "the movie", "completion": "was great ."},
                  "preference": {"prompt": "the movie", "chosen": "was great .", "rejected": "was dull ."},
                  "prompts": {"prompt": "the movie"}}
BOM = b"\xef\xbb\xbf"


def bom_then_bad_byte(path, record: dict, bad_line: bool = True) -> str:
    """A JSONL file saved with a UTF-8 byte-order mark; with bad_line, line 2 holds the byte 0xff
    (not UTF-8) at its 15th byte."""
    line = json.dumps(record).encode()
    second = line[:14] + b"\xff" + line[14:] if bad_line else line
    path.write_bytes(BOM + line + b"\n" + second + b"\n")
    return str(path)


@pytest.mark.parametrize("kind", RECORD_OF_KIND)
def test_check_accepts_a_byte_order_mark_and_names_the_line_of_a_bad_byte(kind, tmp_path, capsys):
    import data
    assert data.main(["--check", bom_then_bad_byte(tmp_path / "good.jsonl", RECORD_OF_KIND[kind],
                                                   bad_line=False),
                      "--kind", kind]) == 0
    assert f"ok: 2 {kind} records" in capsys.readouterr().out
    path = bom_then_bad_byte(tmp_path / "bad.jsonl", RECORD_OF_KIND[kind])
    assert data.main(["--check", path, "--kind", kind]) == 2
    assert capsys.readouterr().err == f"error: {path}:2: invalid UTF-8 (byte 0xff at byte 15)\n"


def test_check_through_the_shell_exits_2_with_one_line(tmp_path):
    from conftest import run_python
    path = bom_then_bad_byte(tmp_path / "bad.jsonl", RECORD_OF_KIND["sft"])
    r = run_python("data.py", "--check", path, "--kind", "sft")
    assert r.returncode == 2 and r.stderr == f"error: {path}:2: invalid UTF-8 (byte 0xff at byte 15)\n"


def test_the_count_of_cut_records_is_printed_once_per_dataset(tmp_path, tok, capsys):
    from data import tokenize_pairs
    sft = _write(tmp_path / "sft.jsonl", [
        {"prompt": "the movie", "completion": "was great ."},  # fits in 8
        {"prompt": "i loved the film . the plot was", "completion": "great ."},  # prompt cut
        {"prompt": "i saw", "completion": "the film . the acting was dull ."}])  # response cut
    pairs = _write(tmp_path / "pairs.jsonl", [
        {"prompt": "the movie", "chosen": "was great .", "rejected": "was dull ."},
        {"prompt": "the movie", "chosen": "was fun . i loved it .", "rejected": "was dull . i hated it ."}])
    tokenize_sft(load_sft(sft), tok, 8, 4)
    tokenize_pairs(load_preferences(pairs), tok, 8, None)
    assert capsys.readouterr().err == (f"note: 2 of 3 records in {sft} were cut to fit --max_length 8 / "
                                       "--max_prompt_length 4\n"
                                       f"note: 1 of 2 records in {pairs} were cut to fit --max_length 8\n")
    tokenize_sft(load_sft(sft), tok, 64, None)  # nothing cut: nothing to say
    # under torchrun, every process but one
    tokenize_pairs(load_preferences(pairs), tok, 8, None, verbose=False)
    assert capsys.readouterr().err == ""
