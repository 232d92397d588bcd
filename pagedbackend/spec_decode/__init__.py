"""Speculative decoding: the runner proposes tokens after a step (`proposer`: n-gram prompt
lookup, or a draft model with its own KV in the target's block ids), the scheduler schedules
them as part of the sequence's next step (a short query over its context) and rolls back what
is rejected, and the runner verifies them (`verifier` over `rejection`), keeping the target
model's output distribution exactly (greedy: token for token).

`config` (what `speculative_config` means) imports nothing heavy: the scheduler's side must
import without torch. Import the other modules by name."""
