"""Installs `_proxy_model.py` as the Triton model of pagedbackend's PyTriton bindings.

PyTriton writes its proxy files into Triton's model repository in two places: `generate_model`
(a local model store) and `get_proxy_model_files` (models loaded through Triton's repository
API). Both are wrapped once; for model names registered with `use_cancel_aware_proxy` the
original `model.py` is kept as `pytriton_model.py` and ours takes its place. Other models bound
to the same Triton are untouched.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from pytriton.models.model import Model

PROXY_SOURCE = Path(__file__).with_name("_proxy_model.py")
_models: set[str] = set()
_lock = threading.Lock()
_installed = False


def use_cancel_aware_proxy(model_name: str) -> None:
    global _installed
    with _lock:
        _models.add(model_name)
        if _installed:
            return
        generate_model, get_files = Model.generate_model, Model.get_proxy_model_files

        def generate_model_with_proxy(self, model_repository):
            generate_model(self, model_repository)
            if self.model_name in _models:
                version_dir = Path(model_repository) / self.model_name / str(self.model_version)
                shutil.copy(version_dir / "model.py", version_dir / "pytriton_model.py")
                shutil.copy(PROXY_SOURCE, version_dir / "model.py")

        def get_proxy_model_files_with_proxy(self):
            files = get_files(self)
            if self.model_name in _models:
                prefix = f"file:{self.model_version}/"
                files[prefix + "pytriton_model.py"] = files[prefix + "model.py"]
                files[prefix + "model.py"] = PROXY_SOURCE.read_bytes()
            return files

        Model.generate_model = generate_model_with_proxy
        Model.get_proxy_model_files = get_proxy_model_files_with_proxy
        _installed = True
