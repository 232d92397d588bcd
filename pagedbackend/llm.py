"""`LLM`: offline batch generation with vLLM's interface.

    llm = LLM(model="models/demo-llama")
    outs = llm.generate(["Hello", "The sky is"], SamplingParams(max_tokens=32))
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from tqdm.auto import tqdm

from pagedbackend.async_engine import RequestFailedError
from pagedbackend.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from pagedbackend.config import EngineArgs
from pagedbackend.llm_engine import LLMEngine, PromptType
from pagedbackend.outputs import RequestOutput
from pagedbackend.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        """`kwargs` are `EngineArgs` fields (dtype, device, block_size, num_kv_blocks, ...)."""
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs))

    def shutdown(self) -> None:
        """Stop the engine's tensor-parallel workers now (they also stop when this process
        exits); the object cannot generate afterwards."""
        self.llm_engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt block, so the next requests compute from scratch."""
        return self.llm_engine.reset_prefix_cache()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt, batched continuously; outputs come back in input order."""
        if isinstance(prompts, (str, Mapping)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params: got {len(params)} for {len(prompts)} prompts; pass one, or one per prompt")

        adds = [lambda rid, p=p, sp=sp: self.llm_engine.add_request(rid, p, sp) for p, sp in zip(prompts, params)]
        return self._run(adds, use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search for every prompt (transformers' `num_beams` decoding); the beams of a
        prompt share KV blocks. Returns, per prompt, the best `beam_width` sequences."""
        if isinstance(prompts, (str, Mapping)):
            prompts = [prompts]
        adds = [lambda rid, p=p: self.llm_engine.add_beam_search_request(rid, p, params) for p in prompts]
        results = []
        for out in self._run(adds, use_tqdm):
            prompt_text = out.prompt if out.prompt is not None else self.llm_engine.tokenizer.decode(out.prompt_token_ids)
            results.append(BeamSearchOutput([
                BeamSearchSequence(tokens=out.prompt_token_ids + c.token_ids, cum_logprob=c.cumulative_logprob,
                                   text=prompt_text + c.text, finish_reason=c.finish_reason)
                for c in out.outputs]))
        return results

    def _run(self, adds: list[Callable[[str], None]], use_tqdm: bool) -> list[RequestOutput]:
        """Add every request, step until all finish, return their final outputs in order."""
        engine = self.llm_engine
        ids: list[str] = []
        results: dict[str, RequestOutput] = {}
        try:
            for add in adds:
                request_id = engine.new_request_id()
                add(request_id)
                ids.append(request_id)
            with tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
                while engine.has_unfinished_requests():
                    for out in engine.step():
                        if out.finished:
                            results[out.request_id] = out
                            bar.update(1)
        finally:
            for request_id in ids:  # on an error or interrupt, leave no request holding blocks
                if request_id not in results:
                    engine.abort_request(request_id)
        failed = [results[i] for i in ids if results[i].error is not None]
        if failed:
            raise RequestFailedError(f"{len(failed)} of {len(ids)} request(s) failed; first: {failed[0].error}")
        return [results[i] for i in ids]
