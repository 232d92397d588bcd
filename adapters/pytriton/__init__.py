"""PyTriton binding: a pagedbackend engine behind Triton's vLLM-backend tensor interface.

    from pytriton.triton import Triton
    from pagedbackend.adapters.pytriton import bind_llm   # import before starting Triton

    with Triton() as triton:
        engine = bind_llm(triton, EngineArgs(model="models/demo-llama"), model_name="llm")
        triton.serve()

Importing this package puts the running interpreter's libpython first on LD_LIBRARY_PATH
(see `prefer_running_libpython`), which Triton's Python backend needs on machines whose
system libpython differs from the interpreter in use.
"""

from pagedbackend.adapters.pytriton.server import MetricsServer, PyTritonServer, prefer_running_libpython

prefer_running_libpython()

from pagedbackend.adapters.pytriton.binding import LLMModel, bind_llm, bind_model  # noqa: E402

__all__ = ["LLMModel", "MetricsServer", "PyTritonServer", "bind_llm", "bind_model", "prefer_running_libpython"]
