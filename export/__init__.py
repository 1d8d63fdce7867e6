"""Export: Hugging Face checkpoint → validated artifact directory (needs the ``export`` extra)."""

from __future__ import annotations

from typing import Any

__all__ = ["export_model"]


def export_model(*args: Any, **kwargs: Any) -> Any:
    """See :func:`memrerank.export.pipeline.export_model` (imported lazily: it needs torch)."""
    try:
        from memrerank.export.pipeline import export_model as _export
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"memrerank export needs the export extra ({exc}); install it with: pip install 'memrerank[export]'"
        ) from exc
    return _export(*args, **kwargs)
