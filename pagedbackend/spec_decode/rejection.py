"""The rejection sampler of speculative decoding (Leviathan et al. 2023, as vLLM applies it):
the tokens it emits are distributed exactly as the target model's own samples would be, and
under greedy decoding are exactly the target's argmax tokens.

For a row with proposals d_1..d_m (m <= k) and the target's distributions p_1..p_{m+1} at the
m + 1 verified positions (after the request's penalties, bias, masks, temperature and top-k /
top-p / min-p, i.e. what the request would sample from), and the proposer's q_1..q_m:
- greedy: d_i is accepted while it is argmax p_i; the first position that disagrees emits
  argmax p_i instead; when all m agree the bonus token argmax p_{m+1} follows;
- random: d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection
  the emitted token is drawn from max(p_i - q_i, 0), normalised; when all are accepted the bonus
  token is drawn from p_{m+1}. An n-gram proposal is a point mass: q_i(d_i) = 1, so d_i is
  accepted with probability p_i(d_i) and a rejection draws from p_i without d_i.
A random row draws uniforms for its acceptance tests and one vocabulary of exponential noise
(the final token is taken by the exponential race, argmax(r / E), as the sampler does). A
seeded request's row draws m uniforms and its noise from its own generator, so its output does
not depend on its batch; the other random rows draw theirs (k uniforms each, those past their
m unused) from the engine's generator in one call.
Greedy rows draw nothing. Rows without proposals are not this sampler's: they sample as usual.

Everything is batched over rows and positions; the host reads the result once (`tolist`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RejectionOutput:
    """Per row: the emitted tokens (the accepted proposals, then one target token) and how many
    proposals were accepted (for the acceptance metrics)."""

    tokens: list[list[int]]
    num_accepted: list[int]


def rejection_sample(target_probs: torch.Tensor, draft_tokens: torch.Tensor, num_drafts: list[int],
                     greedy: list[bool], draft_probs: torch.Tensor | None = None,
                     generators: list[torch.Generator | None] | None = None,
                     default_generator: torch.Generator | None = None) -> RejectionOutput:
    """Verify the proposals of a batch of rows.

    target_probs: [rows, k + 1, vocab], the target's distributions at each verified position
    (row r's positions past num_drafts[r] + 1 are ignored); for greedy rows anything whose
    argmax is the target's (logits will do). draft_tokens: [rows, k] int64 (past num_drafts[r]
    ignored). draft_probs: [rows, k, vocab] for a draft model; None for point-mass proposals
    (n-gram). generators: per row, the request's seeded generator or None for
    `default_generator`."""
    rows, width, vocab = target_probs.shape
    k = width - 1
    if draft_tokens.shape != (rows, k) or len(num_drafts) != rows or len(greedy) != rows:
        raise ValueError(f"rejection_sample: {rows} rows of {k} proposals expected, got draft_tokens "
                         f"{tuple(draft_tokens.shape)}, {len(num_drafts)} counts, {len(greedy)} greedy flags")
    if any(not 1 <= m <= k for m in num_drafts):
        raise ValueError(f"rejection_sample: every row needs 1..{k} proposals, got {num_drafts}")
    device = target_probs.device
    generators = generators or [None] * rows
    counts = torch.tensor(num_drafts, device=device)
    positions = torch.arange(k, device=device)
    in_range = positions[None, :] < counts[:, None]  # [rows, k]
    is_greedy = torch.tensor(greedy, device=device)
    # Slots past a row's count may hold any filler (vLLM pads with -1): made a valid index.
    drafts = draft_tokens.to(device=device, dtype=torch.long).masked_fill(~in_range, 0)

    probs_k = target_probs[:, :k]
    p_draft = probs_k.gather(-1, drafts[..., None])[..., 0]  # p_i(d_i)
    q_draft = torch.ones_like(p_draft) if draft_probs is None else draft_probs.gather(-1, drafts[..., None])[..., 0]

    # Random numbers: the uniforms of the acceptance tests, then the noise of the final token's
    # race. Seeded rows one by one from their own generators; the other random rows together.
    uniforms = torch.ones(rows, k, device=device, dtype=torch.float32)
    noise = torch.ones(rows, vocab, device=device, dtype=torch.float32)
    engine_rows = [r for r in range(rows) if not greedy[r] and generators[r] is None]
    if engine_rows:
        index = torch.tensor(engine_rows, device=device)
        uniforms[index] = torch.rand(len(engine_rows), k, generator=default_generator, device=device)
        noise[index] = torch.empty(len(engine_rows), vocab, device=device).exponential_(generator=default_generator)
    for r in range(rows):  # a seeded row draws for its own proposals only: not for the batch's longest
        if not greedy[r] and generators[r] is not None:
            uniforms[r, :num_drafts[r]] = torch.rand(num_drafts[r], generator=generators[r], device=device)
            noise[r].exponential_(generator=generators[r])

    target_argmax = probs_k.argmax(dim=-1)
    accept_random = uniforms * q_draft < p_draft  # u < p / q without dividing by q
    accept = torch.where(is_greedy[:, None], target_argmax == drafts, accept_random) & in_range
    num_accepted = accept.to(torch.int64).cumprod(dim=1).sum(dim=1)  # accepted until the first rejection

    # The final token: from position j = num_accepted. Rejected (j < m): the residual
    # max(p_j - q_j, 0); all accepted (j == m): the bonus distribution p_{m+1}.
    rows_index = torch.arange(rows, device=device)
    p_final = target_probs[rows_index, num_accepted]  # [rows, vocab]
    rejected = num_accepted < counts
    j = num_accepted.clamp(max=k - 1)
    if draft_probs is None:
        q_final = torch.zeros_like(p_final).scatter_(1, drafts[rows_index, j][:, None], 1.0)
    else:
        q_final = draft_probs[rows_index, j]
    residual = (p_final - q_final).clamp_(min=0)
    # A residual of all zeros only arises where p_j = q_j, which never rejects: keep p there.
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_final)
    final_dist = torch.where(rejected[:, None], residual, p_final)
    sampled = (final_dist / noise).argmax(dim=-1)
    final = torch.where(is_greedy, p_final.argmax(dim=-1), sampled)

    out = torch.cat([drafts, final[:, None], num_accepted[:, None]], dim=1).tolist()  # one read back
    tokens = [row[:n] + [row[k]] for row, n in zip(out, (row[k + 1] for row in out))]
    return RejectionOutput(tokens=tokens, num_accepted=[row[k + 1] for row in out])
