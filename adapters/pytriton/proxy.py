"""Installs `_proxy_model.py` as the Triton model of pagedbackend's PyTriton bindings.

PyTriton writes its proxy files into Triton's model repository in two places: `generate_model`
(a local model store) and `get_proxy_model_files` (models loaded through Triton's repository
API). Both are wrapped once; for a model whose infer function belongs to an object with a
`control_secret` (the binding's `LLMModel`) and whose name was registered with
`use_cancel_aware_proxy`, the original `model.py` is kept as `pytriton_model.py`, ours takes its
place, and the secret is written beside it as `pagedbackend_control_key`. The proxy marks the
requests it forwards with that secret; the secret stays on this machine (the model repository
API of Triton is behind PyTriton's access token) and never reaches a client. Other models
bound to the same Triton are untouched.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

from pytriton.models.model import Model

PROXY_SOURCE = Path(__file__).with_name("_proxy_model.py")
CONTROL_KEY_FILE = "pagedbackend_control_key"  # must match _proxy_model.py
_models: set[str] = set()
_lock = threading.Lock()
_installed = False


def control_secret_of(model: Any) -> str | None:
    """The secret of the pagedbackend model behind a PyTriton `Model`, if it is one of ours."""
    if model.model_name not in _models:
        return None
    for fn in model.infer_functions:
        secret = getattr(getattr(fn, "__self__", None), "control_secret", None)
        if isinstance(secret, str) and secret:
            return secret
    return None


def use_cancel_aware_proxy(model_name: str) -> None:
    global _installed
    with _lock:
        _models.add(model_name)
        if _installed:
            return
        generate_model, get_files = Model.generate_model, Model.get_proxy_model_files

        def generate_model_with_proxy(self, model_repository):
            generate_model(self, model_repository)
            secret = control_secret_of(self)
            if secret is not None:
                version_dir = Path(model_repository) / self.model_name / str(self.model_version)
                shutil.copy(version_dir / "model.py", version_dir / "pytriton_model.py")
                shutil.copy(PROXY_SOURCE, version_dir / "model.py")
                key_file = version_dir / CONTROL_KEY_FILE
                key_file.write_text(secret)
                key_file.chmod(0o600)

        def get_proxy_model_files_with_proxy(self):
            files = get_files(self)
            secret = control_secret_of(self)
            if secret is not None:
                prefix = f"file:{self.model_version}/"
                files[prefix + "pytriton_model.py"] = files[prefix + "model.py"]
                files[prefix + "model.py"] = PROXY_SOURCE.read_bytes()
                files[prefix + CONTROL_KEY_FILE] = secret.encode()
            return files

        Model.generate_model = generate_model_with_proxy
        Model.get_proxy_model_files = get_proxy_model_files_with_proxy
        _installed = True
