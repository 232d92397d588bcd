"""A running stream must not stall while hostile requests arrive: for each adapter, one greedy
stream runs (the arrival time of every token-carrying chunk recorded) while a 5+ MB prompt, a
request with n far over max_num_seqs and, for TorchServe, a valid non-streaming request are
sent. The stream's largest inter-token gap must stay under MAX_INTER_TOKEN_GAP_S, the bad
requests must get a 4xx naming the field, and the non-streaming request must be answered.

The servers are `pagedbackend serve ...` subprocesses (benchmarks/soak.py starts them), so the
measuring client never shares a GIL with the server; each has its own short temporary
directory (PyTriton's socket paths under it must stay below 108 characters), binds 127.0.0.1
on free ports, and is stopped (then killed, process by process) whatever happens.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import soak  # noqa: E402

pytestmark = pytest.mark.slow

MAX_INTER_TOKEN_GAP_S = 0.5     # the bound: no gap between two chunks of the running stream may reach it
STREAM_TOKENS = 400             # long enough to still be running when the hostile requests are answered
HUGE_PROMPT_CHARS = 5_500_000   # "5+ MB" (TorchServe refuses bodies over 6.5 MB in its frontend)
NON_STREAMING_TOKENS = 32
ENGINE = dict(num_kv_blocks=2048, preemption_mode="recompute")


@pytest.fixture
def short_tmp():
    path = Path(tempfile.mkdtemp(prefix="stall-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _requests(adapter: str, server) -> dict:
    huge = ("lorem ipsum " * (HUGE_PROMPT_CHARS // 12 + 1))[:HUGE_PROMPT_CHARS]
    if adapter == "torchserve":
        path = soak.TorchServeTarget.NATIVE
        return dict(
            port=server.port, headers=server.headers, sse=False, path=path,
            stream={"prompt": "tell me a long story", "max_tokens": STREAM_TOKENS, "temperature": 0,
                    "ignore_eos": True, "stream": True},
            bad={"prompt-5MB": (path, {"prompt": huge, "max_tokens": 4}, "prompt"),
                 "n-200000": (path, {"prompt": "hello", "max_tokens": 4, "n": 200000}, "n")},
            good={"non-streaming": (path, {"prompt": "a request that does not stream",
                                           "max_tokens": NON_STREAMING_TOKENS, "temperature": 0, "ignore_eos": True})})
    path = soak.PyTritonTarget.STREAM
    base = {"stream": True, "exclude_input_in_output": True}
    return dict(
        port=server.http_port, headers={}, sse=True, path=path,
        stream={"text_input": "tell me a long story", **base,
                "sampling_parameters": json.dumps({"max_tokens": STREAM_TOKENS, "temperature": 0, "ignore_eos": True})},
        bad={"prompt-5MB": (path, {"text_input": huge, **base}, "text_input"),
             "n-200000": (path, {"text_input": "hello", **base, "sampling_parameters": json.dumps({"n": 200000})}, "n")},
        good={})


def _tokens_in(line: str, sse: bool) -> int:
    try:
        if sse:
            if not line.startswith("data:"):
                return 0
            event = json.loads(line[5:])
            return int(sum(soak._as_list(event.get("num_output_tokens", 0))))
        return len(json.loads(line).get("token_ids", ())) if line.strip() else 0
    except ValueError:
        return 0


@pytest.mark.timeout(420)
@pytest.mark.parametrize("adapter", ["torchserve", "pytriton"])
def test_running_stream_does_not_stall_while_hostile_requests_arrive(adapter, model_dir, short_tmp):
    if adapter == "pytriton":
        pytest.importorskip("pytriton")
    cls = soak.TorchServeProcess if adapter == "torchserve" else soak.PyTritonProcess
    server = cls(short_tmp / "server", model_dir("llama"), ENGINE)
    try:
        server.start()
        spec = _requests(adapter, server)
        # Every body is encoded before the stream starts: the client does nothing slow meanwhile.
        payloads = {name: json.dumps(body).encode() for name, (_, body, *_) in {**spec["bad"], **spec["good"]}.items()}
        arrivals: list[float] = []

        def on_line(line: str, now: float) -> None:
            if _tokens_in(line, spec["sse"]):
                arrivals.append(now)

        result: dict = {}
        streamer = threading.Thread(target=lambda: result.setdefault("r", soak.exchange(
            spec["port"], spec["path"], json.dumps(spec["stream"]).encode(), spec["headers"], stream=True,
            sse=spec["sse"], on_line=on_line, timeout=180)), daemon=True)
        streamer.start()
        deadline = time.monotonic() + 60
        while len(arrivals) < 10 and time.monotonic() < deadline and streamer.is_alive():
            time.sleep(0.01)
        assert len(arrivals) >= 10, f"the stream did not start: {result.get('r')}"

        answers: dict = {}
        answered_at: dict[str, float] = {}
        sent_at = time.monotonic()

        def send(name: str, path: str) -> None:
            answers[name] = soak.exchange(spec["port"], path, payloads[name], spec["headers"], timeout=120)
            answered_at[name] = time.monotonic()

        senders = [threading.Thread(target=send, args=(name, path), daemon=True)
                   for name, (path, *_) in {**spec["bad"], **spec["good"]}.items()]
        for t in senders:
            t.start()
        for t in senders:
            t.join(150)
        streamer.join(200)
        r = result.get("r")

        problems = []
        if r is None or r.status != 200 or r.error is not None or not r.eof:
            problems.append(f"the running stream failed: status={getattr(r, 'status', None)} "
                            f"error={getattr(r, 'error', 'still running')} lines={len(getattr(r, 'lines', []))}")
        missing = sorted(set(payloads) - set(answered_at))
        if missing:
            problems.append(f"no answer within 120 s to: {missing}")
        gaps = [(b - a, a - sent_at) for a, b in zip(arrivals, arrivals[1:])]
        worst = max(gaps, default=(0.0, 0.0))
        print(f"{adapter}: {len(arrivals)} chunks, largest inter-token gap {worst[0]:.3f}s at {worst[1]:+.2f}s; "
              f"answers at { {k: round(v - sent_at, 2) for k, v in answered_at.items()} }")
        if worst[0] >= MAX_INTER_TOKEN_GAP_S:
            over = [f"{g:.2f}s at {t:+.2f}s" for g, t in gaps if g >= MAX_INTER_TOKEN_GAP_S]
            problems.append(f"the running stream stalled: largest inter-token gap {worst[0]:.3f}s "
                            f"(bound {MAX_INTER_TOKEN_GAP_S}s) at {worst[1]:+.2f}s after the hostile requests "
                            f"were sent; every gap over the bound: {over}; answers at "
                            f"{ {k: round(v - sent_at, 2) for k, v in answered_at.items()} }")
        elif not missing and arrivals and arrivals[-1] <= max(answered_at.values()):
            problems.append("inconclusive: the stream ended before the last hostile request was answered "
                            f"(last token {arrivals[-1] - sent_at:+.2f}s, answers at "
                            f"{ {k: round(v - sent_at, 2) for k, v in answered_at.items()} })")
        for name, (_, _, param) in spec["bad"].items():
            a = answers.get(name)
            if a is None:
                continue
            _, message, got_param = soak.error_fields(a.text())
            if a.status is None or not 400 <= a.status < 500:
                problems.append(f"{name}: want a 4xx, got {a.status} ({a.error}) {a.excerpt(200)!r}")
            elif got_param != param and param not in message:
                problems.append(f"{name}: the error does not name {param!r}: {a.excerpt(200)!r}")
        for name in spec["good"]:
            a = answers.get(name)
            if a is None:
                continue
            try:
                doc = json.loads(a.body)
            except ValueError:
                doc = None
            if a.status != 200 or not isinstance(doc, dict) or len(doc.get("token_ids", ())) != NON_STREAMING_TOKENS:
                problems.append(f"{name}: want 200 with {NON_STREAMING_TOKENS} tokens, got {a.status} "
                                f"{a.excerpt(200)!r}")
        assert not problems, f"{adapter}:\n" + "\n".join(problems)
    finally:
        _, left = server.terminate(soak.SHUTDOWN_LIMIT_S)
    assert not left, f"processes left after SIGTERM (killed): {left}"
