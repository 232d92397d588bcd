"""Streaming with tritonclient's gRPC client, the way clients of Triton's vLLM backend do it,
then a request cancelled mid-stream (the server aborts it and frees its KV blocks).

    python examples/pytriton/client_tritonclient.py --url 127.0.0.1:8001 --model llm
"""

import argparse
import json
import queue

import numpy as np
import tritonclient.grpc as grpcclient


def inputs(prompt: str, sampling: dict) -> list:
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    stream = grpcclient.InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([True]))
    params = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=np.object_))
    return [text, stream, params]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="127.0.0.1:8001")
    p.add_argument("--model", default="llm")
    args = p.parse_args()

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(args.url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(args.model, inputs("Once upon a time", {"max_tokens": 32, "temperature": 0.7, "seed": 0}),
                              enable_empty_final_response=True)
    while True:
        result, error = results.get()
        if error:
            raise SystemExit(f"error: {error}")
        if result.as_numpy("text_output") is not None:
            print(result.as_numpy("text_output")[0].decode(), end="", flush=True)
        if result.get_response().parameters["triton_final_response"].bool_param:
            print()
            break
    client.stop_stream()

    print("== cancelling a long request after 3 chunks")
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(args.model, inputs("Tell me everything", {"max_tokens": 400, "ignore_eos": True}))
    for _ in range(3):
        _, error = results.get()
        if error:
            raise SystemExit(f"error: {error}")
    client.stop_stream(cancel_requests=True)
    client.close()
    print("cancelled")


if __name__ == "__main__":
    main()
