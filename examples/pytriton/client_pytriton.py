"""PyTriton's own clients: streaming with DecoupledModelClient (typed inputs, no JSON needed).

    python examples/pytriton/client_pytriton.py --url grpc://127.0.0.1:8001 --model llm
"""

import argparse

import numpy as np
from pytriton.client import DecoupledModelClient


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="grpc://127.0.0.1:8001")
    p.add_argument("--model", default="llm")
    args = p.parse_args()
    with DecoupledModelClient(args.url, args.model) as client:
        for chunk in client.infer_sample(text_input=np.array([b"PagedAttention stores"]), stream=np.array([True]),
                                         exclude_input_in_output=np.array([True]),
                                         max_tokens=np.array([32], dtype=np.int32),
                                         temperature=np.array([0.0], dtype=np.float32)):
            print(chunk["text_output"][0].decode(), end="", flush=True)
            if "finish_reason" in chunk:
                print(f"\n[finish_reason={chunk['finish_reason'][0].decode()}]")


if __name__ == "__main__":
    main()
