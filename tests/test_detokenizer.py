"""Incremental detokenization never emits half a UTF-8 character and adds up to decode()."""

from __future__ import annotations

from pagedbackend.output_processor import find_stop_string
from pagedbackend.tokenizer import IncrementalDetokenizer

TEXT = "café naïve 東京 🙂🚀 jalapeño — done."


def test_multibyte_characters_split_across_tokens_are_emitted_whole(tiny_tokenizer):
    ids = tiny_tokenizer.encode(TEXT)
    pieces = [tiny_tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the fixture should split some character across tokens"
    detok = IncrementalDetokenizer(tiny_tokenizer, prompt_token_ids=[])
    deltas = [detok.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == TEXT == detok.text


def test_prompt_context_does_not_leak_into_the_output(tiny_tokenizer):
    prompt = tiny_tokenizer.encode("The answer is")
    ids = tiny_tokenizer.encode(" 東京 and café")
    detok = IncrementalDetokenizer(tiny_tokenizer, prompt)
    assert "".join(detok.add(i) for i in ids) == " 東京 and café"


def test_special_tokens_are_skipped_unless_asked_for(tiny_tokenizer):
    ids = tiny_tokenizer.encode("hi") + [tiny_tokenizer.eos_token_id]
    skip = IncrementalDetokenizer(tiny_tokenizer, [])
    keep = IncrementalDetokenizer(tiny_tokenizer, [], skip_special_tokens=False)
    assert "".join(skip.add(i) for i in ids) == "hi"
    assert "".join(keep.add(i) for i in ids) == "hi</s>"


def test_stop_string_search_finds_the_earliest_match_touching_new_text():
    assert find_stop_string("hello world", 3, ["world"]) == ("world", 6)
    assert find_stop_string("hello world", 3, ["xyz"]) is None
    assert find_stop_string("ab STOP cd STOP", 2, ["STOP"]) == ("STOP", 11)  # older match was seen before
    assert find_stop_string("one two three", 5, ["three", "ee", "two"]) == ("three", 8)
