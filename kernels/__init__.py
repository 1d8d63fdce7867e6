"""Native hot paths with numpy fallbacks.

No kernel is built yet (the fused pair packer lands with the fast-path work); :data:`NATIVE` tells whether the
compiled extension is importable, and the runtime uses the numpy path otherwise.
"""

from __future__ import annotations

import os

__all__ = ["NATIVE", "backend_name"]

try:  # pragma: no cover - depends on the build
    if os.environ.get("MEMRERANK_NO_KERNELS", "0") not in ("", "0"):
        raise ImportError("disabled by MEMRERANK_NO_KERNELS")
    from memrerank.kernels import _kernels  # type: ignore[attr-defined]

    NATIVE = True
except ImportError:
    _kernels = None
    NATIVE = False


def backend_name() -> str:
    """``"native"`` when the compiled kernels are in use, else ``"numpy"``."""
    return "native" if NATIVE else "numpy"
