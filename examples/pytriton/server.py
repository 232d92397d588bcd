"""Serve a model with your own PyTriton `Triton` instance and `bind_llm`.

    python examples/pytriton/server.py --model models/demo-llama

(`pagedbackend serve pytriton --model ...` does the same with the engine metrics endpoint,
a temporary workspace and signal handling included.)
"""

import argparse

from pagedbackend import EngineArgs
from pagedbackend.adapters.pytriton import bind_llm  # import before Triton starts (libpython fix)
from pytriton.triton import Triton, TritonConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="models/demo-llama")
    args = p.parse_args()
    config = TritonConfig(http_address="127.0.0.1", grpc_address="127.0.0.1", metrics_address="127.0.0.1")
    with Triton(config=config) as triton:
        engine = bind_llm(triton, EngineArgs(model=args.model), model_name="llm")
        try:
            triton.serve()  # blocks until Ctrl-C
        finally:
            engine.shutdown()


if __name__ == "__main__":
    main()
