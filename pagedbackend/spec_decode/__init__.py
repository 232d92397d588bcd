"""Speculative decoding: proposers (n-gram prompt lookup) and the rejection sampler that keeps
the target model's output distribution exactly (greedy: token for token).

Not yet wired into the scheduler and runner (issue 15): these are the parts the step will call
— `propose_ngram` on the host before scheduling, `rejection_sample` on the verified logits."""

from pagedbackend.spec_decode.ngram import propose_ngram
from pagedbackend.spec_decode.rejection import RejectionOutput, rejection_sample

__all__ = ["RejectionOutput", "propose_ngram", "rejection_sample"]
