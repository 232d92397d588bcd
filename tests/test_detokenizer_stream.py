"""`DecodeStream` (tokenizers' Rust incremental decoder, what the frontend uses for fast
tokenizers) against the windowed Python decoder (the fallback, and the oracle): the same text
after every token, and the same text with stop strings through the output processor, on a
multilingual byte-level BPE and on a SentencePiece-style BPE with byte fallback (Llama's kind:
a character outside the vocabulary becomes <0xNN> byte tokens)."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pagedbackend.output_processor import OutputProcessor
from pagedbackend.sampling_params import SamplingParams
from pagedbackend.step import SeqOutput
from pagedbackend.tokenizer import IncrementalDetokenizer, StreamDetokenizer, make_detokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Stop here, then go on.",
    "Größere Äpfel und Öl für über fünfzig Bürger in München.",
    "東京の天気は晴れです。私は日本語を勉強しています。",
    "Ça va très bien, merci! Où est la bibliothèque?",
    "Привет, как дела? Всё хорошо, спасибо.",
    "Emoji 🎉🚀 and symbols ∑∫√ with numbers 12345 67890.",
    "def main():\n    print('hello world')\n    return 0\n",
] * 20
PROBES = ["Die Bürger 東京 🎉 stop über Привет", "Ça va? 私は √2 END here", "zzz ключ 🚀🚀 ß fünf"]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-style tokenizer: Metaspace, BPE with byte fallback, a vocabulary too small for
    most CJK characters and emoji (so they decode from byte tokens)."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Replace(" ", "▁")
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trained.train_from_iterator([t for t in CORPUS if t.isascii()],
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    vocab = dict(trained.get_vocab())
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in __import__("json").loads(trained.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {"byte-level": byte_level_tokenizer, "byte-fallback": byte_fallback_tokenizer}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


def token_streams(tokenizer, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(prompt, generated) pairs from multilingual text, cut at every few tokens (so prompts
    and generations start and end inside words and, with byte fallback, inside characters)."""
    rng = random.Random(seed)
    streams = []
    for text in PROBES + CORPUS[:7]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for cut in sorted(rng.sample(range(1, len(ids)), min(6, len(ids) - 1))):
            streams.append((ids[:cut], ids[cut:]))
    return streams


def random_streams(tokenizer, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Random ids that split characters anywhere (a random-weight model's output)."""
    rng = random.Random(seed)
    vocab = len(tokenizer)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(1, 6))],
             [rng.randrange(0, vocab) for _ in range(rng.randint(1, 40))]) for _ in range(60)]


def test_the_stream_decoder_is_chosen_for_fast_tokenizers(tokenizer):
    assert isinstance(make_detokenizer(tokenizer, tokenizer.encode("hello", add_special_tokens=False)),
                      StreamDetokenizer)
    inside = tokenizer.encode("東京", add_special_tokens=False)[:1]  # ends inside a character
    if "\ufffd" in tokenizer.decode(inside):
        assert isinstance(make_detokenizer(tokenizer, inside), IncrementalDetokenizer)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_stream_gives_the_windowed_decoders_text_after_every_token(tokenizer, skip_special_tokens):
    checked_bytes = streamed = 0
    for prompt, generated in token_streams(tokenizer):
        fast = make_detokenizer(tokenizer, prompt, skip_special_tokens)
        slow = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens)
        streamed += isinstance(fast, StreamDetokenizer)
        for token in generated:
            fast.add(token)
            slow.add(token)
            assert fast.text == slow.text, (prompt, generated)
        checked_bytes += any(tokenizer.convert_ids_to_tokens(t).startswith("<0x") for t in generated)
    assert streamed > len(token_streams(tokenizer)) // 2
    if "<0x00>" in tokenizer.get_vocab():
        assert checked_bytes  # byte-fallback tokens were really decoded


def test_random_ids_never_break_the_stream_decoder(tokenizer):
    """Random ids can leave bytes that are no character anywhere (the Rust stream may then
    refuse a token, and the sequence goes on with the windowed decoder): nothing raises, the
    text only grows, and it ends with what the windowed decoder's text ends with."""
    for prompt, generated in random_streams(tokenizer):
        fast = make_detokenizer(tokenizer, prompt, True)
        previous = ""
        for token in generated:
            fast.add(token)
            assert fast.text.startswith(previous)
            previous = fast.text
        slow = IncrementalDetokenizer(tokenizer, prompt, True)
        for token in generated:
            slow.add(token)
        tail = slow.text[-2:].replace("\ufffd", "")
        assert fast.text.replace("\ufffd", "").endswith(tail)


def _run(processor: OutputProcessor, prompt: list[int], generated: list[int], params: SamplingParams, lag: int):
    """Feed a sequence's tokens as the engine would; `lag` extra tokens keep arriving after a
    stop string was found (the engine thread ran ahead of the frontend)."""
    processor.add_request("r", None, prompt, params, 0.0)
    texts, aborted_at = [], None
    for i, token in enumerate(generated):
        if aborted_at is not None and i > aborted_at + lag:
            break
        last = i == len(generated) - 1
        outs, aborts = processor.process([SeqOutput("r", 7, 0, [token], finish_reason="length" if last else None)])
        texts += [o.outputs[0].delta_text for o in outs]
        if aborts and aborted_at is None:
            assert aborts == [7]
            aborted_at = i
        if outs and outs[-1].finished:
            return "".join(texts), outs[-1].outputs[0]
    raise AssertionError("the request never finished")


@pytest.mark.parametrize("lag", [0, 3])
def test_stop_strings_found_by_the_frontend_give_the_same_text_with_either_decoder(tokenizer, lag, monkeypatch):
    import pagedbackend.output_processor as op

    found = 0
    for k, (prompt, generated) in enumerate(token_streams(tokenizer, seed=1)):
        full = tokenizer.decode(generated, skip_special_tokens=True)
        if len(full) < 6:
            continue
        stop = full[len(full) // 2:len(full) // 2 + 2]  # a stop string that does occur
        for include in (False, True):
            params = SamplingParams(stop=[stop, "never-there"], include_stop_str_in_output=include,
                                    max_tokens=len(generated))
            results = []
            for cls in (make_detokenizer, IncrementalDetokenizer):
                if cls is IncrementalDetokenizer:
                    monkeypatch.setattr(op, "make_detokenizer", lambda t, p, s, sp: IncrementalDetokenizer(t, p, s, sp))
                results.append(_run(OutputProcessor(tokenizer), prompt, generated, params, lag))
                monkeypatch.undo()
            (fast_stream, fast_out), (slow_stream, slow_out) = results
            assert fast_stream == slow_stream == fast_out.text == slow_out.text, (k, stop)
            assert fast_out.token_ids == slow_out.token_ids and fast_out.finish_reason == slow_out.finish_reason
            if fast_out.stop_reason == stop:
                found += 1
                assert fast_out.text.endswith(stop) if include else stop not in fast_out.text
    assert found
