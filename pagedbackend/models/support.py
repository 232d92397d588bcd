"""The README's architecture table, generated: one row per architecture the tests build a tiny
model of (`pagedbackend.tiny_model.TINY_ARCHS`), saying which implementation serves it (the
registry's native ones, else the transformers path) and what the tests verify.

    python -m pagedbackend.models.support --write README.md
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pagedbackend.models.registry import has_native

README_HEADING = "## Supported architectures"
_PARITY = "greedy = `generate()` with chunked prefill, prefix hits and preemption"
# Architectures whose TP=2 engine run is checked token-exact with generate(): native ones in
# tests/test_tensor_parallel.py, transformers-path ones in tests/test_transformers_tp.py (which
# checks this list against the models it runs).
TP_VERIFIED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel", "Qwen3ForCausalLM",
               "Gemma2ForCausalLM", "GraniteForCausalLM", "Qwen3MoeForCausalLM", "Olmo2ForCausalLM",
               "Phi3ForCausalLM")


def architecture_rows() -> list[tuple[str, str, str, str]]:
    """(architecture, implementation, what the tiny model exercises, what is verified)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from pagedbackend.tiny_model import TINY_ARCHS

    rows, seen = [], set()
    for name, spec in TINY_ARCHS.items():
        model_type = getattr(transformers, spec.config_class).model_type
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
        if spec.refused:
            rows.append((arch, "refused", spec.features, "a clear error naming why"))
            continue
        variant = f" (`{name}`)" if arch in seen else ""
        seen.add(arch)
        if has_native(arch):
            impl = "native + transformers"
            verified = f"{_PARITY}, on both paths, equal to each other" + ("; TP=2" if arch in TP_VERIFIED else "")
        else:
            impl = "transformers"
            verified = _PARITY + ("; TP=2" if arch in TP_VERIFIED else "")
        rows.append((arch + variant, impl, spec.features, verified))
    return rows


def architecture_of(tiny_arch: str) -> str:
    """The `*ForCausalLM` class name of a tiny test model (`TINY_ARCHS` key)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from pagedbackend.tiny_model import TINY_ARCHS

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[getattr(transformers, TINY_ARCHS[tiny_arch].config_class).model_type]


def table_markdown() -> str:
    lines = ["| architecture | implementation | tiny test model exercises | verified |", "|---|---|---|---|"]
    lines += [f"| `{a.split(' ')[0]}`{a[len(a.split(' ')[0]):]} | {i} | {f} | {v} |" for a, i, f, v in architecture_rows()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagedbackend.models.support",
                                     description="print (or write into a README) the architecture table")
    parser.add_argument("--write", metavar="README", default=None, help="replace the table in this file")
    ns = parser.parse_args(argv)
    if ns.write:
        from pagedbackend.readme import replace_table

        print(("updated " if replace_table(ns.write, README_HEADING, table_markdown()) else "unchanged: ") + ns.write)
    else:
        sys.stdout.write(table_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
