"""Turns the logits of the rows that sample into tokens, for the whole batch at once.

Order of operations (vLLM's): raw logprobs are taken first (what `logprobs` reports); then
the allowed-token mask, bad words and the min_tokens ban; logit bias; presence / frequency
penalties (on generated tokens, OpenAI's definition) and the repetition penalty (on prompt and
generated tokens, transformers' definition); the grammar's token bitmask (structured output);
then greedy rows take the argmax and the others
are temperature-scaled, filtered (top-k, top-p, min-p) and sampled with the exponential race:
argmax(p / E) with E ~ Exp(1) picks token i with probability p_i. A seeded sequence draws its
noise from its own generator, so its samples do not depend on the rest of the batch.

Written for an accelerator that runs behind the host: a step queues its kernels and the host
waits for the device once, when the results come back.

- Every decision about which work to queue (any top-k and the largest k, any top-p, whether
  top-p can stay inside the top-k candidates, any repetition penalty, ...) is made from the
  host-side arrays and parameters `build_batch` receives, never by reading a tensor back
  (`int(t)`, `t.item()`, `if t.any()` each wait for every queued kernel).
- Everything a step sends to the device (per-row settings, index lists of masks, bias,
  penalties) travels in one byte buffer, pinned and copied without blocking on CUDA
  (`HostUpload`); a plain `torch.tensor(list, device=...)` or indexing with a Python list makes
  a blocking copy, which on CUDA synchronises the stream.
- Everything that comes back (tokens, the chosen tokens' logprobs and ranks, top-logprob
  alternatives, beam candidates) is packed into one tensor and copied to the host once
  (`_to_host`).
- Top-p runs inside the `torch.topk` candidates when every top-p row also has a top-k (the
  top-k filter computes them anyway); only rows with top-p and no top-k pay a full-vocabulary
  sort, and only those rows are sorted.
- Presence / frequency / repetition penalties read per-sequence token counts kept on the
  device between steps (`PenaltyState`): a step adds the tokens a sequence gained since its
  last step with one scatter, instead of re-uploading and re-counting every history.

A CPU device takes numpy shortcuts where they are faster (`host_fast_paths`); with them off,
the CPU runs exactly the code an accelerator runs (what tests/test_sampler_syncs.py counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pagedbackend.host_upload import HostUpload
from pagedbackend.step import TokenLogprobs
from pagedbackend.structured_output.bitmask import apply_token_bitmask

__all__ = ["PenaltyState", "PromptLogprobRequest", "Sampler", "SamplerOutput", "SamplingBatch", "TokenLogprobs",
           "apply_penalties", "gather_logprobs"]


@dataclass
class Penalties:
    """The batch's rows with presence / frequency / repetition penalties (device tensors)."""

    rows: torch.Tensor | None  # [R] rows of the batch; None: every row, in order (nothing to gather)
    state_rows: torch.Tensor | slice  # [R] their rows in the sampler's PenaltyState; a slice when consecutive
    presence: torch.Tensor  # [R]
    frequency: torch.Tensor  # [R]
    repetition: torch.Tensor  # [R]
    any_repetition: bool  # host-known: some row's repetition_penalty != 1 (needs the seen-token mask)


@dataclass
class SamplingBatch:
    """One step's sampling settings: per-row tensors on the device, and everything that decides
    which work to queue as host values (so no decision reads a tensor back)."""

    temperatures: torch.Tensor  # [S], 1.0 for greedy rows (never divides by zero)
    top_k: torch.Tensor | None  # [S] int64, vocab size where disabled; None when no row has one
    top_p: torch.Tensor | None  # [S]; None when no row has top_p < 1
    min_p: torch.Tensor | None  # [S]; None when no row has min_p > 0
    greedy: torch.Tensor  # [S] bool
    all_greedy: bool
    any_greedy: bool
    max_top_k: int  # the largest enabled top-k (0: none): the width of the one topk call
    top_p_in_candidates: bool  # every non-greedy top-p row has a top-k: no full-vocabulary sort
    top_p_rows: torch.Tensor | None  # rows that sort the full vocabulary (None: all of them), else unused
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, tokens) set to -inf
    allowed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, local row, token) the only picks
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, tokens, values) added
    penalties: Penalties | None
    seeded_rows: list[tuple[int, int, int]]  # (row, seq_id, seed): rows drawing noise from their own generator
    logprob_rows: list[tuple[int, int]]  # (row, top-k) rows reporting the chosen token's logprob
    beam_rows: list[tuple[int, int]]  # (row, K) rows returning their K best next tokens instead
    logprob_source: torch.Tensor | None  # logprob rows then beam rows: the rows whose raw log_softmax is taken
    logprob_chosen: torch.Tensor | None  # the logprob rows (whose sampled tokens they report)
    # Structured output: (rows, [R, ceil(V / 32)] int32 packed allowed-token bits); rows None: all
    grammar: tuple[torch.Tensor | None, torch.Tensor] | None = None


@dataclass
class PromptLogprobRequest:
    """Prompt logprobs to report with a step's samples, so that they come back in the same
    device-to-host copy (computing them apart costs a second wait for the device)."""

    logprobs: torch.Tensor  # [P, V] normalised log-probabilities of the positions
    targets: torch.Tensor  # [P] the prompt token each position predicts
    top_k: list[int]  # [P] alternatives to report per position
    seqs: list[tuple[int, int]]  # (seq_id, number of positions), in the positions' order


@dataclass
class SamplerOutput:
    """What one step produced, as plain Python values (the scheduler consumes it)."""

    tokens: list[int]  # one per sampling row (-1 for beam rows)
    logprobs: list[TokenLogprobs | None]
    beam_candidates: list[tuple[list[float], list[int]] | None]  # log_softmax values and token ids
    # seq_id -> logprobs of the prompt tokens this step's chunk predicted, in position order
    prompt_logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)


class PenaltyState:
    """Per-sequence token statistics kept on the device across steps, for the penalties:
    `counts[r, t]` is how often token t occurs in the generated tokens of the sequence owning
    row r (presence and frequency penalties), `prompt_seen[r, t]` whether it occurs in its
    prompt (repetition penalty, with `counts > 0`).

    A sequence's tokens only ever grow (a preempted sequence keeps them; a fork or a beam's
    branch is a new sequence), so each step scatters only the tokens it gained since the
    sequence was last seen. A history that does not extend the one recorded (shorter, another
    last token, another prompt length) is rebuilt from scratch. Rows are freed by `forget`
    (the runner forgets every finished sequence) and reused.
    """

    def __init__(self, device: torch.device, vocab_size: int) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self.counts = torch.zeros(0, vocab_size, device=device)
        self.prompt_seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        # seq_id -> [row, tokens counted, prompt length, last token counted]
        self.entries: dict[int, list[int]] = {}
        self.free_rows: list[int] = []

    def forget(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            entry = self.entries.pop(seq_id, None)
            if entry is not None:
                self.free_rows.append(entry[0])

    def plan(self, seqs: list[Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Host side of a step: each sequence's state row, and the index arrays of the update
        (rows to clear, (row, token) pairs to count as generated or to mark as prompt). Records
        the sequences as counted up to their current length."""
        state_rows = np.empty(len(seqs), dtype=np.int64)
        reset: list[int] = []
        out_rows: list[int] = []
        out_tokens: list[int] = []
        prompt_rows: list[int] = []
        prompt_tokens: list[int] = []
        for i, seq in enumerate(seqs):
            tokens = seq.token_ids
            n, prompt_len = len(tokens), seq.prompt_len
            entry = self.entries.get(seq.seq_id)
            if entry is not None and not (entry[2] == prompt_len and prompt_len <= entry[1] <= n
                                          and (entry[1] == 0 or int(tokens[entry[1] - 1]) == entry[3])):
                self.free_rows.append(entry[0])  # not an extension of what was counted: recount
                entry = None
            if entry is None:
                entry = [self._take_row(), prompt_len, prompt_len, -1]
                self.entries[seq.seq_id] = entry
                reset.append(entry[0])
                prompt = _as_list(tokens[:prompt_len])
                prompt_rows += [entry[0]] * len(prompt)
                prompt_tokens += prompt
            new = _as_list(tokens[entry[1]:n])
            out_rows += [entry[0]] * len(new)
            out_tokens += new
            entry[1] = n
            entry[3] = int(tokens[n - 1]) if n else -1
            state_rows[i] = entry[0]
        lists = {"reset": reset, "out_rows": out_rows, "out_tokens": out_tokens, "prompt_rows": prompt_rows,
                 "prompt_tokens": prompt_tokens}
        arrays = {name: np.asarray(values, dtype=np.int64) for name, values in lists.items()}
        return state_rows, arrays

    def update(self, dev: dict[str, torch.Tensor]) -> None:
        """Device side of a step: clear the new sequences' rows, then one scatter each for the
        generated and the prompt tokens (counts are whole numbers: any order sums exactly)."""
        if dev["reset"].numel():
            self.counts.index_fill_(0, dev["reset"], 0.0)  # (`x[rows] = 0.0` would upload the 0.0)
            self.prompt_seen.index_fill_(0, dev["reset"], False)
        if dev["out_rows"].numel():
            ones = torch.ones(dev["out_rows"].shape, device=self.device)
            self.counts.index_put_((dev["out_rows"], dev["out_tokens"]), ones, accumulate=True)
        if dev["prompt_rows"].numel():
            self.prompt_seen.index_put_((dev["prompt_rows"], dev["prompt_tokens"]),
                                        torch.ones((), dtype=torch.bool, device=self.device))

    def _take_row(self) -> int:
        if not self.free_rows:
            old = self.counts.shape[0]
            new = max(8, 2 * old)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(new - old, self.vocab_size)])
            self.prompt_seen = torch.cat([self.prompt_seen, self.prompt_seen.new_zeros(new - old, self.vocab_size)])
            self.free_rows = list(range(new - 1, old - 1, -1))
        return self.free_rows.pop()


def _as_list(tokens: Any) -> list[int]:
    """Token ids as a list of ints, from a list or a numpy slice (a batch view may hand either)."""
    return tokens.tolist() if isinstance(tokens, np.ndarray) else list(tokens)


class Sampler:
    def __init__(self, device: torch.device | str, seed: int, host_fast_paths: bool | None = None) -> None:
        """`host_fast_paths`: take the CPU-only shortcuts (numpy argmax, arrays wrapped instead
        of packed into one upload). Defaults to whether the device is the CPU; False on a CPU
        device runs the accelerator's code path, which is what the sync-count tests check."""
        self.device = torch.device(device)
        self.host_fast_paths = self.device.type == "cpu" if host_fast_paths is None else host_fast_paths
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._seq_generators: dict[int, torch.Generator] = {}
        self.penalty_state: PenaltyState | None = None

    def forget(self, seq_ids: list[int]) -> None:
        """Drop finished sequences' generators and penalty counts."""
        for seq_id in seq_ids:
            self._seq_generators.pop(seq_id, None)
        if self.penalty_state is not None:
            self.penalty_state.forget(seq_ids)

    def make_batch(self, seqs: list[Any], vocab_size: int) -> SamplingBatch:
        """From sequence-like rows (`Sequence`, `RowView`): every row read one by one."""
        temps, top_k, top_p, min_p, greedy = [], [], [], [], []
        for seq in seqs:
            p = seq.params
            greedy.append(p.is_greedy)
            temps.append(1.0 if p.is_greedy else p.temperature)
            top_k.append(p.top_k if 0 < p.top_k < vocab_size else vocab_size)
            top_p.append(p.top_p)
            min_p.append(p.min_p)
        return self.build_batch(np.asarray(temps, dtype=np.float32), np.asarray(top_k, dtype=np.int64),
                                np.asarray(top_p, dtype=np.float32), np.asarray(min_p, dtype=np.float32),
                                np.asarray(greedy, dtype=np.bool_), list(enumerate(seqs)), vocab_size)

    def build_batch(self, temps: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray,
                    greedy: np.ndarray, special: list[tuple[int, Any]], vocab_size: int,
                    grammar: tuple[np.ndarray, np.ndarray] | None = None) -> SamplingBatch:
        """Per-row arrays for every row, plus the rows that need more than temperature and
        filters (masks, bias, penalties, seeds, logprobs, beams), as sequence-like views.
        `grammar`: the constrained rows and their packed bitmask rows (structured output).

        Reads no tensor: every choice of work is made here, from these host values. Sends
        everything in one upload and brings the penalty counts up to date (so the counts are
        right whether or not this batch is then sampled)."""
        num_rows = len(temps)
        up = HostUpload()
        banned_rows: list[int] = []
        banned_tokens: list[int] = []
        allowed_rows: list[int] = []
        allowed_local: list[int] = []
        allowed_tokens: list[int] = []
        bias_rows: list[int] = []
        bias_tokens: list[int] = []
        bias_values: list[float] = []
        penalty_rows: list[int] = []
        penalty_seqs: list[Any] = []
        seeded: list[tuple[int, int, int]] = []
        logprob_rows: list[tuple[int, int]] = []
        beam_rows: list[tuple[int, int]] = []
        for row, seq in special:
            p = seq.params
            if seq.beam_k:
                beam_rows.append((row, seq.beam_k))
            if p.min_tokens and seq.num_output_tokens < p.min_tokens:
                for t in p.all_stop_token_ids:
                    if t < vocab_size:
                        banned_rows.append(row)
                        banned_tokens.append(t)
            if seq.bad_words_ids:
                for t in seq.banned_by_bad_words():
                    if t < vocab_size:
                        banned_rows.append(row)
                        banned_tokens.append(t)
            if p.allowed_token_ids:
                local = len(allowed_rows)
                allowed_rows.append(row)
                for t in p.allowed_token_ids:
                    if t < vocab_size:
                        allowed_local.append(local)
                        allowed_tokens.append(t)
            if p.logit_bias:
                for t, b in p.logit_bias.items():
                    if t < vocab_size:
                        bias_rows.append(row)
                        bias_tokens.append(t)
                        bias_values.append(b)
            if p.has_penalties:
                penalty_rows.append(row)
                penalty_seqs.append(seq)
            if not p.is_greedy and p.seed is not None:
                seeded.append((row, seq.seq_id, p.seed))
            if seq.wants_logprobs:
                logprob_rows.append((row, p.logprobs or 0))

        up.add("temps", temps.astype(np.float32, copy=False))
        up.add("greedy", greedy.astype(np.bool_, copy=False))
        has_k = top_k < vocab_size
        max_top_k = int(top_k[has_k].max()) if has_k.any() else 0
        if max_top_k:
            up.add("top_k", top_k.astype(np.int64, copy=False))
        sampled = ~greedy  # greedy rows' samples are discarded: they decide nothing
        has_p = top_p < 1.0
        p_rows = np.flatnonzero(has_p & sampled)
        top_p_in_candidates = bool(max_top_k) and bool(has_k[p_rows].all())
        if has_p.any():
            up.add("top_p", top_p.astype(np.float32, copy=False))
            if not top_p_in_candidates and len(p_rows) < num_rows:
                up.add("top_p_rows", p_rows.astype(np.int64))
        if (min_p > 0.0).any():
            up.add("min_p", min_p.astype(np.float32, copy=False))
        if banned_rows:
            up.add("banned_rows", np.asarray(banned_rows, dtype=np.int64))
            up.add("banned_tokens", np.asarray(banned_tokens, dtype=np.int64))
        if allowed_rows:
            up.add("allowed_rows", np.asarray(allowed_rows, dtype=np.int64))
            up.add("allowed_local", np.asarray(allowed_local, dtype=np.int64))
            up.add("allowed_tokens", np.asarray(allowed_tokens, dtype=np.int64))
        if bias_rows:
            up.add("bias_rows", np.asarray(bias_rows, dtype=np.int64))
            up.add("bias_tokens", np.asarray(bias_tokens, dtype=np.int64))
            up.add("bias_values", np.asarray(bias_values, dtype=np.float32))
        any_repetition = False
        if penalty_rows:
            state = self._penalty_state(vocab_size)
            state_rows, updates = state.plan(penalty_seqs)
            # Gathers of [R, V] rows cost as much as the penalty itself: skipped when the rows
            # are the whole batch, or (the state's) a consecutive range, known here.
            all_rows = penalty_rows == list(range(num_rows))
            consecutive = bool(len(state_rows)) and bool((np.diff(state_rows) == 1).all())
            if not all_rows:
                up.add("penalty_rows", np.asarray(penalty_rows, dtype=np.int64))
            if not consecutive:
                up.add("penalty_state_rows", state_rows)
            for name, a in updates.items():
                up.add("pen_" + name, a)
            params = [s.params for s in penalty_seqs]
            repetition = np.asarray([p.repetition_penalty for p in params], dtype=np.float32)
            any_repetition = bool((repetition != 1.0).any())
            up.add("presence", np.asarray([p.presence_penalty for p in params], dtype=np.float32))
            up.add("frequency", np.asarray([p.frequency_penalty for p in params], dtype=np.float32))
            up.add("repetition", repetition)
        if logprob_rows or beam_rows:
            up.add("logprob_source", np.asarray([r for r, _ in logprob_rows + beam_rows], dtype=np.int64))
        if logprob_rows:
            up.add("logprob_chosen", np.asarray([r for r, _ in logprob_rows], dtype=np.int64))
        if grammar is not None:
            if len(grammar[0]) < num_rows:  # (the rows are distinct and ascending: all of them, in order, else)
                up.add("grammar_rows", grammar[0].astype(np.int64, copy=False))
            up.add("grammar_bitmask", grammar[1].astype(np.int32, copy=False))

        dev = up.send(self.device, one_copy=not self.host_fast_paths)
        penalties = None
        if penalty_rows:
            self.penalty_state.update({k[4:]: v for k, v in dev.items() if k.startswith("pen_")})
            first = int(state_rows[0])
            state_index = dev.get("penalty_state_rows", slice(first, first + len(state_rows)))
            penalties = Penalties(dev.get("penalty_rows"), state_index, dev["presence"], dev["frequency"],
                                  dev["repetition"], any_repetition)
        return SamplingBatch(
            temperatures=dev["temps"],
            top_k=dev.get("top_k"),
            top_p=dev.get("top_p"),
            min_p=dev.get("min_p"),
            greedy=dev["greedy"],
            all_greedy=bool(greedy.all()),
            any_greedy=bool(greedy.any()),
            max_top_k=max_top_k,
            top_p_in_candidates=top_p_in_candidates,
            top_p_rows=dev.get("top_p_rows"),
            banned=(dev["banned_rows"], dev["banned_tokens"]) if banned_rows else None,
            allowed=(dev["allowed_rows"], dev["allowed_local"], dev["allowed_tokens"]) if allowed_rows else None,
            bias=(dev["bias_rows"], dev["bias_tokens"], dev["bias_values"]) if bias_rows else None,
            penalties=penalties,
            seeded_rows=seeded,
            logprob_rows=logprob_rows,
            beam_rows=beam_rows,
            logprob_source=dev.get("logprob_source"),
            logprob_chosen=dev.get("logprob_chosen"),
            grammar=(dev.get("grammar_rows"), dev["grammar_bitmask"]) if grammar is not None else None,
        )

    def _penalty_state(self, vocab_size: int) -> PenaltyState:
        if self.penalty_state is None or self.penalty_state.vocab_size != vocab_size:
            self.penalty_state = PenaltyState(self.device, vocab_size)
        return self.penalty_state

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch,
                 prompt_logprobs: PromptLogprobRequest | None = None) -> SamplerOutput:
        """Tokens (and logprobs, beam candidates, and the prompt logprobs asked for) for every
        row; the host waits for the device once, in the one device-to-host copy at the end."""
        logits = logits.float()
        num_rows = logits.shape[0]
        raw_logprobs = None
        if batch.logprob_source is not None:  # before any mask: what `logprobs` reports
            raw_logprobs = torch.log_softmax(logits[batch.logprob_source], dim=-1)
        logits = self._process(logits, batch)

        if batch.all_greedy:
            tokens = _row_argmax(logits, self.host_fast_paths)
        elif not batch.any_greedy:
            tokens = self._sample(logits, batch)
        else:
            greedy_tokens = _row_argmax(logits, self.host_fast_paths)
            tokens = torch.where(batch.greedy, greedy_tokens, self._sample(logits, batch))

        parts = [tokens]
        num_lp = len(batch.logprob_rows)
        lp_k = [k for _, k in batch.logprob_rows]
        if num_lp:
            parts += _logprob_parts(raw_logprobs[:num_lp], tokens[batch.logprob_chosen], max(lp_k))
        beam_k = max((k for _, k in batch.beam_rows), default=0)
        if batch.beam_rows:
            parts += list(raw_logprobs[num_lp:].topk(beam_k, dim=-1))
        num_parts = len(parts)
        if prompt_logprobs is not None:
            pl = prompt_logprobs
            parts += [pl.targets] + _logprob_parts(pl.logprobs, pl.targets, max(pl.top_k, default=0))
        host = _to_host(parts)

        token_list = host[0].astype(np.int64, copy=False).tolist()
        logprobs: list[TokenLogprobs | None] = [None] * num_rows
        beams: list[tuple[list[float], list[int]] | None] = [None] * num_rows
        if num_lp:
            chosen = [token_list[row] for row, _ in batch.logprob_rows]
            entries = _logprob_entries(host[1:5], chosen, lp_k)
            for (row, _), entry in zip(batch.logprob_rows, entries):
                logprobs[row] = entry
        if batch.beam_rows:
            values, ids = host[num_parts - 2].tolist(), host[num_parts - 1].astype(np.int64).tolist()
            for j, (row, k) in enumerate(batch.beam_rows):
                beams[row] = (values[j][:k], ids[j][:k])
                token_list[row] = -1
        result = SamplerOutput(token_list, logprobs, beams)
        if prompt_logprobs is not None:
            targets = host[num_parts].astype(np.int64, copy=False).tolist()
            entries = _logprob_entries(host[num_parts + 1:], targets, prompt_logprobs.top_k)
            start = 0
            for seq_id, n in prompt_logprobs.seqs:
                result.prompt_logprobs[seq_id] = entries[start:start + n]
                start += n
        return result

    def target_distributions(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """What each row would sample from, for the rejection sampler of speculative decoding:
        a random row's distribution after masks, bias, penalties, temperature and top-k / top-p
        / min-p; a greedy row's processed logits (its argmax is its token; a softmax could tie
        two logits a float apart). Draws no random number."""
        logits = self._process(logits.float(), batch)
        if batch.all_greedy:
            return logits
        probs = self._filtered_probs(logits, batch)
        return probs if not batch.any_greedy else torch.where(batch.greedy[:, None], logits, probs)

    def seq_generator(self, seq_id: int, seed: int) -> torch.Generator:
        """A seeded sequence's own generator (made on its first draw, dropped by `forget`)."""
        gen = self._seq_generators.get(seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self._seq_generators[seq_id] = gen
        return gen

    def _process(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Masks, bias and penalties, in vLLM's order (in place where it can be). Rows are
        gathered as `x[rows]`, not `x.index_select(0, rows)`: with this torch's CPU build the
        latter took 476 ms for 64 rows of 128k floats, `x[rows]` 8 ms (dev box, 2 cores)."""
        if batch.allowed is not None:
            rows, local, tokens = batch.allowed
            keep = torch.zeros(rows.shape[0], logits.shape[1], dtype=torch.bool, device=logits.device)
            keep.index_put_((local, tokens), torch.ones((), dtype=torch.bool, device=logits.device))
            logits[rows] = logits[rows].masked_fill(~keep, float("-inf"))
        if batch.banned is not None:
            logits.index_put_(batch.banned, torch.full((), float("-inf"), device=logits.device))
        if batch.bias is not None:
            rows, tokens, values = batch.bias
            logits.index_put_((rows, tokens), values, accumulate=True)
        if batch.penalties is not None:
            pen, state = batch.penalties, self.penalty_state
            counts = state.counts[pen.state_rows]
            prompt_seen = state.prompt_seen[pen.state_rows] if pen.any_repetition else None
            rows = logits if pen.rows is None else logits[pen.rows]
            penalised = apply_penalties(rows, counts, prompt_seen, pen.presence, pen.frequency, pen.repetition)
            if pen.rows is None:
                logits = penalised
            else:
                logits[pen.rows] = penalised
        if batch.grammar is not None:  # last of the masks: what the grammar allows of what is left
            apply_token_bitmask(logits, *batch.grammar)
        return logits

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The exponential race over the filtered distribution. Noise is drawn for every row
        and the whole vocabulary, as always: the generators' streams, and so every seeded and
        engine-seeded sample, stay what they were."""
        probs = self._filtered_probs(logits, batch)
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for row, seq_id, seed in batch.seeded_rows:
            noise[row].exponential_(generator=self.seq_generator(seq_id, seed))
        return _row_argmax(probs / noise, self.host_fast_paths)

    def _filtered_probs(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Temperature, then top-k, top-p and min-p: each row's distribution to sample from. A
        row that does not use a filter is left exactly as it would be alone in its batch."""
        logits = logits / batch.temperatures[:, None]
        candidates = None
        if batch.top_k is not None:
            values, candidates = logits.topk(batch.max_top_k, dim=-1)  # sorted descending
            logits = _apply_top_k(logits, values, batch.top_k)
        probs = torch.softmax(logits, dim=-1)
        if batch.top_p is not None:
            if batch.top_p_in_candidates:
                probs = _apply_top_p_in_candidates(probs, candidates, batch.top_p)
            else:
                probs = _apply_top_p_sorted(probs, batch.top_p, batch.top_p_rows)
        if batch.min_p is not None:
            probs = _apply_min_p(probs, batch.min_p)
        return probs


def _row_argmax(x: torch.Tensor, host_fast_paths: bool = True) -> torch.Tensor:
    """Each row's argmax, as `x.argmax(dim=-1)` gives it (the first index on ties; a NaN counts
    as the largest value). On the CPU this is numpy's argmax over the same memory: torch's
    single-threaded one took 1.3 ms at [256, 2048] float32 logits, numpy's 0.06 ms, and it was
    most of a decode step's sampling (measured on the 2-core dev box)."""
    if host_fast_paths and x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(x.detach().numpy().argmax(axis=-1))
    return x.argmax(dim=-1)


def _to_host(parts: list[torch.Tensor]) -> list[np.ndarray]:
    """The step's results on the host with one device-to-host copy: the only point where the
    host waits for the device. Several parts travel as one float64 tensor (token ids, ranks
    and float32 logprobs are all exact in float64) and are split back on the host."""
    if len(parts) == 1:
        return [parts[0].cpu().numpy()]
    flat = torch.cat([p.reshape(-1).to(torch.float64) for p in parts]).cpu().numpy()
    out, start = [], 0
    for p in parts:
        n = p.numel()
        out.append(flat[start:start + n].reshape(p.shape))
        start += n
    return out


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, prompt_seen: torch.Tensor | None,
                    presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """Presence and frequency penalties count generated tokens (OpenAI); the repetition
    penalty applies to every token seen in prompt or output, dividing positive logits and
    multiplying negative ones (transformers' RepetitionPenaltyLogitsProcessor). `counts`:
    [R, V] generated-token counts; `prompt_seen`: [R, V] prompt tokens, None when no row has
    a repetition penalty (then it is skipped)."""
    dtype = logits.dtype
    if prompt_seen is not None:
        seen = prompt_seen | (counts > 0)
        rep = repetition[:, None].expand_as(logits)
        logits = torch.where(seen, torch.where(logits < 0, logits * rep, logits / rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(dtype)


def _logprob_parts(logprobs: torch.Tensor, chosen: torch.Tensor, max_k: int) -> list[torch.Tensor]:
    """Device side of logprob reporting for rows of `logprobs` ([R, V], normalised): the chosen
    token, its logprob and rank (1 = most likely), and the `max_k` best (values, ids); one
    topk for all rows. Always four parts (empty top-k when max_k is 0), for `_to_host`."""
    chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1)
    ranks = (logprobs > chosen_lp[:, None]).sum(dim=1) + 1
    if max_k:
        top_v, top_i = logprobs.topk(max_k, dim=-1)
    else:
        top_v = logprobs.new_empty(logprobs.shape[0], 0)
        top_i = chosen.new_empty(logprobs.shape[0], 0)
    return [chosen_lp, ranks, top_v, top_i]


def _logprob_entries(host: list[np.ndarray], chosen: list[int], top_k: list[int]) -> list[TokenLogprobs]:
    """Host side of `_logprob_parts`: its four parts as `_to_host` returns them, the chosen
    tokens, and each row's number of alternatives."""
    chosen_lp, ranks, top_v, top_i = host
    lp_list, rank_list = chosen_lp.tolist(), ranks.astype(np.int64).tolist()
    top_v_list, top_i_list = top_v.tolist(), top_i.astype(np.int64).tolist()
    out = []
    for j, (lp, rank, k) in enumerate(zip(lp_list, rank_list, top_k)):
        top = {}
        if k:
            top = {t: (v, r) for r, (v, t) in enumerate(zip(top_v_list[j][:k], top_i_list[j][:k]), start=1)}
        out.append(TokenLogprobs(chosen[j], lp, rank, top))
    return out


def gather_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, top_k: list[int]) -> list[TokenLogprobs]:
    """Per row of `logprobs` ([R, V], normalised): the chosen token's logprob and rank (1 =
    most likely) and the row's `top_k[r]` best tokens. One topk for all rows, one copy back
    (its own: passing a `PromptLogprobRequest` to the sampler's call shares the step's)."""
    host = _to_host([chosen] + _logprob_parts(logprobs, chosen, max(top_k, default=0)))
    return _logprob_entries(host[1:], host[0].astype(np.int64, copy=False).tolist(), top_k)


def _apply_top_k(logits: torch.Tensor, top_values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mask what ranks below each row's k-th value (ties with it stay). `top_values`: the rows'
    `max_k` largest values, sorted; k == vocab size means disabled for that row."""
    max_k = top_values.shape[1]
    enabled = k < logits.shape[-1]
    kth = top_values.gather(1, (k.clamp(max=max_k) - 1)[:, None])
    kth = kth.masked_fill(~enabled[:, None], float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p_sorted(probs: torch.Tensor, top_p: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Top-p by a full-vocabulary sort, over `rows` only (None: every row has top-p): a token
    goes when the tokens ranked above it already reach top_p (the first always stays); the
    rest is renormalised. Rows without top-p are left exactly as they are."""
    sub = probs if rows is None else probs[rows]
    p = top_p if rows is None else top_p[rows]
    sorted_probs, order = sub.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    drop_sorted = (cumulative - sorted_probs) >= p[:, None]
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    sub = sub.masked_fill(drop, 0.0)
    sub = sub / sub.sum(dim=-1, keepdim=True)
    if rows is None:
        return sub
    probs[rows] = sub  # probs is this step's own softmax output
    return probs


def _apply_top_p_in_candidates(probs: torch.Tensor, candidates: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p when every top-p row has a top-k: only the top-k candidates (`candidates`, the
    topk indices, best first) can carry probability, so the cumulative sum runs over them, not
    over a sorted vocabulary. The same rule as the sort: a candidate goes when those ranked
    above it reach top_p; what stays is every token at least as likely as the least likely
    candidate kept (tokens tied with it included, as top-k keeps ties). Rows with top_p == 1
    are left exactly as they are."""
    cand = probs.gather(1, candidates)  # non-increasing: softmax keeps the logits' order
    cumulative = cand.cumsum(dim=-1)
    drop = (cumulative - cand) >= top_p[:, None]
    cut = cand.masked_fill(drop, float("inf")).amin(dim=-1, keepdim=True)
    enabled = top_p[:, None] < 1.0
    probs = probs.masked_fill(probs < torch.where(enabled, cut, 0.0), 0.0)
    return probs / torch.where(enabled, probs.sum(dim=-1, keepdim=True), 1.0)


def _apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens below min_p times the row's most likely one, renormalise; rows with
    min_p == 0 are left exactly as they are (renormalising them would change their values in
    the last bit, and so a seeded row's sample with what else is in the batch)."""
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    probs = probs.masked_fill(probs < threshold, 0.0)
    return probs / torch.where(min_p[:, None] > 0.0, probs.sum(dim=-1, keepdim=True), 1.0)
