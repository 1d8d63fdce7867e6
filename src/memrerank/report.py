"""What the ``memrerank`` commands print: text and Markdown renderings of manifests and reports.

Each function takes what a command computed (an artifact directory, a calibration report, a bench report, eval
metrics, ranked hits) and returns a string; the commands decide where it goes. Imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["info_text", "rank_table", "calibration_table", "markdown_table", "eval_table"]


def _num(value: float | None, spec: str) -> str:
    return format(float("nan") if value is None else value, spec)


def info_text(root: str | Path) -> str:
    """Human summary of an artifact: family, source, tokens, precisions with parity and fidelity, calibration.

    Raises:
        ArtifactError: the directory holds no readable manifest (the message says what to do).
    """
    from memrerank.manifest import read_manifest

    root = Path(root)
    m = read_manifest(root)
    src, tok = m.source, m.tokens
    lines = [
        f"artifact    {root}",
        f"family      {m.family}",
        f"source      {src.model} ({src.architecture}, revision {src.revision or 'unknown'})",
        f"tokens      max_length={tok.max_length} padding={tok.padding_side} pad_id={tok.pad_id}"
        + (f" yes_id={tok.yes_id} no_id={tok.no_id}" if tok.yes_id is not None else ""),
    ]
    if m.is_decoder:
        lines.append(f"instruction {m.template.default_instruction!r}")
    for name, entry in m.precisions.items():
        par = entry.parity
        if par is None:
            parity = "parity not recorded"
        else:
            tol = f"{par.tolerance:.0e}" if par.tolerance is not None else "n/a"
            parity = (f"max|Δlogit| vs {par.reference} = {par.max_abs_logit_diff:.2e} (tol {tol}), "
                      f"spearman {_num(par.spearman_mean, '.4f')}")
            if par.top10_overlap is not None:
                fid = entry.fidelity
                kept = ", ".join(fid.kept_fp32) if fid is not None else ""
                kept_as = fid.extra.get("kept_as", "fp32") if fid is not None else "fp32"
                parity += (f", top10 {par.top10_overlap:.3f}, budget {'met' if entry.meets_budget else 'MISSED'}"
                           f", kept {kept_as}: {kept or 'none'}")
                extra = (entry.build.extra or {}) if entry.build is not None else {}
                last = extra.get("two_pass_last_tokens")
                if last and last.get("tokens"):
                    parity += f", last {last['tokens']} tokens coded twice"
                if extra.get("block_size"):
                    parity += (f", {extra.get('int4_products', '?')} products 4-bit"
                               + (f", {extra['eight_bit_products']} 8-bit" if extra.get("eight_bit_products") else "")
                               + f" (blocks of {extra['block_size']})")
        lines.append(f"precision   {name:<11} {entry.size_bytes / 2**20:8.1f} MiB  {parity}")
    for name, engine in m.engines.items():
        lines.append(f"engine      {name:<11} TensorRT {engine.tensorrt} on {engine.gpu} "
                     f"(sm_{engine.compute_capability}), {engine.engine}")
    for name in m.precisions:
        block = m.calibration.get(name)
        if block is None:
            lines.append(f"calibration {name:<11} none: scores are sigmoid(logit)")
            continue
        extra = block.extra
        after = (extra.get("metrics") or {}).get("after") or {}
        held = extra.get("held_out") or {}
        held_out = (f", held-out ECE {after['ece']:.4f}" if "ece" in after else "") + (
            f" on {held['pairs']} pairs" if "pairs" in held and "ece" in after else "") + (
            ", separable: regularised by Platt's targets" if extra.get("separable") else "")
        lines.append(f"calibration {name:<11} {block.method} {block.params} "
                     f"({extra.get('mode', '?')} mode, {extra.get('data_size', '?')} pairs, "
                     f"{extra.get('fit_date', '?')}{held_out})")
    return "\n".join(lines)


def rank_table(hits: Sequence[Any], width: int = 80) -> str:
    """Ranked hits (:class:`memrerank.RankHit`) as a fixed-width table, texts cut to ``width`` characters."""
    lines = [f"{'rank':>4}  {'score':>6}  {'logit':>8}  {'idx':>4}  text"]
    for r, h in enumerate(hits, 1):
        text = h.text.replace("\n", " ")
        text = text if len(text) <= width else text[: width - 3] + "..."
        lines.append(f"{r:>4}  {h.score:6.3f}  {h.logit:8.3f}  {h.index:>4}  {text}"
                     f"{' [truncated]' if h.truncated else ''}")
    return "\n".join(lines)


def calibration_table(report: Mapping[str, Any]) -> str:
    """Before/after Markdown table of a calibration report (``memrerank.calibrate.calibrate_artifact``)."""
    labelled = report["mode"] == "labels"
    cols = ["ece", "brier", "log_loss"] if labelled else ["mean_abs_diff_to_teacher", "log_loss"]
    head = (["precision", "method"] + [f"{c} before → after" for c in cols]
            + ["agree@0.3/0.5/0.7 vs fp32 before → after"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p, r in report["precisions"].items():
        row = [p, r["method"]] + [f"{r['before'][c]:.4f} → {r['after'][c]:.4f}" for c in cols]
        ag = r.get("agreement_vs_fp32")
        row.append(" / ".join(f"{ag['before'][t]:.3f}" for t in ag["before"]) + " → "
                   + " / ".join(f"{ag['after'][t]:.3f}" for t in ag["after"]) if ag else "—")
        lines.append("| " + " | ".join(row) + " |")
    tail = f"\n{report['mode']} mode, {report['pairs']} pairs, {report['held_out']} held out"
    if labelled:
        tail += (f"; base rate {report['base_rate']:.4f} "
                 f"(constant predictor log-loss {report['base_rate_log_loss']:.4f})")
    from memrerank.calibrate import fit_note

    notes = [fit_note(p, r) for p, r in report["precisions"].items() if "fit" in r]
    return "\n".join(lines) + tail + "".join(f"\n{n}" for n in notes)


def eval_table(precision: str, results: Mapping[str, Mapping[str, float]]) -> str:
    """One precision's retrieval metrics per category (``overall`` last) as a Markdown table."""
    cats = sorted(results, key=lambda c: (c == "overall", c))
    metrics = [k for k in results["overall"] if k != "queries"]
    lines = [precision, "| category | queries | " + " | ".join(metrics) + " |",
             "|" + "---|" * (len(metrics) + 2)]
    for c in cats:
        row = results[c]
        lines.append(f"| {c} | {row['queries']} | " + " | ".join(f"{row[m]:.4f}" for m in metrics) + " |")
    return "\n".join(lines)


def markdown_table(report: Mapping[str, Any]) -> str:
    """A ``memrerank bench`` report (:func:`memrerank.benchmark.run_bench`) as Markdown tables."""
    ks = sorted({int(k) for r in report["precisions"].values() for k in r["latency_ms"]})
    bss = sorted({int(b) for r in report["precisions"].values() for b in r["pairs_per_s"]})
    head = (["precision", "size MiB", "cold start s"] + [f"p50/p95 ms K={k}" for k in ks]
            + [f"pairs/s b={b}" for b in bss] + ["peak RSS MiB", "Spearman", "top-10", "ΔMAP"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p, r in report["precisions"].items():
        f = r.get("fidelity")  # none without an fp32 precision to compare with
        row = [p, f"{r['size_mb']:.1f}", f"{r['cold_start_s']:.2f}"]
        row += [f"{r['latency_ms'][str(k)]['p50']:.1f} / {r['latency_ms'][str(k)]['p95']:.1f}" for k in ks]
        row += [f"{r['pairs_per_s'][str(b)]:.0f}" for b in bss]
        row += [f"{r['peak_rss_mb']:.0f}"]
        row += ([f"{f['spearman_mean']:.4f}", f"{f['top10_overlap']:.3f}",
                 f"{f['delta_MAP']:+.4f}" if "delta_MAP" in f else "n/a"] if f else ["no fp32"] * 3)
        lines.append("| " + " | ".join(row) + " |")
    lines += _fast_path_table(report)
    m = report["machine"]
    providers = report.get("providers")
    on = f", providers {', '.join(providers)}" if providers else ""
    lines.append(f"\n{m['cpu']}, {m['cores']} cores, threads={report['threads']}, batch={report['batch_size']}, "
                 f"onnxruntime {m['onnxruntime']}{on}, data: {report['data']} ({report['queries']} queries)")
    return "\n".join(lines)


def _fast_path_table(report: Mapping[str, Any]) -> list[str]:
    lines = ["", "| precision | prefix reuse off → on pairs/s | speed-up | ideal token ratio | share of ideal | "
             "padding waste | host share (numpy packer) | host share (native packer) | pack ms numpy / native |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p, r in report["precisions"].items():
        f = r.get("fast_path")
        if not f:
            continue
        pr = f.get("prefix_reuse")
        reuse = (f"{pr['pairs_per_s_off']:.1f} → {pr['pairs_per_s_on']:.1f}", f"{pr['speedup']:.2f}×",
                 f"{pr['ideal_token_ratio']:.2f}×", f"{100 * pr['share_of_ideal']:.0f} %") if pr else ("n/a",) * 4
        host = f.get("host")
        if not host:
            lines.append("| " + " | ".join([p, *reuse, f"{100 * f['padding_waste']:.1f} %", "not measured",
                                            "not measured", "-"]) + " |")
            continue
        nat = host.get("native")
        lines.append("| " + " | ".join([
            p, *reuse, f"{100 * f['padding_waste']:.1f} %",
            f"{100 * host['numpy']['host_share']:.1f} % of {host['numpy']['wall_ms']:.0f} ms",
            f"{100 * nat['host_share']:.1f} % of {nat['wall_ms']:.0f} ms" if nat else "not built",
            f"{host['numpy']['pack_ms']:.2f} / {nat['pack_ms']:.2f}" if nat else f"{host['numpy']['pack_ms']:.2f} / -",
        ]) + " |")
    return lines if len(lines) > 3 else []
