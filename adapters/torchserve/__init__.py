"""TorchServe custom handler (see its issue)."""
