"""`make demo`: archive a model, start TorchServe (token authorization on), stream one answer
with curl, stop TorchServe.

    python examples/torchserve/demo.py --model models/demo-llama
"""

from __future__ import annotations

import argparse
import http.client
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pagedbackend.adapters.torchserve.launcher import TorchServe, build_archive


def stream_with_python(server: TorchServe, body: dict, headers: dict) -> None:
    conn = http.client.HTTPConnection(server.host, server.inference_port, timeout=300)
    conn.request("POST", "/predictions/demo", body=json.dumps(body), headers=headers)
    resp = conn.getresponse()
    while line := resp.readline():
        sys.stdout.write(line.decode())
        sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo-llama")
    p.add_argument("--prompt", default="Once upon a time, in a small village by the sea,")
    p.add_argument("--max-tokens", type=int, default=48)
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="pagedbackend-demo-") as tmp:
        print(f"archiving {args.model} ...", flush=True)
        build_archive(args.model, "demo", Path(tmp) / "model_store")
        print("starting TorchServe (127.0.0.1, free ports, token authorization on) ...", flush=True)
        with TorchServe(Path(tmp) / "model_store", {"demo": "demo.mar"}, Path(tmp) / "ts") as server:
            key = server.keys()["inference"]
            print(f"ready: {server.inference_url}/predictions/demo  (keys in {server.key_file})\n", flush=True)
            body = {"prompt": args.prompt, "stream": True, "max_tokens": args.max_tokens, "temperature": 0.8,
                    "top_p": 0.95, "seed": 0}
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            cmd = ["curl", "-sN", "-X", "POST", f"{server.inference_url}/predictions/demo",
                   "-H", f"Authorization: Bearer {key}", "-H", "Content-Type: application/json",
                   "-d", json.dumps(body)]
            print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
            if shutil.which("curl"):
                subprocess.run(cmd, check=True)
            else:
                stream_with_python(server, body, headers)
            print("\nstopping TorchServe ...", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
