"""tokenizer.py: exact round trips, the toy's special ids, a conversation prompt through a template.

    python -m pytest -q tests/test_tokenizer.py
"""
import pytest

from files import DataError
from tokenizer import Tokenizer


@pytest.mark.parametrize("text", [
    "the movie was not very great .", "  leading and  double  spaces ", "héllo wörld ✓ 日本",
    "\n\nHuman: hi\n\nAssistant: tabs\there", "",
])
def test_tokenizer_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_has_fixed_special_ids_and_each_toy_word_is_one_piece(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert len(tok.encode("the dialogue was not truly delightful .")) == 7
    assert (tok.decode([tok.bos_id] + tok.encode("i saw the film .") + [tok.eos_id, tok.pad_id])
            == "i saw the film .")


def test_a_conversation_prompt_renders_as_a_string_prompt_does_and_needs_a_template(tok):
    import chat
    zephyr = Tokenizer(**{**tok.state(), "chat_template": chat.ZEPHYR_TEMPLATE})
    assert zephyr.encode_prompt([{"role": "user", "content": "hi"}]) == zephyr.encode_prompt("hi")
    text = zephyr.decode(zephyr.encode_prompt([{"role": "system", "content": "be kind"},
                                               {"role": "user", "content": "hi"}]))
    # " ": the toy's word-boundary piece after eos
    assert text.startswith("<|system|>\nbe kind") and text.endswith("<|user|>\nhi \n<|assistant|>\n")
    with pytest.raises(DataError, match="needs a chat template"):
        tok.encode_prompt([{"role": "user", "content": "hi"}])


def test_a_vocabulary_too_small_to_train_is_one_line_naming_the_flag(tmp_path):
    """byte fallback needs 256 pieces and each character of the text one more: sentencepiece's
    RuntimeError (a traceback from train_sft.py on a small --vocab_size) becomes one DataError."""
    from files import DataError
    corpus = tmp_path / "sums.txt"
    corpus.write_text("1+2= 3\n4+5= 9\n" * 50)
    with pytest.raises(DataError, match=r"--vocab_size 64: sentencepiece cannot train on this text: Vocabulary size is "
                                        r"smaller than required_chars. 64 vs \d+"):
        Tokenizer.train(str(corpus), 64)
    assert Tokenizer.train(str(corpus), 300).vocab_size <= 300
