"""The baseline for benchmarks/serving.py: what a TorchServe user serves an LLM with today — a
plain transformers handler and TorchServe's own dynamic batching (`batchSize`, `maxBatchDelay`
in model-config.yaml). Each batch TorchServe hands over is left-padded and run through
`model.generate` to the longest `max_tokens` in it; new requests wait for the next batch.

It speaks the same request and response format as pagedbackend's native route, so one load
generator measures both: JSON `{"prompt", "max_tokens", "stream", "ignore_eos", "temperature"}`
(greedy only) in; newline-delimited JSON chunks `{"text", "token_ids"}` out when streaming, the
chunk that ends a request carrying `finish_reason` (sent as soon as that request's own tokens
are done, although the batch runs on), or one JSON document otherwise.

Archive it with torch-model-archiver, `--handler` this file, `--extra-files` the model directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer
from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler


class PlainTransformersHandler(BaseHandler):
    # TorchServe loads the one class defined at module level, so the streamer lives in here.
    class _BatchStreamer(BaseStreamer):
        """Called by `generate` once with the prompts, then once per step with one token per row:
        records each request's tokens up to its own limit and streams them to the streaming ones."""

        def __init__(self, handler: "PlainTransformersHandler", requests: list[tuple[int, dict]], eos: int | None,
                     context) -> None:
            self.handler, self.requests, self.eos, self.context = handler, requests, eos, context
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            chunks, ids = {}, {}
            for row, ((i, r), token) in enumerate(zip(self.requests, value.reshape(-1).tolist())):
                if r["finish_reason"] is not None:
                    continue
                r["tokens"].append(token)
                if not r["ignore_eos"] and token == self.eos:
                    r["finish_reason"] = "stop"
                elif len(r["tokens"]) >= r["max_tokens"]:
                    r["finish_reason"] = "length"
                if r["stream"]:
                    chunk = {"text": self.handler.tokenizer.decode([token]), "token_ids": [token]}
                    if r["finish_reason"] is not None:
                        chunk["finish_reason"] = r["finish_reason"]
                        r["finish_sent"] = True
                    chunks[i] = json.dumps(chunk) + "\n"
                    ids[i] = self.context.request_ids[i]
            if ids:
                send_intermediate_predict_response([chunks.get(i) for i in range(max(ids) + 1)], ids,
                                                   "Intermediate Prediction success", 200, self.context)

        def end(self) -> None:
            pass

    def initialize(self, context) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        found = [p.parent for p in model_dir.rglob("config.json")]
        if not found:
            raise RuntimeError(f"no config.json under {model_dir}")
        cfg = (context.model_yaml_config or {}).get("handler", {}) or {}
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg["threads"]))
        self.tokenizer = AutoTokenizer.from_pretrained(found[0])
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = AutoModelForCausalLM.from_pretrained(found[0], dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()
        self.initialized = True

    @staticmethod
    def _parse(row: dict) -> dict:
        body = row.get("data") or row.get("body") or {}
        if isinstance(body, (bytes, bytearray)):
            body = json.loads(body.decode("utf-8"))
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt: a non-empty string is required")
        max_tokens = int(body.get("max_tokens", 16))
        if max_tokens < 1:
            raise ValueError("max_tokens: must be at least 1")
        if float(body.get("temperature", 0.0)) != 0.0:
            raise ValueError("temperature: this handler is greedy only")
        return {"prompt": prompt, "max_tokens": max_tokens, "stream": bool(body.get("stream", False)),
                "ignore_eos": bool(body.get("ignore_eos", False)), "tokens": [], "finish_reason": None,
                "finish_sent": False}

    def handle(self, data: list[dict], context) -> list[str]:
        requests, answers = [], [None] * len(data)
        for i, row in enumerate(data):
            try:
                requests.append((i, self._parse(row)))
            except (ValueError, TypeError, json.JSONDecodeError) as e:
                context.set_response_status(400, str(e), idx=i)
                answers[i] = json.dumps({"error": str(e)})
        if requests:
            self._generate(requests, context)
        for i, r in requests:
            if r["stream"]:
                # Normally every token and the finish_reason already went out as intermediate
                # chunks; a row that generate() stopped early (another row's EOS) ends here.
                answers[i] = "" if r["finish_sent"] else json.dumps(
                    {"text": "", "token_ids": [], "finish_reason": r["finish_reason"]}) + "\n"
            else:
                answers[i] = json.dumps({"text": self.tokenizer.decode(r["tokens"], skip_special_tokens=True),
                                         "token_ids": r["tokens"], "finish_reason": r["finish_reason"],
                                         "usage": {"prompt_tokens": r["prompt_tokens"],
                                                   "completion_tokens": len(r["tokens"])}})
        return answers

    def _generate(self, requests: list[tuple[int, dict]], context) -> None:
        batch = self.tokenizer([r["prompt"] for _, r in requests], return_tensors="pt", padding=True)
        for (_, r), mask in zip(requests, batch["attention_mask"]):
            r["prompt_tokens"] = int(mask.sum())
        eos = None if all(r["ignore_eos"] for _, r in requests) else self.tokenizer.eos_token_id
        streamer = self._BatchStreamer(self, requests, eos, context)
        with torch.inference_mode():
            self.model.generate(**batch, max_new_tokens=max(r["max_tokens"] for _, r in requests), do_sample=False,
                                eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id, streamer=streamer)
        for _, r in requests:
            if r["finish_reason"] is None:
                r["finish_reason"] = "length"

