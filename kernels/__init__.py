"""GPU kernels (Triton) and the one KV-cache layout every part of pagedbackend uses.

Imported as `pagedbackend.kernels`. The layout lives here because kernels are the code that
depends on it most; everything else goes through `kv_cache_shape` / `slot_to_rows`.
"""

from pagedbackend.kernels.layout import kv_cache_shape, slot_to_rows

__all__ = ["kv_cache_shape", "slot_to_rows"]
