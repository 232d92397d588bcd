"""Framework bindings: TorchServe and PyTriton (imported as pagedbackend.adapters)."""
