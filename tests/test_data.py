"""kimi_hf.data: the byte-level tokenizer and the offline corpus that the demo, tests and recipes use."""

from __future__ import annotations

import sys

import pytest
from kimi_linear_utils import run_python

import kimi_hf  # noqa: F401 (registers ByteTokenizer for auto_map)
from kimi_hf.data import ByteTokenizer, stdlib_corpus


def test_round_trip_of_any_utf8_text_and_the_special_tokens():
    tokenizer = ByteTokenizer()
    text = "héllo, wörld ✓ \x00\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 1 + len(text.encode("utf-8"))
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # special tokens keep their text unless skipped (they were dropped either way)
    assert tokenizer.decode([1, 107, 2, 0]) == "<s>h</s><pad>"
    assert tokenizer.decode([1, 107, 2, 0], skip_special_tokens=True) == "h"
    with pytest.raises(ValueError, match="no token"):
        tokenizer.convert_tokens_to_ids("ab")


def test_padding_and_batches():
    tokenizer = ByteTokenizer(padding_side="left")
    batch = tokenizer(["a", "abc"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[0, 0, 1, 100], [1, 100, 101, 102]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_saved_folder_loads_through_auto_tokenizer_in_a_fresh_process(tmp_path):
    """The saved folder carries the tokenizer's code (auto_map), so AutoTokenizer loads it with
    ``trust_remote_code=True`` where kimi_hf is not even imported."""
    ByteTokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "data.py").exists()
    code = (
        "import sys\nfrom transformers import AutoTokenizer\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "print(type(t).__name__, t('hé')['input_ids'], 'kimi_hf' in sys.modules)"
    )
    assert run_python(code, str(tmp_path)).split() == ["ByteTokenizer", "[1,", "107,", "198,", "172]", "False"]


def test_stdlib_corpus_is_fixed_and_substantial():
    first, second = stdlib_corpus(), stdlib_corpus()
    assert first == second and len(set(first)) == len(first)
    assert all(len(doc) >= 200 for doc in first)
    assert sum(map(len, first)) > 100_000, f"only {sum(map(len, first))} characters on Python {sys.version}"


def test_added_tokens_get_new_ids_count_in_len_and_decode():
    """``add_tokens`` twice gives two ids past the bytes and ``len(tokenizer)`` counts them (what
    ``resize_token_embeddings(len(tokenizer))`` needs); decoding keeps their text. Before, both got id 259,
    ``len`` stayed 259 and ``decode`` raised on the added token."""
    tokenizer = ByteTokenizer()
    tokenizer.add_tokens(["<a>"])
    tokenizer.add_tokens(["<b>"])
    assert tokenizer.convert_tokens_to_ids(["<a>", "<b>"]) == [259, 260] and len(tokenizer) == 261
    ids = tokenizer("x<a>é<b>")["input_ids"]
    assert ids == [1, 123, 259, 198, 172, 260]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "x<a>é<b>"
    with pytest.raises(ValueError, match="no token with id 300"):  # not decoded as some character
        tokenizer.decode([1, 300])
    # every vocabulary entry, control bytes included, is a token that maps back to its id
    assert all(tokenizer.convert_tokens_to_ids(tok) == i for tok, i in tokenizer.get_vocab().items())


def test_special_tokens_mask_lines_up_with_the_ids():
    tokenizer = ByteTokenizer()
    one = tokenizer("ab", return_special_tokens_mask=True)
    assert one["input_ids"] == [1, 100, 101] and one["special_tokens_mask"] == [1, 0, 0]
    pair = tokenizer("ab", "c", return_special_tokens_mask=True)
    assert pair["input_ids"] == [1, 100, 101, 2, 102] and pair["special_tokens_mask"] == [1, 0, 0, 1, 0]
