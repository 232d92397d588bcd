"""Compiling a request's constraint into a grammar over the model's vocabulary (xgrammar).

Compilation is the slow part of structured output (milliseconds to seconds for a big schema),
so it runs where the request is validated, on the submitting thread (`LLMEngine.
process_request`; the async engine runs that off its event loop), never on the engine loop: a
request whose grammar compiles waits alone while every other request keeps stepping. Results
are cached by the constraint's key (kind, spec, whitespace) with an LRU bound; two threads
asking for the same key at once compile it once (the second waits for the first's result).
A schema, regex or grammar xgrammar refuses is an `InvalidRequest` naming the field, with
xgrammar's message (without its source-file prefix), so an adapter answers 400.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pagedbackend.errors import InvalidRequest
from pagedbackend.metrics import Histogram
from pagedbackend.structured_output.params import StructuredOutputsParams

# xgrammar prefixes C++ errors with "[hh:mm:ss] /path/file.cc:line: ".
_CPP_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s+\S+:\d+:\s*")
# xgrammar 0.2.9 writes the characters of a length-bounded JSON string (minLength/maxLength) as
# this class, which lets raw control characters through (U+0001..U+001F but CR and LF): the
# output is then not JSON (`json.loads` refuses it). Its unbounded strings use the right class.
_LOOSE_STRING_CHARS = r'[^\"\\\r\n]'
_JSON_STRING_CHARS = r'[^\0-\x1f\"\\]'


@dataclass
class CompileStats:
    """For the metrics: compiles done, the seconds each took, cache hits."""

    num_compiles: int = 0
    num_cache_hits: int = 0
    histogram: Histogram = field(default_factory=Histogram)  # seconds per compile (its sum: all of them)

    def snapshot(self) -> dict[str, Any]:
        return {"grammar_compiles": self.num_compiles, "grammar_cache_hits": self.num_cache_hits,
                "grammar_compile_seconds": self.histogram.as_dict()}


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose language is exactly the given strings (JSON-escaped literals, which is
    xgrammar's string syntax)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompiler:
    """One per engine: the tokenizer's vocabulary as xgrammar sees it, and the cache. Built
    on the first constrained request (reading a large vocabulary takes a moment; an engine
    that never constrains never imports xgrammar)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...], *,
                 max_threads: int = 2, max_entries: int = 512) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
        self.max_threads = max_threads
        self._compiler: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._max_entries = max_entries
        self.stats = CompileStats()

    def _xgrammar_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                self._xgr = xgr
                # The mask's width is the model's logits width (>= the tokenizer's): padding rows
                # stay banned. The stop tokens are the model's EOS ids: the grammar's end allows
                # exactly those.
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=list(self.stop_token_ids))
                self._compiler = xgr.GrammarCompiler(info, max_threads=self.max_threads, cache_enabled=False)
            return self._compiler

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar of `params` (an xgrammar `CompiledGrammar`), from the cache when
        it is there; raises `InvalidRequest` for a constraint xgrammar cannot compile."""
        key = params.key
        with self._lock:
            future = self._cache.get(key)
            owner = future is None
            if owner:
                future = self._cache[key] = Future()
                self._evict()
            else:
                self._cache.move_to_end(key)
                self.stats.num_cache_hits += 1
        if owner:
            start = time.perf_counter()
            try:
                future.set_result(self._compile(params))
            except InvalidRequest as e:
                future.set_exception(e)
            except BaseException as e:  # not a verdict on the request: do not cache it
                with self._lock:
                    self._cache.pop(key, None)
                future.set_exception(e)
                raise
            finally:
                elapsed = time.perf_counter() - start
                with self._lock:
                    self.stats.num_compiles += 1
                    self.stats.histogram.observe(elapsed)
        return future.result()

    def _evict(self) -> None:
        while len(self._cache) > self._max_entries:
            oldest = next(iter(self._cache))
            if not self._cache[oldest].done():
                break  # still compiling for someone: keep it
            del self._cache[oldest]

    def _compile(self, params: StructuredOutputsParams) -> Any:
        kind = params.kind
        field = f"structured_outputs.{kind}"
        compiler = self._xgrammar_compiler()
        any_whitespace = not params.disable_any_whitespace
        try:
            if kind in ("json", "json_object"):
                schema = '{"type": "object"}' if kind == "json_object" else (
                    params.json if isinstance(params.json, str) else json.dumps(params.json))
                ebnf = str(self._xgr.Grammar.from_json_schema(schema, any_whitespace=any_whitespace))
                return compiler.compile_grammar(ebnf.replace(_LOOSE_STRING_CHARS, _JSON_STRING_CHARS))
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(params.choice))
            return compiler.compile_grammar(params.grammar)
        except (RuntimeError, ValueError, TypeError) as e:
            message = _CPP_PREFIX.sub("", str(e)).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            what = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
                    "choice": "choice list", "grammar": "grammar"}[kind]
            raise InvalidRequest(field, f"{field}: invalid {what}: {message}") from None
