"""The one public entry point: :class:`Reranker`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from memrerank.calibration import Calibrator
from memrerank.errors import ArtifactError
from memrerank.manifest import (
    PRECISIONS,
    TOKENIZER_NAME,
    model_files,
    pick_auto_precision,
    read_manifest,
    verify_files,
)
from memrerank.runtime.backends.onnxruntime import OrtBackend, resolve_providers
from memrerank.runtime.batching import iter_batches
from memrerank.runtime.encoding import make_encoder

__all__ = ["Reranker", "RankHit"]


@dataclass(frozen=True)
class RankHit:
    """One ranked document.

    Attributes:
        index: position of the document in the list the caller passed.
        score: calibrated probability in [0, 1].
        logit: the raw model logit.
        text: the document as passed.
        truncated: whether the document was shortened to fit the model's max length.
    """

    index: int
    score: float
    logit: float
    text: str
    truncated: bool


def _check_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, got {type(value).__name__}")
    return value


class Reranker:
    """Scores (query, document) pairs with an exported artifact; imports no torch or transformers.

    Thread safety: one instance may be shared by threads; onnxruntime sessions are thread-safe for ``run`` and
    the instance keeps no per-call state apart from a bounded instruction-id cache.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], precision: str, backend: OrtBackend,
                 tokenizer: Tokenizer, batch_size: int) -> None:
        self.root = root
        self.manifest = manifest
        self.precision = precision
        self.backend = backend
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.family: str = manifest["family"]
        self.padding_side: str = manifest["tokens"]["padding_side"]
        self.pad_id: int = int(manifest["tokens"]["pad_id"])
        self.encoder = make_encoder(manifest, tokenizer)
        self.calibrator = Calibrator.from_block(manifest.get("calibration", {}).get(precision))

    @classmethod
    def load(cls, path: str | Path, precision: str = "fp32", providers: Sequence[str] | str | None = None,
             batch_size: int = 32, threads: int | None = None) -> Reranker:
        """Open an artifact directory written by ``memrerank export``.

        Args:
            path: the artifact directory.
            precision: one of the exported precisions (see ``memrerank info``), or ``"auto"``: the fastest
                exported precision for the first provider that met its fidelity budget at export.
            providers: onnxruntime providers or aliases (``"cpu"``, ``"cuda"``, ``"tensorrt"``); ``None`` = CPU.
            batch_size: rows per model call.
            threads: intra-op threads for onnxruntime (``None`` = onnxruntime's default).

        Raises:
            ArtifactError: missing/corrupted files or an unknown schema, with what to do.
            ProviderError: an unavailable provider was asked for.
        """
        if precision not in PRECISIONS and precision != "auto":
            raise ValueError(f"precision: unknown {precision!r}; choose one of {', '.join(PRECISIONS)} or 'auto'")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        root = Path(path)
        manifest = read_manifest(root)
        if precision == "auto":
            precision = pick_auto_precision(manifest, resolve_providers(providers)[0])
        files = model_files(manifest, precision)
        verify_files(root, files)
        verify_files(root, manifest["tokenizer"]["files"])
        tokenizer = Tokenizer.from_file(str(root / TOKENIZER_NAME))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        _check_tokenizer(tokenizer, manifest)
        graph = root / manifest["precisions"][precision]["graph"]
        backend = OrtBackend(graph, providers=providers, threads=threads)
        meant_for = manifest["precisions"][precision].get("providers", [])
        if meant_for and backend.providers[0] not in meant_for:
            warnings.warn(
                f"precision {precision!r} is meant for {', '.join(meant_for)}; on {backend.providers[0]} it runs "
                "correctly but is not expected to be faster than fp32", stacklevel=2)
        return cls(root, manifest, precision, backend, tokenizer, batch_size)

    # ------------------------------------------------------------------ scoring
    def _score_groups(self, groups: Iterable[tuple[str, list[int], list[str]]], n: int,
                      instruction: str | None) -> tuple[np.ndarray, np.ndarray]:
        ids: list[np.ndarray] = []
        types: list[np.ndarray] = []  # filled only by encoders whose model has segment embeddings
        where: list[int] = []
        truncated = np.zeros(n, dtype=bool)
        for query, idx, docs in groups:
            enc = self.encoder.encode(query, docs, instruction)
            ids.extend(enc.ids)
            if enc.type_ids is not None:
                types.extend(enc.type_ids)
            where.extend(idx)
            truncated[idx] = enc.truncated
        logits = np.empty(n, dtype=np.float32)
        where_arr = np.asarray(where, dtype=np.int64)
        for batch in iter_batches(ids, types or None, pad_id=self.pad_id, padding_side=self.padding_side,
                                  batch_size=self.batch_size):
            out = self.backend(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            logits[where_arr[batch.rows]] = out
        return logits, truncated

    def predict(self, pairs: Sequence[tuple[str, str]], raw: bool = False, instruction: str | None = None,
                return_truncated: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Score pairs.

        Args:
            pairs: ``(query, document)`` tuples; pairs sharing a query are tokenized together.
            raw: return the model logit instead of the calibrated probability.
            instruction: decoder family only; ``None`` uses the artifact's default instruction.
            return_truncated: also return a bool array telling which documents were shortened.

        Returns:
            float32 array, one score per pair, in the order given.
        """
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
            raise TypeError("pairs must be a sequence of (query, document) tuples")
        by_query: dict[str, tuple[list[int], list[str]]] = {}
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"pairs[{i}] must be a (query, document) tuple, got {pair!r:.80}")
            q = _check_text(pair[0], f"pairs[{i}][0] (query)")
            d = _check_text(pair[1], f"pairs[{i}][1] (document)")
            slot = by_query.setdefault(q, ([], []))
            slot[0].append(i)
            slot[1].append(d)
        if instruction is not None:
            _check_text(instruction, "instruction")
        n = len(pairs)
        if n == 0:
            empty = np.zeros(0, dtype=np.float32)
            return (empty, np.zeros(0, dtype=bool)) if return_truncated else empty
        logits, truncated = self._score_groups(((q, idx, docs) for q, (idx, docs) in by_query.items()), n,
                                               instruction)
        scores = logits if raw else self.calibrator(logits)
        return (scores, truncated) if return_truncated else scores

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None, threshold: float | None = None,
             instruction: str | None = None) -> list[RankHit]:
        """Rank documents for one query, best first.

        Args:
            query: the question.
            documents: candidate memories (not modified).
            top_k: keep at most this many hits (``None`` = all).
            threshold: keep hits whose calibrated probability is ``>= threshold`` (in [0, 1]).
            instruction: decoder family only; ``None`` uses the artifact's default instruction.
        """
        _check_text(query, "query")
        if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
            raise TypeError("documents must be a sequence of str")
        if len(documents) == 0:
            raise ValueError("documents: empty list; pass at least one document")
        docs = [_check_text(d, f"documents[{i}]") for i, d in enumerate(documents)]
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
                    math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
                raise ValueError(f"threshold must be a probability in [0, 1] or None, got {threshold!r}")
        if instruction is not None:
            _check_text(instruction, "instruction")
        logits, truncated = self._score_groups([(query, list(range(len(docs))), docs)], len(docs), instruction)
        probs = self.calibrator(logits)
        order = np.argsort(-logits, kind="stable")
        hits = [RankHit(int(i), float(probs[i]), float(logits[i]), docs[i], bool(truncated[i])) for i in order]
        if threshold is not None:
            hits = [h for h in hits if h.score >= threshold]
        return hits[:top_k] if top_k is not None else hits

    def __repr__(self) -> str:
        return (f"Reranker({str(self.root)!r}, family={self.family!r}, precision={self.precision!r}, "
                f"providers={self.backend.providers})")


def _check_tokenizer(tokenizer: Tokenizer, manifest: dict[str, Any]) -> None:
    """Refuse a tokenizer whose ids disagree with the manifest (a swapped or edited tokenizer.json)."""
    tpl = manifest["template"]
    checks = tpl.get("id_checks", {})
    for text, ids in checks.items():
        got = tokenizer.encode(text, add_special_tokens=False).ids
        if got != ids:
            raise ArtifactError(
                f"tokenizer.json tokenizes {text!r} as {got}, the manifest records {ids}: the tokenizer does not "
                "belong to this artifact; re-export with `memrerank export MODEL -o OUT --force`"
            )
