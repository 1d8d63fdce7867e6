"""``memrerank calibrate``: fit per-precision score calibration on pairs and record it in the manifest.

The job lives here, outside :mod:`memrerank.calibration` (which the runtime imports and which keeps only the
maths: :class:`~memrerank.calibration.Calibrator`, the fits and the metrics). Two modes:

* **labels** (every line has a 0/1 ``label``): each precision is fitted to the labels;
* **teacher** (no labels): each lower precision is fitted to fp32's calibrated probabilities, so a threshold
  means the same at every precision.

Queries are split deterministically into a train part and a held-out part on which before/after metrics are
reported. The manifest is written once, atomically, through :func:`memrerank.manifest.write_manifest`.

A fit that would map every score to one value never lands in an artifact. In labels mode the training pairs
need both labels (:data:`MIN_PER_LABEL` of each), the fit is made to Platt's (1999) targets rather than bare
0/1 labels (which keeps the slope finite when the scores separate the labels; separable data is flagged in the
report and the manifest), and scores that do not predict the labels better than their base rate are refused
(:data:`MAX_P_VALUE`). In both modes a fit whose calibrated log-odds hardly move over the training scores
(:data:`MIN_LOG_ODDS_SPREAD`), or whose parameters fall outside what a manifest may hold
(:func:`memrerank.manifest.calibration_problem`), is refused with the reason; nothing is written then. Each
calibration record holds the held-out pairs' count and ECE and the training pairs' count per label.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memrerank.calibration import Calibrator, sigmoid
from memrerank.calibration.fit import fit_platt, fit_temperature, informative_p_value, log_loss, platt_targets
from memrerank.calibration.metrics import brier, decision_agreement, ece, reliability_bins
from memrerank.errors import MemrerankError
from memrerank.manifest import CalibrationEntry, calibration_problem, read_manifest, write_manifest
from memrerank.progress import bar
from memrerank.runtime.options import LoadOptions

#: Quantiles of fp32's calibrated held-out scores at which decision agreement is also reported: a weak model's
#: calibrated scores may never reach 0.3, where agreement at fixed thresholds is trivially 1.
QUANTILES = (0.9, 0.95, 0.99)

__all__ = ["load_calibration_pairs", "calibrate_artifact", "fit_note", "CALIBRATION_METHODS",
           "CalibrationRefusedError", "MIN_PER_LABEL", "MAX_P_VALUE", "MIN_LOG_ODDS_SPREAD"]

#: ``--method`` choices: ``auto`` fits both and keeps Platt only where its bias lowers the log-loss by 1 %.
CALIBRATION_METHODS = ("auto", "temperature", "platt")
#: Labels mode: fewest pairs of each label (0 and 1) among the training pairs. With one label only, the best fit
#: sends every score to that label (all-positive pairs gave T = 0.0115: every score 1.0); a handful of each is
#: the least from which a slope and a bias mean anything (Platt's targets then weigh one pseudo-pair per label).
MIN_PER_LABEL = 5
#: Labels mode: the scores must predict the training labels better than their base rate at this level
#: (:func:`memrerank.calibration.fit.informative_p_value`); otherwise the best fit is the base rate, the same
#: score for every pair (uninformative pairs gave T = 1.7e10: every score 0.5).
MAX_P_VALUE = 0.05
#: Both modes: the least spread of calibrated log-odds over the middle 90 % of the training scores
#: (``a · (q95 − q05)``). Below it every pair gets about the same score (at 0.05, a band of ±0.0063 around
#: 0.5); in teacher mode, where no test on labels applies, this is what catches a teacher or a precision whose
#: scores do not vary.
MIN_LOG_ODDS_SPREAD = 0.05


class CalibrationRefusedError(MemrerankError):
    """The pairs do not support a calibration (one label only, uninformative scores, a degenerate fit); the
    message says why and what data would; nothing was written."""


def load_calibration_pairs(path: str | Path, limit: int | None = None
                           ) -> tuple[list[str], list[str], np.ndarray | None]:
    """(queries, documents, labels or None) from a JSONL of {"query","document","label"?} or LoCoMo's json.

    Raises:
        ValueError: the file is missing, a line lacks its fields, labels are mixed with unlabelled lines, or a
            label is not 0/1.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data: {path} does not exist")
    if path.suffix == ".json":
        from memrerank.evaluation import load_locomo

        qs, ds, ys = [], [], []
        for q in load_locomo(path, candidates="sessions", window=0, limit=limit).queries:
            for i, d in enumerate(q.documents):
                qs.append(q.query)
                ds.append(d)
                ys.append(float(i in q.relevant))
        return qs, ds, np.asarray(ys)
    from memrerank.jsonl import iter_jsonl

    qs, ds, ys = [], [], []
    for where, row in iter_jsonl(path, "--data"):
        if not isinstance(row, dict) or not isinstance(row.get("query"), str) or not isinstance(
                row.get("document"), str):
            raise ValueError(f"--data: {where} needs string fields 'query' and 'document'")
        qs.append(row["query"])
        ds.append(row["document"])
        ys.append(row.get("label"))
    labelled = [y is not None for y in ys]
    if any(labelled) and not all(labelled):
        raise ValueError(f"--data {path}: either every line has a 'label' (labels mode) or none (teacher mode)")
    if all(labelled):
        y = np.asarray(ys, dtype=np.float64)
        if not np.isin(y, (0.0, 1.0)).all():
            raise ValueError(f"--data {path}: labels must be 0 or 1")
        return qs, ds, y
    return qs, ds, None


def _holdout_mask(queries: Sequence[str], fraction: float) -> np.ndarray:
    """Deterministic split by query (a query's pairs are all train or all held out)."""
    def bucket(q: str) -> float:
        return int(hashlib.sha256(q.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16) / 0xFFFFFFFF

    return np.array([bucket(q) < fraction for q in queries])


def _calibrator(entry: CalibrationEntry | None) -> Calibrator:
    return Calibrator.from_params(entry.method, entry.params) if entry is not None else Calibrator()


def _fit(method: str, logits: np.ndarray, targets: np.ndarray) -> CalibrationEntry:
    """Fit ``method``; ``auto`` keeps Platt only where its bias lowers the log-loss by 1 %, and never a fit
    outside what a manifest may hold when the other one is inside."""
    if method == "temperature":
        return CalibrationEntry("temperature", {"temperature": fit_temperature(logits, targets)})
    if method == "platt":
        a, b = fit_platt(logits, targets)
        return CalibrationEntry("platt", {"a": a, "b": b})
    t = _fit("temperature", logits, targets)
    p = _fit("platt", logits, targets)
    if calibration_problem(t.method, t.params) or calibration_problem(p.method, p.params):
        return t if calibration_problem(p.method, p.params) else p
    lt = log_loss(_calibrator(t)(logits), targets)
    lp = log_loss(_calibrator(p)(logits), targets)
    return p if lp < lt * 0.99 else t  # the bias only where it helps


def _check_both_labels(labels: np.ndarray, train: np.ndarray, data: str | Path) -> None:
    """Refuse labels mode without :data:`MIN_PER_LABEL` pairs of each label among the training pairs."""
    positives, negatives = int(labels[train].sum()), int((labels[train] == 0).sum())
    if min(positives, negatives) >= MIN_PER_LABEL:
        return
    everywhere = f" (all {labels.size} pairs: {int(labels.sum())} labelled 1, {int((labels == 0).sum())} labelled 0)"
    raise CalibrationRefusedError(
        f"--data {data}: calibration needs both labels, at least {MIN_PER_LABEL} pairs of each among the "
        f"training pairs (queries not held out); they hold {positives} labelled 1 and {negatives} labelled 0"
        f"{everywhere}. Add pairs the model should score low as well as pairs it should score high "
        "(or hold out fewer queries with --holdout); a fit on one label would give every pair that label's score")


def _check_fit(precision: str, fit: CalibrationEntry, logits: np.ndarray, labelled: bool) -> float:
    """Refuse a fit outside what a manifest may hold or one that maps every training score to about one value;
    returns the calibrated log-odds spread over the middle 90 % of the training scores."""
    problem = calibration_problem(fit.method, fit.params)
    hint = ("give pairs whose labels these scores predict, or try --method platt" if labelled else
            "fp32's calibrated scores (the teacher) or this precision's logits hardly vary on these pairs: give "
            "pairs the model scores differently")
    if problem:
        raise CalibrationRefusedError(f"{precision}: the {fit.method} fit is out of bounds: {problem}; nothing was "
                                      f"written: {hint}")
    calibrator = _calibrator(fit)
    lo, hi = np.quantile(logits, (0.05, 0.95))
    spread = float(calibrator.a * (hi - lo))
    if spread < MIN_LOG_ODDS_SPREAD:
        p_lo, p_hi = calibrator(np.array([lo, hi]))
        raise CalibrationRefusedError(
            f"{precision}: the {fit.method} fit ({_params_text(fit.params)}) maps the middle 90 % of the "
            f"{logits.size} training scores into {spread:.2g} log-odds (scores {p_lo:.4f} to {p_hi:.4f}), under "
            f"{MIN_LOG_ODDS_SPREAD}: "
            f"every pair would get about the same score, so nothing was written; {hint}")
    return spread


def _check_informative(precision: str, logits: np.ndarray, labels: np.ndarray) -> float:
    """Refuse scores that do not predict the labels better than their base rate; returns the test's p-value."""
    p_value = informative_p_value(logits, labels)
    if p_value >= MAX_P_VALUE:
        raise CalibrationRefusedError(
            f"{precision}: the scores carry no information about these labels: on {labels.size} training pairs "
            f"they predict them no better than the base rate {labels.mean():.3f} (likelihood-ratio test, "
            f"p = {p_value:.2g}, needs < {MAX_P_VALUE}), so a calibration would give every pair about that score "
            "and none was written. Check that the labels belong to these pairs and that the model ranks the "
            "relevant ones higher (scores that rank them backwards are no information to a calibration, which "
            "keeps the ranking), or give more pairs")
    return p_value


def _metrics(probs: np.ndarray, targets: np.ndarray, labelled: bool) -> dict[str, float]:
    out = {"log_loss": log_loss(probs, targets), "brier": brier(probs, targets)}
    if labelled:
        out["ece"] = ece(probs, targets)
    else:
        out["mean_abs_diff_to_teacher"] = float(np.mean(np.abs(probs - targets)))
    return out


def calibrate_artifact(artifact: str | Path, data: str | Path, method: str = "auto",
                       precisions: Sequence[str] | None = None, options: LoadOptions | None = None, *,
                       holdout: float = 0.2, limit: int | None = None, plot: str | Path | None = None,
                       log: Callable[[str], None] = print, progress: bool | None = False) -> dict[str, Any]:
    """Fit, report and store calibration for each precision of ``artifact``.

    Args:
        artifact: the artifact directory (its manifest gets a ``calibration`` entry per fitted precision).
        data: JSONL of {"query","document","label"?} (labels mode when every line has a label, teacher mode when
            none has) or a LoCoMo json (labels from its evidence).
        method: one of :data:`CALIBRATION_METHODS`.
        precisions: precisions to fit (default: every exported one).
        options: how every precision is loaded (:class:`~memrerank.runtime.options.LoadOptions`: calibrate on the
            device and settings the artifact will be served with); its ``precision`` is replaced by each one.
        holdout: fraction of queries held out for the before/after report.
        limit: LoCoMo only: most conversations to read.
        plot: write a reliability diagram (PNG) there (needs matplotlib).
        log: progress messages.
        progress: a progress bar over the precisions being scored (``None``: when stderr is a terminal).

    Returns:
        The report: mode, pair counts, and per precision the fitted method and parameters with before/after
        metrics on the held-out pairs (and agreement with fp32's decisions for lower precisions).

    Raises:
        ValueError: a bad argument or data file.
        TypeError: ``options`` is not a :class:`LoadOptions`.
        ArtifactError: the artifact is missing, corrupted, or lacks a precision asked for.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"--method: choose one of {', '.join(CALIBRATION_METHODS)}")
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"--holdout must be in (0, 1), got {holdout}")
    options = LoadOptions.merge(options)
    root = Path(artifact)
    manifest = read_manifest(root)
    names = list(precisions or manifest.precisions)
    queries, docs, labels = load_calibration_pairs(data, limit)
    labelled = labels is not None
    held = _holdout_mask(queries, holdout)
    if held.all() or not held.any():
        raise ValueError("--holdout leaves an empty train or held-out part; give more queries")
    if labelled:
        _check_both_labels(labels, ~held, data)
    pairs = list(zip(queries, docs))
    has_fp32 = "fp32" in manifest.precisions
    if not has_fp32 and not labelled:
        raise ValueError(f"{root}: no fp32 precision (a streamed export), so there is no teacher for unlabelled pairs: "
                         "give labelled pairs (a 'label' field), or export fp32 too")
    log(f"{len(pairs)} pairs ({'labels' if labelled else 'teacher'} mode), {int(held.sum())} held out")
    logits = _score(root, ["fp32", *names] if has_fp32 else names, options, pairs, progress)
    existing_fp32 = _calibrator(manifest.calibration.get("fp32"))
    report: dict[str, Any] = {"mode": "labels" if labelled else "teacher", "pairs": len(pairs),
                              "held_out": int(held.sum()), "precisions": {}}
    if labelled:
        base_rate = float(labels[~held].mean())
        report["base_rate"] = base_rate
        report["base_rate_log_loss"] = log_loss(np.full(int(held.sum()), base_rate), labels[held])
    # labels mode fits every precision to the labels; teacher mode fits to fp32's calibrated probabilities.
    teacher = labels if labelled else existing_fp32(logits["fp32"]).astype(np.float64)
    order = [p for p in names if p != "fp32"]
    if labelled and "fp32" in names:
        order = ["fp32", *order]
    fits, metrics = _fit_all(report, order, logits, teacher, held, method, labelled)
    for p in fits:
        log(fit_note(p, report["precisions"][p]))
    if has_fp32:  # lower precisions' decisions against fp32's
        fp32_after = (_calibrator(fits["fp32"]) if "fp32" in fits else existing_fp32)(logits["fp32"])
        _add_agreement(report, metrics, fits, logits, held, fp32_after)
    if labelled:
        for r in report["precisions"].values():
            r["beats_uncalibrated"] = r["after"]["log_loss"] < r["before"]["log_loss"]
            r["beats_base_rate"] = r["after"]["log_loss"] < report["base_rate_log_loss"]
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    entries = {p: dataclasses.replace(fit, extra={
        "mode": report["mode"], "data": str(data), "data_size": len(pairs), "train_pairs": int((~held).sum()),
        "fit_date": now, **report["precisions"][p]["fit"], "metrics": metrics[p]}) for p, fit in fits.items()}
    write_manifest(root, read_manifest(root).with_calibration(entries))
    if plot:
        _plot(plot, {p: (sigmoid(logits[p])[held], _calibrator(fits[p])(logits[p])[held]) for p in order},
              teacher[held], labelled)
    return report


def fit_note(precision: str, result: dict[str, Any]) -> str:
    """One line on what a precision's fit rests on: held-out size and ECE, training pairs per label, and how it
    was regularised (separable pairs named)."""
    record = result["fit"]
    held, train = record["held_out"], record["train"]
    quality = (f"held-out ECE {held['ece']:.4f}" if "ece" in held else
               f"held-out mean |score − fp32's| {held['mean_abs_diff_to_teacher']:.4f}")
    line = f"{precision}: {result['method']} ({_params_text(result['params'])}), {quality} on {held['pairs']} pairs"
    if "positives" in train:
        line += (f"; fitted on {train['pairs']} pairs ({train['positives']} labelled 1, {train['negatives']} "
                 "labelled 0) with Platt's targets")
        if record.get("separable"):
            line += (": the scores separate these labels (every 1 above every 0), so the bare labels' fit has no "
                     "finite slope; the targets hold it finite (regularised), and more pairs, with overlapping "
                     "scores, give a better-founded one")
    else:
        line += f"; fitted on {train['pairs']} pairs to fp32's calibrated scores"
    return line


def _params_text(params: dict[str, float]) -> str:
    return ", ".join(f"{k} = {v:.4g}" for k, v in params.items())


def _score(root: Path, names: Sequence[str], options: LoadOptions, pairs: list[tuple[str, str]],
           progress: bool | None) -> dict[str, np.ndarray]:
    """Raw logits of ``pairs`` per precision (each loaded once, with ``options``)."""
    from memrerank import Reranker

    return {p: Reranker.load(root, options.replace(precision=p)).predict(pairs, raw=True).astype(np.float64)
            for p in bar(list(dict.fromkeys(names)), desc="calibrate: scoring", enabled=progress,
                         unit="precision")}


def _fit_all(report: dict[str, Any], order: Sequence[str], logits: dict[str, np.ndarray], teacher: np.ndarray,
             held: np.ndarray, method: str, labelled: bool
             ) -> tuple[dict[str, CalibrationEntry], dict[str, dict[str, Any]]]:
    """Fit each precision on the train part; its before/after metrics on the held-out part go into ``report``,
    with the fit's record (``fit``: training pairs per label, regularisation, held-out size and ECE)."""
    fits: dict[str, CalibrationEntry] = {}
    metrics: dict[str, dict[str, Any]] = {}
    train = ~held
    for p in order:
        z = logits[p]
        record: dict[str, Any] = {"train": {"pairs": int(train.sum())}}
        if labelled:
            y = teacher[train]
            record["informative_p_value"] = _check_informative(p, z[train], y)
            positives, negatives = z[train][y == 1], z[train][y == 0]
            record["train"].update(positives=int(positives.size), negatives=int(negatives.size))
            # Platt's targets on every labelled fit: on separable pairs the bare labels' fit has no finite slope
            record["regularisation"] = "platt-targets"
            record["separable"] = bool(positives.min() > negatives.max())
            targets = platt_targets(y)
        else:
            targets = teacher[train]
        fits[p] = _fit(method, z[train], targets)
        record["log_odds_spread"] = _check_fit(p, fits[p], z[train], labelled)
        before, after = sigmoid(z).astype(np.float64), _calibrator(fits[p])(z).astype(np.float64)
        metrics[p] = {"before": _metrics(before[held], teacher[held], labelled),
                      "after": _metrics(after[held], teacher[held], labelled)}
        quality = "ece" if labelled else "mean_abs_diff_to_teacher"
        record["held_out"] = {"pairs": int(held.sum()), quality: metrics[p]["after"][quality]}
        report["precisions"][p] = {"method": fits[p].method, "params": fits[p].params, "fit": record, **metrics[p]}
    return fits, metrics


def _add_agreement(report: dict[str, Any], metrics: dict[str, dict[str, Any]], fits: dict[str, CalibrationEntry],
                   logits: dict[str, np.ndarray], held: np.ndarray, fp32_after: np.ndarray) -> None:
    """Each lower precision's held-out decisions against fp32's, before and after calibration."""
    for p in fits:
        if p == "fp32":
            continue
        # at the usual thresholds, before and after
        metrics[p]["agreement_vs_fp32"] = report["precisions"][p]["agreement_vs_fp32"] = {
            "before": decision_agreement(sigmoid(logits[p])[held], sigmoid(logits["fp32"])[held]),
            "after": decision_agreement(_calibrator(fits[p])(logits[p])[held], fp32_after[held]),
        }
        # and at thresholds this model's scores actually reach: fp32's held-out 90/95/99th percentiles
        cuts = [float(c) for c in np.quantile(fp32_after[held], QUANTILES)]
        mine, ref = _calibrator(fits[p])(logits[p])[held], fp32_after[held]
        report["precisions"][p]["agreement_at_fp32_quantiles"] = {
            "quantiles": list(QUANTILES), "thresholds": cuts,
            "after": [float(np.mean((mine >= c) == (ref >= c))) for c in cuts]}


def _plot(path: str | Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], targets: np.ndarray,
          labelled: bool) -> None:
    """Reliability diagram of each precision before and after calibration, on the held-out pairs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ValueError("--plot needs matplotlib: pip install 'memrerank[bench]'") from exc
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="perfect")
    for name, (before, after) in curves.items():
        for probs, style, tag in ((before, "--", "before"), (after, "-", "after")):
            bins = reliability_bins(probs, targets)
            ax.plot([b[0] for b in bins], [b[1] for b in bins], style, marker="o", ms=3,
                    label=f"{name} {tag}" + (f" (ECE {ece(probs, targets):.3f})" if labelled else ""))
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed relevance rate" if labelled else "teacher (fp32) probability")
    ax.set_title("Reliability (held-out pairs, 15 bins)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
