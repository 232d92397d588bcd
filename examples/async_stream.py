"""Many concurrent streams through one AsyncLLMEngine (continuous batching), from asyncio.

    python examples/async_stream.py --model models/demo-llama
"""

import argparse
import asyncio
import time

from pagedbackend import AsyncLLMEngine, EngineArgs, SamplingParams


async def stream(engine: AsyncLLMEngine, i: int) -> int:
    n = 0
    async for out in engine.generate(f"Story number {i}:", SamplingParams(temperature=0.7, seed=i, max_tokens=32),
                                     request_id=f"story-{i}"):
        n = len(out.outputs[0].token_ids)
        if i == 0:
            print(out.outputs[0].delta_text, end="", flush=True)
    return n


async def main(model: str, concurrency: int) -> None:
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=model))
    start = time.perf_counter()
    counts = await asyncio.gather(*(stream(engine, i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    stats = engine.get_stats()
    print(f"\n\n{sum(counts)} tokens from {concurrency} streams in {elapsed:.2f}s; "
          f"largest batch {stats['max_batch_seqs']} sequences")
    engine.shutdown()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="models/demo-llama")
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    asyncio.run(main(args.model, args.concurrency))
