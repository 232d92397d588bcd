"""Structured output: a request's output constrained to a JSON schema, a regex, a choice of
strings or an EBNF grammar (vLLM's `StructuredOutputsParams`), with xgrammar.

- `params`: what a request asks (plain data, no heavy imports: `SamplingParams` holds it).
- `compiler`: constraint -> grammar over the vocabulary, on the submitting thread, cached.
- `manager`: the engine core's matchers, one per constrained sequence; each step's bitmask.
- `bitmask`: the runner's side, the packed bitmask applied to logits (torch only).
- `tool_parsers`: OpenAI tool calls parsed from output text (Hermes, Llama 3 JSON, forced).
"""

from pagedbackend.structured_output.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
