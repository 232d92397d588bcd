"""The engine core's shape: the scheduler side is torch-free plain data, a step is a fold whose
outputs are plain data, and the prefix cache counts each admitted prompt once."""

from __future__ import annotations

import pickle
from pathlib import Path
import subprocess
import sys

from pagedbackend.kv_cache_manager import KVCacheManager
from pagedbackend.sampling_params import SamplingParams
from pagedbackend.scheduler import Scheduler
from pagedbackend.sequence import Sequence
from pagedbackend.step import RunnerOutput, SchedulerOutput


def test_the_scheduler_and_the_kv_cache_manager_import_without_torch():
    code = ("import sys, pagedbackend.scheduler, pagedbackend.kv_cache_manager, pagedbackend.step, "
            "pagedbackend.engine_core; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)


def _step(sched: Scheduler) -> SchedulerOutput:
    out = sched.schedule()
    rows = out.sampled_seq_ids()
    sched.update(out, RunnerOutput(rows, [[7] for _ in rows], [None] * len(rows), [None] * len(rows)))
    return out


def test_a_prompt_waiting_for_blocks_is_counted_once_by_the_prefix_cache():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    sched.add_request([Sequence("big", list(range(10, 30)), params, 0.0)])  # 5 of 8 blocks, then 7
    _step(sched)
    sched.add_request([Sequence("waits", list(range(50, 62)), params, 1.0)])  # 3 blocks: not yet free
    waited = 0
    while sched.has_unfinished():
        out = _step(sched)
        waited += any(s.request_id == "waits" for s in sched.waiting)
    assert waited >= 2  # it really waited several steps
    assert kv.prefix_stats.queries == 20 + 12  # each prompt once
    sched.check_all_free()


def test_step_data_is_plain_and_picklable():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32)
    sched.add_request([Sequence("r", [5, 6, 7, 8, 9], SamplingParams(n=2, temperature=1.0, max_tokens=3), 0.0, index=i)
                       for i in range(2)])
    out = sched.schedule()
    assert pickle.loads(pickle.dumps(out)) == out
    assert out.new_seqs[0].token_ids == [5, 6, 7, 8, 9] and len(out.scheduled[0].forks) == 1
    rows = out.sampled_seq_ids()
    result = RunnerOutput(rows, [[11], [12]], [None, None], [None, None])
    outputs = sched.update(out, result)
    assert pickle.loads(pickle.dumps(outputs)) == outputs
    assert sorted((o.index, o.new_token_ids) for o in outputs) == [(0, [11]), (1, [12])]
    while sched.has_unfinished():
        _step(sched)
    sched.check_all_free()


def test_every_package_folder_is_in_the_distribution():
    """pyproject lists the packages by hand (two are mapped from top-level folders): a new
    folder missing there is absent from a wheel, though an editable install still finds it."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"pagedbackend": root / "pagedbackend",
               **{name: root / path for name, path in tool["package-dir"].items()}}
    found = set()
    for package, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((package, *rel)))
    assert sorted(found - set(tool["packages"])) == []
