"""Beam search as transformers does it, decided over plain numbers.

A `BeamSearchGroup` holds one request's running beams (sequences in the engine, sharing KV
blocks through the cache manager's ref counts) and its finished hypotheses. Each running beam
reports its best next tokens with their log-probabilities; when every running beam has
reported, `advance()` picks the next running beams exactly as transformers' `_beam_search`
does:

- keep the `beams_to_keep = max(2, 1 + number of EOS ids) * beam_width` best continuations of
  all beams by accumulated log-probability (so at least `beam_width` of them do not end);
- a continuation that ends (EOS, or the length limit) becomes a finished hypothesis only if it
  is among the best `beam_width`, scored `sum logprob / generated_length ** length_penalty`;
  the finished set keeps the best `beam_width`;
- the best `beam_width` continuations that do not end are the next running beams;
- the search stops when every continuation ends, or when the finished set is full and the best
  running beam cannot beat its worst member (transformers' early-stopping heuristic, with
  `early_stopping` False / True / "never" meaning what it means there).

Scores are accumulated in float32, as transformers does, so ties and near-ties break the same
way. The group is a `RequestGroup`: it returns its decision as `Fork`, `Drop`, `Append` and
`Done` items, which the scheduler applies; nothing here touches blocks or tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np

from pagedbackend.errors import InvalidRequest
from pagedbackend.request_group import Append, Decision, Done, Drop, Fork, RequestGroup
from pagedbackend.sequence import Sequence
from pagedbackend.step import BeamHypothesis, RequestDone, RunnerOutput

_MASK = np.float32(-1.0e9)  # transformers' "never pick this" offset


@dataclass
class BeamSearchParams:
    """vLLM's `BeamSearchParams`, plus transformers' `early_stopping`."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    early_stopping: Union[bool, str] = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(name, f"{name} must be a positive integer, got {value!r}")
        if self.temperature != 0.0:
            raise InvalidRequest("temperature", "temperature must be 0: beam search here is deterministic "
                                                f"(transformers' num_beams with do_sample=False), got {self.temperature}")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)):
            raise InvalidRequest("length_penalty", f"length_penalty must be a number, got {self.length_penalty!r}")
        if self.early_stopping not in (False, True, "never"):
            raise InvalidRequest("early_stopping", f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")


@dataclass
class BeamSearchSequence:
    """One returned beam (vLLM's shape): `tokens` and `text` cover prompt and generation."""

    tokens: list[int]
    cum_logprob: float
    text: str | None = None
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)


@dataclass
class BeamSearchOutput:
    """The best `beam_width` sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


@dataclass
class Hypothesis:
    """A finished beam: its generated tokens, length-penalised score and raw log-probability."""

    token_ids: list[int]
    score: float
    cumulative_logprob: float
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass(eq=False)
class BeamSearchGroup(RequestGroup):
    params: BeamSearchParams
    prompt_len: int
    eos_token_ids: frozenset[int]
    max_model_len: int
    running: list[Sequence] = field(default_factory=list)  # best first
    scores: dict[int, np.float32] = field(default_factory=dict)  # seq_id -> accumulated logprob
    finished: list[Hypothesis] = field(default_factory=list)  # best first, at most beam_width
    reports: dict[int, tuple[list[float], list[int]]] = field(default_factory=dict)
    done: bool = False
    num_steps: int = 0
    _improvable: bool = True  # transformers' is_early_stop_heuristic_unsatisfied

    swappable = False  # a parked beam's report must stay valid until its group advances

    @property
    def width(self) -> int:
        return self.params.beam_width

    @property
    def candidates_per_beam(self) -> int:
        n_eos = 0 if self.params.ignore_eos else len(self.eos_token_ids)
        return max(2, 1 + n_eos) * self.width

    @property
    def beam_k(self) -> int:
        return self.candidates_per_beam

    # ------------------------------------------------------- RequestGroup
    def seqs_at_admission(self, seq: Sequence) -> int:
        return self.width if self.num_steps == 0 else 1

    def is_parked(self, seq: Sequence) -> bool:
        return seq.seq_id in self.reports

    def on_sampled(self, seq: Sequence, row: int, result: RunnerOutput) -> list[Decision]:
        self.report(seq, *result.beam_candidates[row])
        return self.decide() if self.ready else []

    def decide(self) -> list[Decision]:
        """One beam-search step as decisions: a parent kept once continues itself; kept again,
        it branches (sharing every block; the shared partial block is copied on first write);
        beams not kept are dropped. When the search is over every beam is dropped."""
        next_beams = self.advance()
        old = self.running
        taken: set[int] = set()
        decisions: list[Decision] = []
        beams: list[tuple[Sequence, int, float]] = []
        for parent, token, score in next_beams:
            if parent.seq_id in taken:
                child = parent.branch()
                decisions.append(Fork(parent, child))
                beams.append((child, token, score))
            else:
                taken.add(parent.seq_id)
                beams.append((parent, token, score))
        dropped = [s for s in old if s.seq_id not in taken]
        decisions += (Drop(s) for s in dropped)
        decisions += (Append(s, token, score) for s, token, score in beams)
        if self.done:
            self.running = dropped  # the last beams, now finished
            decisions.append(Done(RequestDone(old[0].request_id, "stop", beams=self.hypotheses())))
        else:
            self.set_running([(s, score) for s, _, score in beams])
        return decisions

    def hypotheses(self) -> list[BeamHypothesis]:
        """The finished hypotheses so far, best first, as the frontend receives them."""
        return [BeamHypothesis(list(h.token_ids), h.cumulative_logprob, h.finish_reason) for h in self.finished]

    def start(self, seq: Sequence) -> None:
        """The prompt is the single beam of the first step (transformers' other initial beams
        score -1e9, so none of their continuations is ever kept)."""
        self.running = [seq]
        self.scores = {seq.seq_id: np.float32(0.0)}
        seq.group = self

    def report(self, seq: Sequence, logprobs: list[float], token_ids: list[int]) -> None:
        self.reports[seq.seq_id] = (logprobs, token_ids)

    @property
    def ready(self) -> bool:
        return not self.done and all(s.seq_id in self.reports for s in self.running)

    def advance(self) -> list[tuple[Sequence, int, float]]:
        """One beam-search step over the reported candidates. Returns the next running beams
        as (parent beam, token to append, accumulated logprob), best first; empty when the
        search is over (`done`)."""
        width = self.width
        keep = self.candidates_per_beam
        gen_len = self.running[0].num_output_tokens + 1  # every beam has the same length
        at_limit = gen_len >= self.params.max_tokens or self.prompt_len + gen_len >= self.max_model_len

        candidates = []  # (score, beam order, rank, parent, token)
        for order, seq in enumerate(self.running):
            base = self.scores[seq.seq_id]
            values, tokens = self.reports[seq.seq_id]
            for rank, (lp, token) in enumerate(zip(values, tokens)):
                candidates.append((np.float32(base + np.float32(lp)), order, rank, seq, token))
        self.reports.clear()
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        candidates = candidates[:keep]
        ends = [at_limit or (not self.params.ignore_eos and c[4] in self.eos_token_ids) for c in candidates]

        # Finished hypotheses: only from the best `width` continuations.
        for (score, _, _, parent, token), end in zip(candidates[:width], ends[:width]):
            if end:
                penalised = float(score / np.float32(gen_len ** self.params.length_penalty))
                reason = "stop" if not self.params.ignore_eos and token in self.eos_token_ids else "length"
                self.finished.append(Hypothesis(parent.output_token_ids + [token], penalised, float(score), reason))
        self.finished.sort(key=lambda h: -h.score)
        del self.finished[width:]

        masked = sorted(range(len(candidates)), key=lambda i: (-(candidates[i][0] + (_MASK if ends[i] else 0)), i))
        best_running = candidates[masked[0]][0] + (_MASK if ends[masked[0]] else np.float32(0))
        self.num_steps += 1

        if self.params.early_stopping == "never" and self.params.length_penalty > 0.0:
            best_len = self.params.max_tokens
        else:
            best_len = gen_len
        full = len(self.finished) == width
        worst_finished = self.finished[-1].score if full else float(_MASK)
        best_possible = float(best_running / np.float32(best_len ** self.params.length_penalty))
        self._improvable = self._improvable and best_possible > worst_finished
        if all(ends) or not self._improvable or (full and self.params.early_stopping is True):
            self.done = True
            return []
        nxt = [candidates[i] for i in masked[:width]]
        return [(parent, token, float(score)) for score, _, _, parent, token in nxt]

    def set_running(self, beams: list[tuple[Sequence, float]]) -> None:
        self.running = [seq for seq, _ in beams]
        self.scores = {seq.seq_id: np.float32(score) for seq, score in beams}
