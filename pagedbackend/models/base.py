"""What every model family shares: the flattened-batch forward contract and weight loading.

A model maps checkpoint tensor names to (module, shard, is_bias) with `map_weight_name`; the
base class loads through each module's `load()` (which keeps this rank's slice) and refuses a
checkpoint that is missing weights or carries weights the architecture does not know, so a
config/weights mismatch is a clear error at load rather than garbage at generation.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

from pagedbackend.attention.layer import PagedAttention
from pagedbackend.attention.metadata import AttentionMetadata
from pagedbackend.models.layers import ColumnParallelLinear, LayerNorm, LMHead, RowParallelLinear


class CausalLM(nn.Module):
    """forward(input_ids [T], positions [T], meta) -> hidden [T, hidden]; compute_logits(rows)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def map_weight_name(self, name: str) -> tuple[str, int, bool] | None:
        """Checkpoint name -> (module path, shard index, is_bias); None to skip the tensor."""
        raise NotImplementedError

    def transform_weight(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Hook for checkpoints whose tensors need reshaping (GPT-2's Conv1D); default: as is."""
        yield name, tensor

    def attention_layers(self) -> list[PagedAttention]:
        return [m for m in self.modules() if isinstance(m, PagedAttention)]

    def _expected_weights(self) -> set[tuple[str, int, bool]]:
        expected: set[tuple[str, int, bool]] = set()
        for path, module in self.named_modules():
            if not hasattr(module, "load"):
                continue
            if isinstance(module, LMHead) and getattr(self, "tied_embeddings", False):
                continue
            shards = len(module.output_sizes) if isinstance(module, ColumnParallelLinear) else 1
            for shard in range(shards):
                expected.add((path, shard, False))
                has_bias = isinstance(module, (ColumnParallelLinear, RowParallelLinear, LayerNorm)) and module.bias is not None
                if has_bias:
                    expected.add((path, shard, True))
        return expected

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        loaded: set[tuple[str, int, bool]] = set()
        unknown: list[str] = []
        for raw_name, raw_tensor in weights:
            for name, tensor in self.transform_weight(raw_name, raw_tensor):
                target = self.map_weight_name(name)
                if target is None:
                    continue
                path, shard, is_bias = target
                try:
                    module = self.get_submodule(path)
                except AttributeError:
                    unknown.append(name)
                    continue
                module.load(tensor, shard=shard, is_bias=is_bias, name=name)
                loaded.add(target)
        if unknown:
            raise ValueError(f"model: checkpoint has weights this architecture does not use: "
                             f"{', '.join(sorted(unknown)[:10])}{' ...' if len(unknown) > 10 else ''}")
        missing = self._expected_weights() - loaded
        if missing:
            names = sorted(f"{p}{'.bias' if b else '.weight'}[{s}]" for p, s, b in missing)
            raise ValueError(f"model: checkpoint is missing {len(missing)} weight(s): "
                             f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
