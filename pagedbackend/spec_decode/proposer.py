"""Proposers: after a step, the tokens each sampled sequence may continue with, for the next
step to verify. They run on the model runner, which holds every sequence's tokens.

A proposer answers `propose(batch, seqs)` with seq_id -> proposed tokens, and, when it drew
them from a distribution (a draft model sampling), seq_id -> that distribution ([m, V]); the
runner keeps the latter until the proposals are verified."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from pagedbackend.input_batch import InputBatch
from pagedbackend.spec_decode.config import SpeculativeConfig
from pagedbackend.spec_decode.ngram import propose_ngram
from pagedbackend.step import ScheduledSeq, SchedulerOutput

# (seq_id, batch slot, room): room is how many positions past its tokens a proposer may write
# KV for (a draft model; see ModelRunner._propose)
Candidate = tuple[int, int, int]


class Proposer(Protocol):
    def propose(self, batch: InputBatch, seqs: list[Candidate]) -> tuple[dict[int, list[int]],
                                                                         dict[int, torch.Tensor]]: ...

    def forget(self, seq_ids: list[int]) -> None: ...


class NgramProposer:
    """Prompt lookup (`propose_ngram`) over each sequence's tokens in the batch: no model, no KV."""

    def __init__(self, spec: SpeculativeConfig) -> None:
        self.k, self.min_n, self.max_n = spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max

    def propose(self, batch: InputBatch, seqs: list[Candidate]) -> tuple[dict[int, list[int]], dict[int, torch.Tensor]]:
        out = {}
        for seq_id, slot, _ in seqs:
            n = int(batch.num_tokens[slot])
            drafts = propose_ngram(batch.token_ids[slot, :n], self.k, self.min_n, self.max_n)
            if drafts:
                out[seq_id] = drafts
        return out, {}

    def forget(self, seq_ids: list[int]) -> None:
        pass


class DraftModelProposer:
    """A smaller model sharing the target's tokenizer proposes k tokens per sequence in its own
    batched steps, after the target's step.

    Its KV lives in its own cache tensor indexed by the target's block ids: a sequence's blocks
    (allocated and freed by the scheduler with the request) hold both models' KV, so nothing is
    allocated for the draft apart, and freeing the request frees both. Per sequence it keeps
    how many leading positions of its cache are valid (`computed`); proposing first catches up
    over the tokens since then (the whole context for a sequence new to the batch: admitted,
    resumed after preemption, or forked), in chunks of at most `max_num_batched_tokens`, which
    also yields the first proposal, then decodes one position per step for the rest. Proposals'
    KV is speculative: the next catch-up rewrites from the first position it does not know.
    It writes at most `room` positions past a sequence's tokens: the lookahead slots the
    scheduler reserved (see `ModelRunner._propose`).

    Greedy requests get the draft's argmax (a point mass); others a sample from its softmax at
    the request's temperature, which the verifier is given as q (Leviathan et al.)."""

    def __init__(self, spec: SpeculativeConfig, model: Any, backend: Any, kv_cache: torch.Tensor,
                 max_num_batched_tokens: int, to_tensors: Any, sampler: Any) -> None:
        self.k = spec.num_speculative_tokens
        self.model, self.backend, self.kv_cache = model, backend, kv_cache
        self.max_tokens = max_num_batched_tokens
        self._to_tensors = to_tensors  # StepInputs -> (input ids, positions, metadata, logits indices)
        self.sampler = sampler
        self.computed: dict[int, int] = {}  # seq_id -> leading positions of its draft KV that are valid
        self.num_steps = 0  # draft forward passes so far

    def forget(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self.computed.pop(seq_id, None)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write in the target's cache copies the draft's blocks too."""
        self.backend.copy_blocks(self.kv_cache, pairs)

    def propose(self, batch: InputBatch, seqs: list[Candidate]) -> tuple[dict[int, list[int]], dict[int, torch.Tensor]]:
        want = {seq_id: min(self.k, room) for seq_id, _, room in seqs if room >= 1}
        if not want:
            return {}, {}
        slots = {seq_id: slot for seq_id, slot, _ in seqs}
        drafts: dict[int, list[int]] = {seq_id: [] for seq_id in want}
        probs: dict[int, list[torch.Tensor]] = {seq_id: [] for seq_id in want}

        # Catch up to each sequence's tokens; the last chunk's logits give the first proposal.
        pending = {seq_id: self.computed.get(seq_id, 0) for seq_id in want}
        while pending:
            items, budget = [], self.max_tokens
            for seq_id in list(pending):
                if budget <= 0:
                    break
                start, end = pending[seq_id], int(batch.num_tokens[slots[seq_id]])
                n = min(end - start, budget)
                items.append(ScheduledSeq(seq_id, "", start, n, start + n == end))
                budget -= n
                if start + n == end:
                    del pending[seq_id]
                else:
                    pending[seq_id] = start + n
            self._step(batch, SchedulerOutput(items), slots, drafts, probs)
        for seq_id in want:
            # All but the newest token: its slot may be in a block the scheduler frees after
            # this step (see Scheduler._settle_speculation); the next catch-up rewrites it.
            self.computed[seq_id] = int(batch.num_tokens[slots[seq_id]]) - 1

        # One position per step for the rest: the previous proposal at the next position.
        for j in range(1, max(want.values())):
            items = []
            for seq_id, m in want.items():
                if m > j:
                    slot, position = slots[seq_id], int(batch.num_tokens[slots[seq_id]]) + j - 1
                    batch.token_ids[slot, position] = drafts[seq_id][-1]  # past its tokens: read as input
                    items.append(ScheduledSeq(seq_id, "", position, 1, True))
            self._step(batch, SchedulerOutput(items), slots, drafts, probs)
        return drafts, {seq_id: torch.stack(p) for seq_id, p in probs.items() if p}

    def _step(self, batch: InputBatch, out: SchedulerOutput, slots: dict[int, int], drafts: dict[int, list[int]],
              probs: dict[int, list[torch.Tensor]]) -> None:
        """One draft forward over `out`'s items; each item ending at its last input samples the
        next proposal of its sequence."""
        step = batch.prepare(out, prompt_logprobs=False)
        input_ids, positions, meta, logits_indices = self._to_tensors(step)
        self.backend.prepare(meta, self.kv_cache[0, 0])
        hidden = self.model(input_ids, positions, meta)
        self.num_steps += 1
        sampling = [item.seq_id for item in out.scheduled if item.sample]
        if not sampling:
            return
        logits = self.model.compute_logits(hidden[logits_indices]).float()
        rows = np.array([slots[seq_id] for seq_id in sampling], dtype=np.int64)
        greedy = batch.greedy[rows]
        tokens = logits.argmax(dim=-1)
        if not greedy.all():
            temps = torch.from_numpy(batch.temperature[rows]).to(logits.device)
            q = torch.softmax(logits / temps[:, None], dim=-1)
            noise = torch.empty_like(q)
            for i, seq_id in enumerate(sampling):
                params = batch.params[slots[seq_id]]
                gen = (self.sampler.seq_generator(seq_id, params.seed) if params.seed is not None
                       else self.sampler.generator)
                noise[i].exponential_(generator=gen)
            sampled = (q / noise).argmax(dim=-1)
            tokens = torch.where(torch.from_numpy(greedy).to(logits.device), tokens, sampled)
        for i, (seq_id, token) in enumerate(zip(sampling, tokens.tolist())):
            drafts[seq_id].append(token)
            if not greedy[i]:
                probs[seq_id].append(q[i])
