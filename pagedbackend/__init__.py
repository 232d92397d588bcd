"""pagedbackend: a paged-KV-cache LLM engine with vLLM's API, pluggable into TorchServe and PyTriton."""

from pagedbackend.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError, RequestStream
from pagedbackend.config import EngineArgs, EngineConfig
from pagedbackend.llm import LLM
from pagedbackend.llm_engine import LLMEngine
from pagedbackend.outputs import CompletionOutput, RequestOutput
from pagedbackend.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "AsyncLLMEngine",
    "CompletionOutput",
    "EngineArgs",
    "EngineConfig",
    "EngineDeadError",
    "LLMEngine",
    "RequestFailedError",
    "RequestOutput",
    "RequestStream",
    "SamplingParams",
]
