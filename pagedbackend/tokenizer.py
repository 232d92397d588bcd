"""The model's tokenizer, and incremental detokenization for streaming.

Decoding one token at a time is wrong for byte-level and SentencePiece vocabularies: a token
can be half of a UTF-8 character, and a word's leading space depends on its neighbours. Both
detokenizers here decode a short window of recent tokens and emit what is new, holding back
while the window ends in an incomplete character: `StreamDetokenizer` through `tokenizers`'
own `DecodeStream` (one Rust call per token, for fast tokenizers), `IncrementalDetokenizer`
in Python (two `decode` calls per token; the fallback, and the oracle the other is tested on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Prompt tokens used as left context, so the first generated word gets its spacing right.
_CONTEXT_TOKENS = 5


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise ValueError(f"tokenizer: {path!r} is not a directory")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types for a missing/broken tokenizer
        raise ValueError(f"tokenizer: cannot load a tokenizer from {path} ({type(e).__name__}: {e})") from e


def max_token_chars(tokenizer: Any) -> int:
    """The most characters of text one token can stand for: the longest entry of the
    vocabulary (byte-level vocabularies spell each byte as one character, SentencePiece writes
    the space as one, so a token's entry is at least as long as the text it covers)."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # a tokenizer without a vocabulary listing: assume a generous bound
        return 64
    return max((len(t) for t in vocab), default=64) or 64


def make_detokenizer(tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                     spaces_between_special_tokens: bool = True) -> "IncrementalDetokenizer | StreamDetokenizer":
    """`DecodeStream` where the tokenizer has a Rust backend (fast tokenizers ignore
    spaces_between_special_tokens, so both decoders agree) and the prompt does not end inside
    a character (the windowed decoder counts such a character as the prompt's; the stream
    cannot be told so); the windowed decoder otherwise."""
    if getattr(tokenizer, "backend_tokenizer", None) is not None and _DecodeStream is not None:
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        if "\ufffd" not in tokenizer.decode(context, skip_special_tokens=skip_special_tokens):
            return StreamDetokenizer(tokenizer, context, skip_special_tokens)
    return IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens, spaces_between_special_tokens)


try:
    from tokenizers.decoders import DecodeStream as _DecodeStream
except ImportError:  # tokenizers < 0.21
    _DecodeStream = None


class StreamDetokenizer:
    """`DecodeStream` with the prompt's last tokens as context. If the stream ever refuses a
    token ("invalid prefix", seen with random token ids) the sequence continues with the
    windowed decoder from where it was."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._stream = _DecodeStream(ids=list(self._ids), skip_special_tokens=skip_special_tokens)
        self._fallback: IncrementalDetokenizer | None = None
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; returns the newly complete text (possibly empty)."""
        if self._fallback is None:
            try:
                delta = self._stream.step(self._backend, token_id) or ""
            except Exception:  # noqa: BLE001 - the Rust stream gave up on this sequence
                self._fallback = IncrementalDetokenizer(self._tokenizer, self._ids, self._skip)
            else:
                self._ids = self._ids[-_CONTEXT_TOKENS:] + [token_id]
                self.text += delta
                return delta
        delta = self._fallback.add(token_id)
        self.text += delta
        return delta


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; returns the newly complete text (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""
