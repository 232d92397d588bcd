"""Priority scheduling and swap preemption on a real model: the low-priority requests are the
ones preempted, swapped KV comes back intact (same tokens as transformers), nothing leaks."""

from __future__ import annotations

import pytest

from helpers import hf_greedy, random_prompts
from pagedbackend import SamplingParams
from pagedbackend.errors import InvalidRequest


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_low_priority_requests_are_preempted_first_and_all_match_transformers(mode, model_dir, make_engine):
    path = model_dir("llama")
    engine = make_engine(path, num_kv_blocks=20, block_size=8, max_num_seqs=8, max_model_len=128,
                         scheduling_policy="priority", preemption_mode=mode, swap_space=0.01)
    prompts = random_prompts([30, 25, 40, 20, 35, 28], 1024, seed=40)
    priorities = [0, 9, 0, 9, 1, 9]
    params = SamplingParams(temperature=0, max_tokens=24)
    for i, (prompt, prio) in enumerate(zip(prompts, priorities)):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params, priority=prio)
    victims: list[int] = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        victims.extend(engine.scheduler.seq(i).priority for i in out.preempted_seq_ids)
        return out

    engine.scheduler.schedule = recording_schedule
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert victims and victims[0] == 9
    # An urgent request is only preempted once no less urgent one is running.
    assert victims.count(0) < victims.count(9)
    for i, prompt in enumerate(prompts):
        assert finals[f"r{i}"].outputs[0].token_ids == hf_greedy(path, prompt, 24)
    stats = engine.get_stats()
    assert (stats["num_swapped_out"] > 0) == (mode == "swap")


def test_invalid_policy_mode_and_priority_are_named(model_dir, make_engine):
    from pagedbackend import EngineArgs

    path = str(model_dir("llama"))
    for field, value in (("scheduling_policy", "lifo"), ("preemption_mode", "drop"), ("swap_space", -1)):
        with pytest.raises(ValueError, match=field):
            EngineArgs(model=path, **{field: value}).create_engine_config()
    engine = make_engine(path)
    with pytest.raises(InvalidRequest, match="priority"):
        engine.add_request("r", "hello", SamplingParams(), priority="high")
