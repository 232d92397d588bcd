"""pagedbackend: a paged-KV-cache LLM engine with vLLM's API, pluggable into TorchServe and PyTriton."""

from pagedbackend.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError, RequestStream
from pagedbackend.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from pagedbackend.config import EngineArgs, EngineConfig
from pagedbackend.llm import LLM
from pagedbackend.llm_engine import LLMEngine
from pagedbackend.outputs import CompletionOutput, Logprob, RequestOutput
from pagedbackend.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "AsyncLLMEngine",
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSearchSequence",
    "CompletionOutput",
    "EngineArgs",
    "EngineConfig",
    "EngineDeadError",
    "LLMEngine",
    "Logprob",
    "RequestFailedError",
    "RequestOutput",
    "RequestOutputKind",
    "RequestStream",
    "SamplingParams",
]
