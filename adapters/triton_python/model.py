"""A Triton Python-backend model: a pagedbackend engine inside a plain Triton Inference Server,
with Triton's vLLM backend's interface, so a vLLM-backend model repository runs on it with
`backend: "python"` in its config.pbtxt and this file as `<name>/<version>/model.py`.

The engine arguments are the version directory's `model.json` (vLLM's names, read as
`pagedbackend serve pytriton --model-repository` reads them). Inputs, outputs and their
meaning are the PyTriton binding's (`pagedbackend.adapters.pytriton.binding`), declared to
Triton by `auto_complete_config`; the model is decoupled (streaming). Each request runs as a
coroutine on one asyncio loop feeding the one engine; a cancelled request is aborted. A bad
request answers `text_output = ["N/A"]` with the error, as the vLLM backend does.

The Python backend's stub must import pagedbackend and its dependencies: start Triton with
PYTHONPATH holding the environment's site-packages (or use Triton's EXECUTION_ENV_PATH).
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

from pagedbackend import AsyncLLMEngine
from pagedbackend.adapters.pytriton.binding import client_message, make_response, model_inputs, model_outputs, parse_request
from pagedbackend.adapters.pytriton.repository import model_json_args

_TRITON_TYPES = {np.bytes_: "TYPE_STRING", np.bool_: "TYPE_BOOL", np.int32: "TYPE_INT32", np.int64: "TYPE_INT64",
                 np.float32: "TYPE_FP32", np.uint32: "TYPE_UINT32"}


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        """The binding's inputs and outputs, decoupled, no Triton batching (the engine batches)."""
        for t in model_inputs():
            auto_complete_model_config.add_input({"name": t.name, "data_type": _TRITON_TYPES[np.dtype(t.dtype).type],
                                                  "dims": list(t.shape), "optional": t.optional})
        for t in model_outputs():
            auto_complete_model_config.add_output({"name": t.name, "data_type": _TRITON_TYPES[np.dtype(t.dtype).type],
                                                   "dims": list(t.shape)})
        auto_complete_model_config.set_model_transaction_policy({"decoupled": True})
        auto_complete_model_config.set_max_batch_size(0)
        return auto_complete_model_config

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("this model streams: set model_transaction_policy { decoupled: true }")
        version = Path(args["model_repository"]) / args["model_version"]
        self.input_names = [t.name for t in model_inputs()]
        self.engine = AsyncLLMEngine.from_engine_args(model_json_args(version), progress=False)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pagedbackend-triton-loop", daemon=True)
        self.thread.start()

    def execute(self, requests: list) -> None:
        for request in requests:
            asyncio.run_coroutine_threadsafe(self._generate(request), self.loop)
        return None

    async def _generate(self, request) -> None:
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            data = {}
            for name in self.input_names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    data[name] = tensor.as_numpy()
            req = parse_request(data, json.loads(request.parameters() or "{}"))
            first = True
            async for out in self.engine.generate(req.prompt, req.params, uuid.uuid4().hex):
                if sender.is_cancelled():
                    break  # leaving the generator aborts the request and frees its blocks
                tensors = [pb_utils.Tensor(name, value) for name, value in make_response(out, req, first).items()]
                sender.send(pb_utils.InferenceResponse(output_tensors=tensors))
                first = False
            sender.send(flags=final)
        except Exception as e:  # noqa: BLE001 - the client gets the error; the model keeps serving
            text = pb_utils.Tensor("text_output", np.array([b"N/A"], dtype=object))
            sender.send(pb_utils.InferenceResponse(output_tensors=[text], error=pb_utils.TritonError(client_message(e))),
                        flags=final)

    def finalize(self) -> None:
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
