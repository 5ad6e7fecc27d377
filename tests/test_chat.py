"""Chat templates against transformers' apply_chat_template (text and token ids), labels on the
assistant's tokens only, prompt + response = the whole conversation, whole-turn truncation,
templates read from and written to folders, and one-line errors for bad chat records.

    python -m pytest -q tests/test_chat.py
"""
import json
import os
from pathlib import Path

import pytest
import transformers

import chat
import rollout
from conftest import run_python
from data import Example, Pair, encode_sft, load_preferences, load_sft, tokenize_pairs
from files import DataError
from hf import load_tokenizer, tokenizer_files
from tokenizer import Tokenizer

# HuggingFaceH4/zephyr-7b-beta's template as its tokenizer_config.json publishes it: the reference
# for the built-in one
ZEPHYR_PUBLISHED = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
# SmolLM2-Instruct's ChatML template, with its default system message
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-2-chat's way of refusing a conversation: raise_exception from inside the template
STRICT = ("{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
          "{% endif %}"
          "{{ bos_token + message['content'] + eos_token }}{% endfor %}")

# Today's families, each in the style of its published template (these are the tests' own, written
# to render what the real ones render for these conversations). Llama 3.1/3.2: a header per turn, a
# system turn with the date always, turns trimmed, ended by <|eot_id|>
LLAMA3 = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + strftime_now('%d %b %Y') + '\n\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
# Gemma 3: no system role (its text is folded into the first user turn), roles must alternate, the
# assistant is "model", turns end with <end_of_turn>
GEMMA3 = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")
# Phi-4-mini: <|role|>text<|end|>, and an eos closing a conversation that asks for no reply
PHI4 = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
# Qwen3: ChatML, and a reasoning block in the replies after the last user turn only, so a reply
# renders differently once a later user turn follows it; its text marked as the assistant's with
# transformers' {% generation %} tag, as SmolLM3's template marks it
QWEN3 = (
    "{%- set ns = namespace(last_query_index=0) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query_index = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- else %}{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\n' }}{% generation %}"
    "{%- if loop.index0 > ns.last_query_index %}{{- '<think>\n' + reasoning + '\n</think>\n\n' }}{%- endif %}"
    "{{- content + '<|im_end|>' }}{% endgeneration %}{{- '\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
# OLMo 2 Instruct (Tulu's): <|role|> lines, a reply ended by eos, with a newline after it unless last
OLMO2 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
         "{{ '<|system|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'user' %}"
         "{{ '<|user|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}"
         "{% if not loop.last %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
         "{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}{% endif %}"
         "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}")
FAMILY_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|end|>"]

CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "Hello, how are you?"},
                 {"role": "assistant", "content": "I am fine."}],
    "system": [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "The capital of France?"},
               {"role": "assistant", "content": "Paris."}],
    "multi_turn": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"},
                   {"role": "assistant", "content": "Hello! How are you?"},
                   {"role": "user", "content": "I am fine."},
                   {"role": "assistant", "content": "The capital of France is Paris. Café, déjà vu 😀"}],
}
# the folder's eos token and bos token, as the base models' folders have them
EOS = {"zephyr": "</s>", "chatml": "<|im_end|>", "qwen": "<|endoftext|>", "llama3": "<|end_of_text|>", "gemma3": "<eos>",
       "phi4": "<|endoftext|>", "qwen3": "<|endoftext|>", "olmo2": "<|endoftext|>"}
BOS = dict(llama3="<|begin_of_text|>", gemma3="<bos>")
# where an assistant turn ends
END_OF_TURN = {"zephyr": "</s>", "chatml": "<|im_end|>", "qwen": "<|im_end|>", "llama3": "<|eot_id|>",
               "gemma3": "<end_of_turn>", "phi4": "<|end|>", "qwen3": "<|im_end|>", "olmo2": "<|endoftext|>"}
# qwen: Qwen2.5 base, eos != end of turn
TEMPLATES = {"zephyr": chat.ZEPHYR_TEMPLATE, "chatml": CHATML, "qwen": CHATML, "llama3": LLAMA3, "gemma3": GEMMA3,
             "phi4": PHI4, "qwen3": QWEN3, "olmo2": OLMO2}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """template name -> a tokenizer folder (byte-level BPE tokenizer.json) whose tokenizer_config
    carries the reference template: the published Zephyr one, or ChatML."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    root = tmp_path_factory.mktemp("chat")
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(m["content"] for c in CONVERSATIONS.values() for m in c) * 30
                      + "\nsystem user assistant\n")
    out = {}
    for family in (False, True):  # the older templates' tokenizer, and one with today's families' tokens
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        special = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"] + FAMILY_SPECIAL * family
        tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        if family:
            tok.add_tokens(["<think>", "</think>"])  # Qwen3's: added tokens, not special ones
        names = ("llama3", "gemma3", "phi4", "qwen3", "olmo2") if family else ("zephyr", "chatml", "qwen")
        for name in names:
            folder = root / name
            folder.mkdir()
            tok.save(str(folder / "tokenizer.json"))
            (folder / "tokenizer_config.json").write_text(json.dumps(dict(
                tokenizer_class="PreTrainedTokenizerFast", bos_token=BOS.get(name, "<s>"), eos_token=EOS[name],
                chat_template=ZEPHYR_PUBLISHED if name == "zephyr" else TEMPLATES[name])))
            out[name] = str(folder)
    return out


def ours(folder: str, name: str) -> Tokenizer:
    """The folder's tokenizer with our template of that name (the built-in Zephyr, or ChatML)."""
    return Tokenizer(**{**load_tokenizer(folder, {}).state(), "chat_template": TEMPLATES[name]})


def reference_ids(hf_tok, messages, **kwargs) -> list[int]:
    return list(hf_tok.apply_chat_template(messages, tokenize=True, **kwargs)["input_ids"])


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_rendering_and_token_ids_equal_apply_chat_template(folders, name, conversation):
    messages = CONVERSATIONS[conversation]
    hf_tok = transformers.AutoTokenizer.from_pretrained(folders[name])
    tok = ours(folders[name], name)
    for prefix in (messages, messages[:-1]):  # the whole conversation, and the prompt before the last reply
        for generation_prompt in (False, True):
            text = chat.render(tok.chat_template, prefix, tok.special_tokens(), generation_prompt)
            assert text == hf_tok.apply_chat_template(prefix, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
            assert tok.encode_with_offsets(text)[0] == reference_ids(hf_tok, prefix,
                                                                     add_generation_prompt=generation_prompt)


def test_the_folders_own_template_is_read_and_rendered_as_transformers_renders_it(folders):
    tok = load_tokenizer(folders["zephyr"], {})
    assert tok.chat_template == ZEPHYR_PUBLISHED
    hf_tok = transformers.AutoTokenizer.from_pretrained(folders["zephyr"])
    messages = CONVERSATIONS["multi_turn"]
    assert (chat.render(tok.chat_template, messages, tok.special_tokens())
            == hf_tok.apply_chat_template(messages, tokenize=False))
    assert tok.encode_prompt("Hello world") == reference_ids(hf_tok,
                                                             [{"role": "user", "content": "Hello world"}],
                                                             add_generation_prompt=True)


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_labels_cover_exactly_the_assistant_turns(folders, name, conversation):
    messages = CONVERSATIONS[conversation]
    tok = ours(folders[name], name)
    ids, labelled, _ = encode_sft(tok, Example("", "", "x:1", messages), max_length=1000,
                                  max_prompt_length=None)
    runs, current = [], []
    for i, on in zip(ids, labelled):
        if on:
            current.append(i)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    # every assistant turn, as the template writes it after the generation prompt, up to and including its
    # end-of-turn token: the newline the template writes after it is never generated, so carries no loss
    replies = [m["content"] + END_OF_TURN[name] for m in messages if m["role"] == "assistant"]
    if name == "qwen3":  # the reply after the last user turn has a reasoning block, empty here
        replies[-1] = "<think>\n\n</think>\n\n" + replies[-1]
    assert [tok.hf.decode(r, skip_special_tokens=False) for r in runs] == replies


@pytest.mark.parametrize("name", TEMPLATES)
def test_prompt_plus_response_is_the_whole_conversation_up_to_eos(folders, name):
    messages = CONVERSATIONS["multi_turn"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(folders[name])
    tok = ours(folders[name], name)
    pair = Pair("", messages[-1]["content"], "No.", "x:1", messages[:-1])
    data = tokenize_pairs([pair], tok, max_length=1000, max_prompt_length=None)
    whole = reference_ids(hf_tok, messages)
    prompt = reference_ids(hf_tok, messages[:-1], add_generation_prompt=True)
    n = int(data["chosen_attention_mask"].sum())
    chosen = data["chosen_input_ids"][0, :n].tolist()
    end_of_turn = tok.hf.token_to_id(END_OF_TURN[name])
    assert chosen == whole[:whole.index(end_of_turn, len(prompt)) + 1]  # what follows is never generated
    # the generation prompt ends the prompt
    assert (data["chosen_labels"][0, :n] == -100).sum() == len(prompt)
    if name == "zephyr":
        assert hf_tok.decode(prompt).endswith("<|assistant|>\n")


def test_stop_ids_are_the_eos_and_the_templates_end_of_turn_token(folders, tmp_path):
    """Qwen2.5 base: eos <|endoftext|>, turns end <|im_end|>; both stop generation, and an export
    writes both into generation_config.json, which transformers reads back as its eos list."""
    tok = load_tokenizer(folders["qwen"], {})
    eos, end_of_turn = tok.hf.token_to_id("<|endoftext|>"), tok.hf.token_to_id("<|im_end|>")
    assert (tok.eos_id, tok.end_of_turn_id) == (eos, end_of_turn)
    assert tok.stop_ids == sorted([eos, end_of_turn])
    assert load_tokenizer(folders["zephyr"], {}).stop_ids == [load_tokenizer(folders["zephyr"], {}).eos_id]
    assert Tokenizer(**{**tok.state(), "chat_template": None}).stop_ids == [eos]  # no template: eos alone
    # stops never decode
    assert tok.decode([tok.hf.token_to_id("<|im_start|>"), end_of_turn]) == "<|im_start|>"


def test_a_conversational_prompt_completion_record_carries_loss_on_its_completion_only(folders):
    """TRL's {"prompt": [messages], "completion": [messages]}: an assistant turn inside the prompt
    is context, not a target."""
    tok = ours(folders["chatml"], "chatml")
    messages = CONVERSATIONS["multi_turn"]
    ids, labelled, _ = encode_sft(tok, Example("", "", "x:1", messages, prompt_turns=4), 1000, None)
    assert tok.hf.decode([i for i, on in zip(ids, labelled) if on], skip_special_tokens=False) == (
        messages[-1]["content"] + "<|im_end|>")
    all_turns, _, _ = encode_sft(tok, Example("", "", "x:1", messages), 1000, None)
    assert all_turns == ids  # the same tokens: only the labels differ


def test_truncation_keeps_whole_turns(folders):
    tok = ours(folders["zephyr"], "zephyr")
    messages = CONVERSATIONS["multi_turn"]
    special = tok.special_tokens()
    full, *_ = encode_sft(tok, Example("", "", "x:1", messages), 1000, None)
    first_three = tok.encode_with_offsets(chat.render(tok.chat_template, messages[:3], special))[0]
    # a conversation too long for max_length ends with the last assistant turn that fits whole, up to
    # its stop token: the newline the template writes after it is not part of the turn
    ids, labelled, _ = encode_sft(tok, Example("", "", "x:1", messages), len(full) - 1, None)
    assert ids == full[:-1] and labelled[-1]
    ids, labelled, _ = encode_sft(tok, Example("", "", "x:1", messages), len(full) - 2, None)
    assert ids == first_three[:-1] and labelled[-1] and ids[-1] == tok.eos_id
    longer = messages + [{"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "Bye."}]
    full_longer, *_ = encode_sft(tok, Example("", "", "x:1", longer), 1000, None)
    ids, *_ = encode_sft(tok, Example("", "", "x:1", longer), len(full_longer) - 2, None)
    assert ids == full[:-1]  # two of three assistant turns fit whole: both are kept
    # a prompt too long for max_prompt_length loses its oldest turns, the system message kept
    pair = Pair("", "Paris.", "Rome.", "x:1", messages[:4])
    kept = [messages[0], messages[3]]
    kept_prompt = tok.encode_with_offsets(chat.render(tok.chat_template, kept, special,
                                                      add_generation_prompt=True))[0]
    data = tokenize_pairs([pair], tok, max_length=1000, max_prompt_length=len(kept_prompt))
    n = int(data["chosen_attention_mask"].sum())
    # the newline after eos goes
    assert data["chosen_input_ids"][0, :n].tolist() == tok.encode_with_offsets(chat.render(
        tok.chat_template, kept + [{"role": "assistant", "content": "Paris."}], special))[0][:-1]
    # turns go one exchange at a time, oldest first: with three user turns the limit that fits the
    # last two keeps both
    three = messages[:4] + [{"role": "assistant", "content": "Good."}, {"role": "user", "content": "Bye."}]
    last_two = [three[0]] + three[3:]
    limit = len(tok.encode_with_offsets(chat.render(tok.chat_template, last_two, special,
                                                    add_generation_prompt=True))[0])
    data = tokenize_pairs([Pair("", "Paris.", "Rome.", "x:1", three)], tok, max_length=1000,
                          max_prompt_length=limit)
    assert (data["chosen_labels"][0] == -100).sum() - (data["chosen_attention_mask"][0] == 0).sum() == limit


def test_export_writes_the_template_and_transformers_renders_it(folders, tmp_path):
    tok = ours(folders["chatml"], "chatml")
    for name, content in tokenizer_files(tok).items():
        ((tmp_path / name).write_text(content) if isinstance(content, str)
         else (tmp_path / name).write_bytes(content))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = CONVERSATIONS["system"]
    assert (hf_tok.apply_chat_template(messages, tokenize=False)
            == chat.render(CHATML, messages, tok.special_tokens()))
    assert load_tokenizer(str(tmp_path), {}).chat_template == CHATML


def test_the_chat_toy_task_is_conversations_whose_reply_is_labelled(tmp_path):
    from toy import ToyConfig, prepare_toy_data
    prepare_toy_data(str(tmp_path), ToyConfig(n_sft_train=200, n_sft_val=20, n_prompts_train=10,
                                              n_prompts_val=10, chat=True),
                     verbose=False)
    example = load_sft(str(tmp_path / "sft_train.jsonl"))[0]
    assert [m["role"] for m in example.messages] == ["user", "assistant"]
    tok = Tokenizer.load(str(tmp_path / "tokenizer.model")).with_chat_template("auto", chat_data=True)
    ids, labelled, _ = encode_sft(tok, example, 200, None)
    reply = [i for i, on in zip(ids, labelled) if on]
    assert tok.decode(reply) == example.messages[1]["content"]  # eos is special: decode drops it
    # Zephyr's end of turn; the newline after it is not generated, so not labelled
    assert reply[-1] == tok.eos_id
    assert ids[len(ids) - 1] == tok.encode("\n")[0] and not labelled[-1]
    prompt = ids[:labelled.index(True)]
    assert prompt == tok.encode_prompt(example.messages[0]["content"])  # what sampling feeds the model
    assert [tok.token_text(i) for i in prompt] == ["<|user|>", "\n", *[tok.token_text(i) for i in tok.encode(
        example.messages[0]["content"])], "</s>", "\n", "<|assistant|>", "\n"]


BAD_SFT = {
    "missing_role": ('{"messages": [{"content": "hi"}]}',
                     "field 'messages[0]': expected {\"role\", \"content\"} strings ('role' missing)"),
    "unknown_role": ('{"messages": [{"role": "bot", "content": "hi"}]}',
                     "field 'messages[0].role': unknown role 'bot'"),
    "no_assistant": ('{"messages": [{"role": "user", "content": "hi"}]}',
                     "field 'messages': no assistant turn"),
    "not_a_list": ('{"messages": "hi"}', "field 'messages': expected a non-empty list of messages"),
}
BAD_PAIRS = {
    "not_ending_with_assistant": ('{"chosen": [{"role": "user", "content": "q"}, '
                                  '{"role": "assistant", "content": "a"}, '
                                  '{"role": "user", "content": "b"}], '
                                  '"rejected": [{"role": "user", "content": "q"}, '
                                  '{"role": "assistant", "content": "c"}]}',
                                  "field 'chosen': last message is not from the assistant"),
    "different_prompts": ('{"chosen": [{"role": "user", "content": "q"}, '
                          '{"role": "assistant", "content": "a"}], '
                          '"rejected": [{"role": "user", "content": "r"}, '
                          '{"role": "assistant", "content": "c"}]}',
                          "field 'rejected': its conversation differs from 'chosen'"),
}


@pytest.mark.parametrize("case", BAD_SFT)
def test_bad_chat_sft_records_name_file_line_and_field(case, tmp_path):
    record, message = BAD_SFT[case]
    path = tmp_path / "x.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q"}, '
                    '{"role": "assistant", "content": "a"}]}\n' + record + "\n")
    with pytest.raises(DataError) as e:
        load_sft(str(path))
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)


@pytest.mark.parametrize("case", BAD_PAIRS)
def test_bad_chat_preference_records_name_file_line_and_field(case, tmp_path):
    record, message = BAD_PAIRS[case]
    path = tmp_path / "x.jsonl"
    path.write_text(record + "\n")
    with pytest.raises(DataError, match=f"{path}:1: {message}"):
        load_preferences(str(path))


def test_a_template_that_refuses_a_conversation_stops_train_sft_with_one_line(tmp_path, toy_dir):
    (tmp_path / "strict.jinja").write_text(STRICT)
    data = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "the movie"},
                         {"role": "assistant", "content": "was great ."}]}
    bad = {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "was great ."}]}
    data.write_text("\n".join(json.dumps(r) for r in [good] * 30 + [bad]) + "\n")
    out = tmp_path / "run"
    result = run_python("train_sft.py", f"--train_file={data}", f"--tokenizer={toy_dir}/tokenizer.model",
                        f"--chat_template={tmp_path / 'strict.jinja'}", f"--out_dir={out}", "--device=cpu",
                        "--max_iters=1")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {data}:31: field 'messages': the chat template "
                                     f"(--chat_template {tmp_path / 'strict.jinja'}) refused the "
                                     "conversation: "
                                     "Conversation roles must alternate user/assistant/user/assistant/...")
    assert not os.path.exists(out)


def test_a_template_whose_generation_prompt_does_not_begin_the_reply_is_refused(folders):
    odd = ("{% for m in messages %}"
           "{{ ('<|bot|>' if m['role'] == 'assistant' else '<|user|>') + m['content'] }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    tok = Tokenizer(**{**load_tokenizer(folders["zephyr"], {}).state(), "chat_template": odd})
    with pytest.raises(DataError, match="x:1: field 'prompt': the chat template's generation prompt is not "
                                        "how it begins"):
        tokenize_pairs([Pair("Hello", "Hi.", "No.", "x:1")], tok, 100, None)
    with pytest.raises(DataError, match="x:1: field 'messages': the chat template's generation prompt is not "
                                        "how it begins"):
        encode_sft(tok, Example("", "", "x:1", CONVERSATIONS["one_turn"]), 100, None)


def test_chat_template_choice_keeps_the_models_own_overrides_it_or_reads_a_file(folders, tmp_path):
    tok = load_tokenizer(folders["chatml"], {})
    assert tok.with_chat_template("auto", chat_data=True).chat_template == CHATML  # the model's own wins
    assert tok.with_chat_template("zephyr", chat_data=True).chat_template == chat.ZEPHYR_TEMPLATE
    assert tok.with_chat_template("none", chat_data=False).chat_template is None
    (tmp_path / "t.jinja").write_text(STRICT)
    assert tok.with_chat_template(str(tmp_path / "t.jinja"), chat_data=True).chat_template == STRICT
    plain = Tokenizer(**{**tok.state(), "chat_template": None})
    assert plain.with_chat_template("auto", chat_data=True).chat_template == chat.ZEPHYR_TEMPLATE
    assert plain.with_chat_template("auto", chat_data=False).chat_template is None
    with pytest.raises(DataError, match="the data holds conversations but --chat_template none"):
        tok.with_chat_template("none", chat_data=True)


def test_a_template_saved_by_transformers_as_chat_template_jinja_is_read(folders, tmp_path):
    hf_tok = transformers.AutoTokenizer.from_pretrained(folders["chatml"])
    hf_tok.save_pretrained(str(tmp_path))
    assert (tmp_path / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert load_tokenizer(str(tmp_path), {}).chat_template == CHATML


def test_an_ultrafeedback_conversation_keeps_every_turn_before_the_responses(tmp_path):
    turns = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
             {"role": "user", "content": "q2"}]
    path = tmp_path / "uf.jsonl"
    path.write_text(json.dumps({"prompt": "q2", "chosen": turns + [{"role": "assistant", "content": "good"}],
                                "rejected": turns + [{"role": "assistant", "content": "bad"}]}) + "\n")
    (pair,) = load_preferences(str(path))
    assert pair.prompt_messages == turns and (pair.chosen, pair.rejected) == ("good", "bad")


def _fits_whole(tok, messages, limit) -> bool:
    """Whether the prompt `messages` renders to at most `limit` tokens."""
    return len(tok.encode_with_offsets(chat.render(tok.chat_template, messages, tok.special_tokens(),
                                                   True))[0]) <= limit


@pytest.mark.parametrize("name", ["zephyr", "chatml"])
def test_a_last_user_turn_too_long_is_cut_on_the_left_the_system_message_kept(folders, name, capsys):
    tok = ours(folders[name], name)
    system, reply = {"role": "system", "content": "Be brief."}, "Paris."
    content = "Hello world, how are you? I am fine. The capital of France?"
    user = lambda text: {"role": "user", "content": text}
    empty = len(tok.encode_with_offsets(chat.render(tok.chat_template, [system, user("")],
                                                    tok.special_tokens(), True))[0])
    limit = empty + 5  # room for a few tokens of the user's text
    data = tokenize_pairs([Pair("", reply, "Rome.", "x:1", [system, user(content)])], tok, 1000, limit)
    n = int(data["chosen_attention_mask"][0].sum())
    ids, n_prompt = (data["chosen_input_ids"][0, :n].tolist(),
                     int((data["chosen_labels"][0, :n] == -100).sum()))
    # the kept text is the longest end of the user's text that fits, and the sequence is exactly the
    # template's rendering of the conversation with that text, up to the reply's end-of-turn token
    kept = next(content[j:] for j in range(len(content) + 1)
                if _fits_whole(tok, [system, user(content[j:])], limit))
    assert 0 < len(kept) < len(content)
    whole = tok.encode_with_offsets(chat.render(tok.chat_template,
                                                [system, user(kept), {"role": "assistant", "content": reply}],
                                                tok.special_tokens()))[0]
    assert ids == whole[:whole.index(tok.hf.token_to_id(END_OF_TURN[name]), n_prompt) + 1]
    assert n_prompt <= limit
    assert tok.hf.decode(ids, skip_special_tokens=False).startswith(
        chat.render(tok.chat_template, [system], tok.special_tokens()))
    assert capsys.readouterr().err == (f"note: 1 of 1 records in x were cut to fit --max_length 1000 / "
                                       f"--max_prompt_length {limit}\n")


def test_a_chat_prompt_that_cannot_fit_even_with_its_user_turn_emptied_is_refused_naming_the_line(
        folders, tmp_path):
    tok = ours(folders["chatml"], "chatml")
    system = {"role": "system", "content": "Be brief. " * 20}
    turns = lambda reply: [system, {"role": "user", "content": "Hello"},
                           {"role": "assistant", "content": reply}]
    path = tmp_path / "uf.jsonl"
    path.write_text("\n".join(json.dumps({"chosen": turns("Yes."), "rejected": turns(r)})
                              for r in ("No.", "Maybe.")) + "\n")
    with pytest.raises(DataError, match=f"{path}:1: field 'prompt': the prompt is longer than 20 tokens .* "
                                        "even with its last user turn emptied"):
        tokenize_pairs(load_preferences(str(path)), tok, 1000, 20)


@pytest.mark.parametrize("name", ["zephyr", "chatml"])
def test_a_conversation_whose_first_reply_starts_past_max_length_has_its_user_turn_cut(folders, name,
                                                                                       tmp_path):
    tok = ours(folders[name], name)
    special = tok.special_tokens()
    system, reply = {"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Paris."}
    content = "Hello world, how are you? I am fine. The capital of France?"
    user = lambda text: {"role": "user", "content": text}
    prompt_tokens = lambda text: len(tok.encode_with_offsets(
        chat.render(tok.chat_template, [system, user(text)], special, True))[0])
    max_length = prompt_tokens("") + 6
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": [system, user(content), reply]}) + "\n"
                    + json.dumps({"messages": [{"role": "system", "content": "Be brief. " * 20},
                                               user("Hi"), reply]}) + "\n")
    first, second = load_sft(str(path))
    ids, labelled, cut = encode_sft(tok, first, max_length, None)
    # the longest end of the user's text after which the reply starts within max_length, system kept
    kept = next(content[j:] for j in range(len(content) + 1) if prompt_tokens(content[j:]) < max_length)
    assert cut and 0 < len(kept) < len(content)
    assert ids == tok.encode_with_offsets(chat.render(tok.chat_template, [system, user(kept), reply],
                                                      special))[0][:max_length]
    assert labelled.index(True) == prompt_tokens(kept) < max_length
    with pytest.raises(DataError, match=f"{path}:2: field 'messages': the prompt is longer than "
                                        f"{max_length - 1} tokens .* even with its last user turn emptied"):
        encode_sft(tok, second, max_length, None)


def test_a_plain_text_record_is_never_templated_and_carries_loss_on_all_of_it(folders, tmp_path):
    """{"text"} is text to continue pretraining on, as TRL reads it: bos, the text, eos, whatever
    chat template the folder has; only bos carries no loss; a long one keeps its start."""
    tok = ours(folders["chatml"], "chatml")
    text = "The capital of France is Paris. Café, déjà vu"
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    (record,) = load_sft(str(path))
    ids, no_loss, cut = encode_sft(tok, record, 1000, None)
    assert (ids == [tok.bos_id] * tok.add_bos + tok.encode(text) + [tok.eos_id] and no_loss == tok.add_bos
            and not cut)
    assert encode_sft(tok, record, 5, None) == (ids[:5], no_loss, True)


def long_prompt(n_turns: int) -> list[dict]:
    """A system message, then n_turns user/assistant exchanges, ending in a user turn."""
    turns = [{"role": "system", "content": "Be brief."}]
    for i in range(n_turns):
        turns += [{"role": "user", "content": f"Hello world {i}, how are you?"},
                  {"role": "assistant", "content": f"I am fine {i}."}]
    return turns + [{"role": "user", "content": "The capital of France?"}]


@pytest.mark.parametrize("limit", [40, 60, 200, 500])
def test_pairs_sft_conversations_and_ppo_prompts_cut_a_long_prompt_one_way(folders, limit):
    """One truncation rule: a multi-turn prompt loses its oldest turns, the system message kept,
    and the same prompt comes out the same as a DPO pair's, a conversational prompt-completion SFT
    record's (not refused) and a PPO prompt's."""
    tok = ours(folders["chatml"], "chatml")
    prompt, reply = long_prompt(6), {"role": "assistant", "content": "Paris."}
    full = tok.encode_prompt(prompt)
    assert (len(full) > limit) == (limit < 500)
    pair_ids, n_prompt, pair_cut = chat.encode_prompt_response(tok, prompt, reply["content"], 1000, limit)
    sft_ids, labelled, sft_cut = encode_sft(tok, Example("", "", "x:1", prompt + [reply],
                                                         prompt_turns=len(prompt)), 1000, limit)
    (ppo_ids,) = rollout.encode_prompts(tok, [prompt], limit, verbose=False)
    assert pair_cut == sft_cut == (limit < 500) and len(ppo_ids) <= limit and n_prompt <= limit
    assert ppo_ids == pair_ids[:n_prompt] == sft_ids[:n_prompt] and labelled.index(True) == n_prompt
    assert sft_ids[:len(pair_ids)] == pair_ids
    # never lost: the system message, the reply's header
    text = tok.hf.decode(ppo_ids, skip_special_tokens=False)
    assert text.startswith(chat.render(tok.chat_template, prompt[:1], tok.special_tokens()))
    assert text.endswith("France?<|im_end|>\n<|im_start|>assistant\n")
    # whole turns go first: the system and the most of the newest turns that fit, rendered anew
    kept = next((prompt[:1] + prompt[i:] for i in range(1, len(prompt), 2)
                 if len(tok.encode_prompt(prompt[:1] + prompt[i:])) <= limit), None)
    if kept is not None:
        assert ppo_ids == tok.encode_prompt(kept) and (len(kept) < len(prompt)) == (limit < 500)
    else:  # then the last user turn's text, from its start
        assert text.count("<|im_start|>user") == 1 and "The capital" not in text and limit == 40


@pytest.mark.parametrize("name", ["llama3", "gemma3", "phi4", "qwen3", "olmo2"])
def test_each_familys_end_of_turn_token_joins_its_eos_in_the_stop_set(folders, name):
    """Found by rendering the probe conversation with the folder's own template: Llama 3's <|eot_id|>,
    Gemma's <end_of_turn>, Phi's <|end|>, Qwen3's <|im_end|>, each beside the base model's eos;
    OLMo 2's replies end with its eos, the one stop."""
    tok = load_tokenizer(folders[name], {})
    eos, end_of_turn = tok.hf.token_to_id(EOS[name]), tok.hf.token_to_id(END_OF_TURN[name])
    assert (tok.eos_id, tok.end_of_turn_id) == (eos, end_of_turn) and (eos != end_of_turn) == (name != "olmo2")
    assert tok.stop_ids == sorted({eos, end_of_turn})


def test_multi_turn_labels_under_qwen3s_template_are_transformers_assistant_mask(folders):
    """Qwen3's template drops the reasoning block of a reply once a user turn follows it, so a reply
    cannot be cut out of a rendering of the conversation up to it; labelled in the whole rendering,
    the tokens are those transformers marks from the template's {% generation %} blocks."""
    messages = CONVERSATIONS["multi_turn"] + [{"role": "user", "content": "Thanks."},
                                              {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nBye."}]
    tok = load_tokenizer(folders["qwen3"], {})
    ids, labelled, _ = encode_sft(tok, Example("", "", "x:1", messages), max_length=1000, max_prompt_length=None)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folders["qwen3"])
    reference = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    assert ids == list(reference["input_ids"])
    assert labelled == [bool(m) for m in reference["assistant_masks"]]
    assert "<think>\nEasy.\n</think>" in hf_tok.decode([i for i, on in zip(ids, labelled) if on])


SYSTEM_REQUIRED = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('A system message is required') }}"
                   "{% endif %}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}")


def test_a_template_that_fails_the_stop_token_probe_is_one_line_and_chat_template_none_still_loads(folders, tmp_path,
                                                                                                     capsys):
    import sample
    from test_hf import write_model, FAMILIES
    folder = tmp_path / "model"
    write_model(str(folder), FAMILIES["qwen2"]())
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (folder / file).write_text((Path(folders["chatml"]) / file).read_text())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": SYSTEM_REQUIRED}))
    tok = load_tokenizer(str(folder), {})
    with pytest.raises(DataError, match="A system message is required.*--chat_template none"):
        tok.with_chat_template("auto", chat_data=True)
    assert tok.with_chat_template("none", chat_data=False).chat_template is None
    assert tok.with_chat_template("zephyr", chat_data=True).chat_template == chat.ZEPHYR_TEMPLATE
    capsys.readouterr()
    assert sample.main([f"--ckpt={folder}", "--prompt=Hello", "--device=cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "A system message is required" in err[0]
    assert sample.main([f"--ckpt={folder}", "--prompt=Hello", "--n=1", "--max_new_tokens=2", "--device=cpu",
                        "--chat_template=none"]) == 0
