"""`LLM`: offline batch generation with vLLM's interface.

    llm = LLM(model="models/demo-llama")
    outs = llm.generate(["Hello", "The sky is"], SamplingParams(max_tokens=32))
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from pagedbackend.async_engine import RequestFailedError
from pagedbackend.config import EngineArgs
from pagedbackend.llm_engine import LLMEngine, PromptType
from pagedbackend.outputs import RequestOutput
from pagedbackend.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        """`kwargs` are `EngineArgs` fields (dtype, device, block_size, num_kv_blocks, ...)."""
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs))

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

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

        engine = self.llm_engine
        ids: list[str] = []
        results: dict[str, RequestOutput] = {}
        try:
            for prompt, sp in zip(prompts, params):
                request_id = engine.new_request_id()
                engine.add_request(request_id, prompt, sp)
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
