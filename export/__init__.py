"""Export: Hugging Face checkpoint → validated artifact directory (needs the ``export`` extra)."""

from __future__ import annotations

from typing import Any

__all__ = ["export_model", "require_export_extra"]

#: What the export extra provides; each is imported before an export starts so a missing one is reported
#: up front, as one install line, rather than minutes later as a ModuleNotFoundError traceback.
EXPORT_MODULES = ("torch", "transformers", "optimum.exporters.onnx", "onnx")
INSTALL_HINT = 'pip install "memrerank[export]"'


def require_export_extra() -> None:
    """Import the export extra's packages.

    Raises:
        MissingExtraError: one of them is missing or fails to import (the message names it and says how
            to install the extra).
    """
    import importlib

    from memrerank.errors import MissingExtraError

    for name in EXPORT_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise MissingExtraError(
                f"exporting needs the export extra (torch, transformers, optimum-onnx, onnx); {name} could "
                f"not be imported ({exc}). Install it with: {INSTALL_HINT}") from exc


def export_model(*args: Any, **kwargs: Any) -> Any:
    """See :func:`memrerank.export.pipeline.export_model` (imported lazily: it needs torch).

    Raises:
        MissingExtraError: the export extra is not installed (before anything is read or written).
    """
    require_export_extra()
    from memrerank.export.pipeline import export_model as _export

    return _export(*args, **kwargs)
