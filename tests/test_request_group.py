"""Multi-sequence requests decide, the scheduler applies: `ParallelSamples` (n > 1) and
`BeamSearchGroup` return plain decisions (fork, sample, append, drop, done) and touch neither
blocks nor the scheduler's queues."""

from __future__ import annotations

import pytest

from pagedbackend.beam_search import BeamSearchGroup, BeamSearchParams
from pagedbackend.request_group import Append, Done, Drop, Fork, ParallelSamples, Sample
from pagedbackend.sampling_params import SamplingParams
from pagedbackend.sequence import Sequence, SequenceStatus
from pagedbackend.step import RunnerOutput

PROMPT = [5, 6, 7]


def beams_result(row_candidates: list[tuple[list[float], list[int]]]) -> RunnerOutput:
    n = len(row_candidates)
    return RunnerOutput(list(range(n)), [[] for _ in range(n)], [None] * n, list(row_candidates))


def test_parallel_samples_fork_from_the_first_sample_then_become_plain_sequences():
    params = SamplingParams(n=3, max_tokens=4)
    first, second, third = (Sequence("r", PROMPT, params, 0.0, index=i) for i in range(3))
    group = ParallelSamples(first, [second, third])
    assert first.group is group and second.group is None
    assert group.seqs_at_admission(first) == 3
    assert [f.seq_id for f in group.forks(first)] == [second.seq_id, third.seq_id]

    third.status = SequenceStatus.FINISHED_ABORTED  # ended before it ever ran: not forked
    decisions = group.on_sampled(first, 4, RunnerOutput.empty())
    assert decisions == [Fork(first, second), Sample(second, 5), Sample(first, 4)]
    assert first.group is None and group.forks(first) == ()


def test_parallel_samples_not_yet_forked_end_with_their_first_sample():
    params = SamplingParams(n=2, max_tokens=4)
    first, second = (Sequence("r", PROMPT, params, 0.0, index=i) for i in range(2))
    group = ParallelSamples(first, [second])
    assert group.ends_with(first) == (second,)
    assert group.ends_with(first) == ()  # told once


def test_beam_group_branches_a_parent_kept_twice_and_drops_a_beam_not_kept():
    group = BeamSearchGroup(BeamSearchParams(beam_width=2, max_tokens=3), len(PROMPT), frozenset({1}), 64)
    root = Sequence("r", PROMPT, SamplingParams(max_tokens=3), 0.0)
    group.start(root)
    assert root.group is group and group.seqs_at_admission(root) == 2 and not group.swappable

    # Step 1: one beam; its two best continuations both survive -> it continues and branches.
    decisions = group.on_sampled(root, 0, beams_result([([-0.1, -0.5, -2.0, -3.0, -4.0, -5.0], [10, 11, 12, 13, 1, 14])]))
    fork, keep_root, keep_branch = decisions
    assert isinstance(fork, Fork) and fork.parent is root
    branch = fork.child
    assert branch.token_ids == PROMPT and branch.group is group  # a copy of the root, before the appends
    assert (keep_root.seq, keep_root.token) == (root, 10) and (keep_branch.seq, keep_branch.token) == (branch, 11)
    assert keep_root.cumulative_logprob == pytest.approx(-0.1) and keep_branch.cumulative_logprob == pytest.approx(-0.5)
    assert group.running == [root, branch] and not group.is_parked(root)

    # Apply the appends as the scheduler would; step 2: the root's continuations beat the branch's.
    root.token_ids.append(10)
    branch.token_ids.append(11)
    first = group.on_sampled(root, 0, beams_result([([-0.1, -0.2, -5, -6, -7, -8], [20, 21, 22, 23, 24, 25])]))
    assert first == [] and group.is_parked(root) and not group.is_parked(branch)  # waits for its sibling
    decisions = group.on_sampled(branch, 1, beams_result([None, ([-3.0, -4, -5, -6, -7, -8], [30, 31, 32, 33, 34, 35])]))
    kinds = [type(d) for d in decisions]
    assert kinds == [Fork, Drop, Append, Append]
    assert decisions[0].parent is root and decisions[1].seq is branch
    assert [(d.seq, d.token) for d in decisions[2:]] == [(root, 20), (decisions[0].child, 21)]


def test_beam_group_says_done_with_its_hypotheses_when_the_search_ends():
    group = BeamSearchGroup(BeamSearchParams(beam_width=1, max_tokens=1), len(PROMPT), frozenset({1}), 64)
    root = Sequence("r", PROMPT, SamplingParams(max_tokens=1), 0.0)
    group.start(root)
    decisions = group.on_sampled(root, 0, beams_result([([-0.3, -0.9], [10, 11])]))
    drop, done = decisions
    assert drop == Drop(root)
    assert isinstance(done, Done) and done.result.request_id == "r" and done.result.finish_reason == "stop"
    assert [h.token_ids for h in done.result.beams] == [[10]]
    assert group.done
