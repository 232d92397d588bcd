"""A client for a pagedbackend model served by TorchServe: native streaming and non-streaming
requests, and the OpenAI-compatible routes (with the `openai` package if it is installed).

    pagedbackend serve torchserve --model models/demo-llama --name demo     # in one terminal
    python examples/torchserve/client.py --url http://127.0.0.1:8080 --model demo --key <inference key>
"""

from __future__ import annotations

import argparse
import http.client
import json
import urllib.parse


def request(url: str, path: str, body: dict, key: str | None):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=300)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request("POST", path, body=json.dumps(body), headers=headers)
    return conn.getresponse()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--model", default="demo")
    p.add_argument("--key", default=None, help="TorchServe inference key (key_file.json); omit if auth is off")
    args = p.parse_args()
    base = f"/predictions/{args.model}"

    print("== streaming (newline-delimited JSON)")
    resp = request(args.url, base, {"prompt": "Once upon a time", "stream": True, "max_tokens": 32,
                                    "temperature": 0.7, "seed": 1}, args.key)
    while line := resp.readline():
        chunk = json.loads(line)
        print(chunk["text"], end="", flush=True)
        if "usage" in chunk:
            print(f"\n[finish_reason={chunk['finish_reason']}, usage={chunk['usage']}]")

    print("== non-streaming")
    resp = request(args.url, base, {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0},
                   args.key)
    print(json.loads(resp.read()))

    print("== OpenAI /v1/chat/completions over plain HTTP (SSE)")
    resp = request(args.url, f"{base}/1.0/v1/chat/completions",
                   {"model": args.model, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16,
                    "stream": True}, args.key)
    while line := resp.readline():
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            delta = json.loads(line[6:])["choices"][0]["delta"]
            print(delta.get("content", ""), end="", flush=True)
    print()

    try:
        import openai
    except ImportError:
        print("(pip install openai to try the official client)")
        return
    print("== the openai client")
    client = openai.OpenAI(base_url=f"{args.url}{base}/1.0/v1", api_key=args.key or "unused",
                           default_headers={"Authorization": f"Bearer {args.key}"} if args.key else None)
    out = client.completions.create(model=args.model, prompt="PagedAttention is", max_tokens=16)
    print(out.choices[0].text, out.usage)


if __name__ == "__main__":
    main()
