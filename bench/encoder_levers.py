"""Each encoder int8 lever on its own: speed against sentence-transformers' onnx qint8, and fidelity vs fp32.

Every variant is built from one artifact's fp32 graph (the peers bench's all-MiniLM-L6-v2 cross-encoder with
its LoCoMo-fitted head, ``bench/peers_encoder.py`` makes it) and run through ``Reranker.predict`` with its backend
swapped, on the peers bench's speed pairs, interleaved round by round with sentence-transformers'
``backend="onnx"`` avx512_vnni qint8 ``CrossEncoder.predict`` (batch 32), one intra-op thread: CPU time of this
thread (onnxruntime and torch run on the caller's thread with one thread, so it is what a loaded machine
perturbs least) and wall time. Fidelity: the export's budget metrics on its built-in calibration pairs, and
held-out LoCoMo quality (NDCG@10 vs fp32's, top-10 overlap and Spearman vs fp32) on the peers bench's quality
set.

    python bench/peers_encoder.py --threads 1          # makes bench/out/minilm-locomo (checkpoint, artifact)
    python bench/encoder_levers.py --workdir bench/out/minilm-locomo --threads 1

Results: ``bench/results/encoder_levers.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from common import DEFAULT_LOCOMO, environment, interleaved, write  # noqa: E402
from peers_encoder import quality, run_info, split_queries, st_onnx  # noqa: E402


def _int8_attention(src: Path, out: Path) -> int:
    """``src`` with its activation x activation MatMuls (attention's Q·Kᵀ and softmax·V) in int8, every scale
    belonging to one token so the result stays batch-independent (no scale reaches over padding):

    - Q·Kᵀ: Q coded per row (query token; uint8, zero point 128), Kᵀ per column (key token; int8);
    - P·V (P from a Softmax): V coded per row (key token), its scales folded into P's columns first
      (``P·V = (P ⊙ sᵀ)·V_q``), then ``P ⊙ sᵀ`` coded per row.

    ``MatMulInteger``, then the scales applied. Returns how many products it changed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from memrerank.export.graph import save_graph

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    consts = {"_ia_inv127": np.array(1 / 127, np.float32), "_ia_floor": np.array(1e-30, np.float32),
              "_ia_128": np.array(128, np.float32), "_ia_zero": np.array(0, np.float32),
              "_ia_255": np.array(255, np.float32), "_ia_lo": np.array(-127, np.float32),
              "_ia_hi": np.array(127, np.float32), "_ia_zp": np.array(128, np.uint8)}
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())

    def scale(x: str, axis: int, p: str) -> list:
        if opset < 18:
            reduce = helper.make_node("ReduceMax", [p + "_abs"], [p + "_max"], axes=[axis], keepdims=1, name=p + "_max")
        else:
            graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), p + "_axis"))
            reduce = helper.make_node("ReduceMax", [p + "_abs", p + "_axis"], [p + "_max"], keepdims=1, name=p + "_max")
        return [helper.make_node("Abs", [x], [p + "_abs"], name=p + "_abs"), reduce,
                helper.make_node("Mul", [p + "_max", "_ia_inv127"], [p + "_raw"], name=p + "_raw"),
                helper.make_node("Max", [p + "_raw", "_ia_floor"], [p + "_scale"], name=p + "_scale"),
                helper.make_node("Div", [x, p + "_scale"], [p + "_div"], name=p + "_div"),
                helper.make_node("Round", [p + "_div"], [p + "_round"], name=p + "_round")]

    producer = {o: n.op_type for n in graph.node for o in n.output}
    new_nodes, done = [], 0
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[0] in inits or node.input[1] in inits:
            new_nodes.append(node)
            continue
        a, b, p = node.input[0], node.input[1], (node.name or node.output[0]) + "_ia"
        pv = producer.get(a) == "Softmax"
        # the right operand's codes, one scale per key token: V (P·V) per row, Kᵀ (Q·Kᵀ) per column
        new_nodes += scale(b, -1 if pv else -2, p + "_b") + [
            helper.make_node("Clip", [p + "_b_round", "_ia_lo", "_ia_hi"], [p + "_b_clip"], name=p + "_b_clip"),
            helper.make_node("Cast", [p + "_b_clip"], [p + "_b_s8"], to=TensorProto.INT8, name=p + "_b_s8")]
        if pv:  # V's row scales move onto P's columns (Transpose the (.., K, 1) scales): (P ⊙ sᵀ)·V_q
            new_nodes += [helper.make_node("Transpose", [p + "_b_scale"], [p + "_b_scale_t"], perm=[0, 1, 3, 2],
                                           name=p + "_b_scale_t"),
                          helper.make_node("Mul", [a, p + "_b_scale_t"], [p + "_a_folded"], name=p + "_a_folded")]
            a = p + "_a_folded"
        new_nodes += scale(a, -1, p + "_a") + [
            helper.make_node("Add", [p + "_a_round", "_ia_128"], [p + "_a_shift"], name=p + "_a_shift"),
            helper.make_node("Clip", [p + "_a_shift", "_ia_zero", "_ia_255"], [p + "_a_clip"], name=p + "_a_clip"),
            helper.make_node("Cast", [p + "_a_clip"], [p + "_a_u8"], to=TensorProto.UINT8, name=p + "_a_u8"),
            helper.make_node("MatMulInteger", [p + "_a_u8", p + "_b_s8", "_ia_zp"], [p + "_i32"], name=p + "_mm"),
            helper.make_node("Cast", [p + "_i32"], [p + "_f"], to=TensorProto.FLOAT, name=p + "_f"),
            helper.make_node("Mul", [p + "_f", p + "_a_scale"], [node.output[0] if pv else p + "_fa"],
                             name=p + "_fa")]
        if not pv:  # Kᵀ's column scales are still to apply
            new_nodes.append(helper.make_node("Mul", [p + "_fa", p + "_b_scale"], [node.output[0]], name=p + "_out"))
        done += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    save_graph(model, out, False)
    return done


def _fused(fp32: Path, out: Path, mha: bool) -> dict:
    """onnxruntime.transformers' BERT fusions (Attention or MultiHeadAttention, SkipLayerNorm, BiasGelu, ...)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    opts = FusionOptions("bert")
    opts.use_multi_head_attention = mha
    model = optimize_model(str(fp32), model_type="bert", num_heads=0, hidden_size=0, optimization_options=opts,
                           opt_level=0)  # heads and width read from the graph
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save_model_to_file(str(out))
    return {k: v for k, v in model.get_fused_operator_statistics().items() if v}


def build_variants(artifact: Path, work: Path, calib) -> dict[str, dict]:
    """name → {"graph": path, "what": ...}; each lever added to the one before it, then each taken away."""
    import onnx

    from memrerank.export.optimize import plan_int8
    from memrerank.export.graph import save_graph
    from memrerank.export.quantize import (build_int8, build_int8_per_tensor, build_int8_static, graph_info,
                                           quantize_embeddings, quantize_per_row)

    fp32 = artifact / "fp32" / "model.onnx"
    info = graph_info(fp32)
    v: dict[str, dict] = {"fp32": {"graph": fp32, "what": "the export's fp32 graph (unfused)"}}

    def path(name: str) -> Path:
        return work / name.replace(" ", "_").replace("+", "") / "model.onnx"

    for name, mha in (("fp32 + ort fusions (Attention)", False), ("fp32 + ort fusions (MultiHeadAttention)", True)):
        v[name] = {"graph": path(name), "what": "onnxruntime.transformers.optimizer BERT fusions",
                   "fused": _fused(fp32, path(name), mha)}
    plain = plan_int8(fp32, info, calib, first_token=False)
    first = plan_int8(fp32, info, calib)
    p = path("fp32 first token")
    save_graph(first.copy_model(), p, info.external_data)
    v["fp32 first token"] = {"graph": p, "what": "fp32 with the last layer on the first token only"}
    build_int8_per_tensor(fp32, path("int8 per-tensor"), info)
    v["int8 per-tensor"] = {"graph": path("int8 per-tensor"), "what": "Optimum dynamic (one activation scale per "
                            "batch, not batch-independent): the kernels sentence-transformers' qint8 uses"}
    build_int8_static(fp32, path("int8-static"), info, calib)
    v["int8-static"] = {"graph": path("int8-static"), "what": "static QDQ, per-channel weights, MinMax ranges"}

    def per_row(name: str, plan, *, pooler_fp32: bool, smooth: bool, gelu: bool, embeddings: bool, what: str,
                source=None) -> None:
        keep = set(plan.one_row) if pooler_fp32 else set(plan.one_row) - {n for n in plan.one_row if "pooler" in n}
        nodes = [n for n in info.weight_nodes if n not in keep]
        out = path(name)
        out.parent.mkdir(parents=True, exist_ok=True)
        model = plan.copy_model() if source is None else onnx.load(str(source))
        quantize_per_row(fp32 if source is None else source, out, nodes, info.external_data, model=model,
                         smooth=plan.smooth if smooth else None, lower_bounds=plan.lower_bounds if gelu else None)
        if embeddings:
            quantize_embeddings(out, info.embedding_nodes, info.external_data)
        v[name] = {"graph": out, "what": what, "quantized_products": len(nodes)}

    bare = plan_int8(fp32, info, None, first_token=False)  # no smoothing / offsets / first token
    per_row("int8 per-row", bare, pooler_fp32=False, smooth=False, gelu=False, embeddings=True,
            what="the former int8 default as built plainly (every weight product, int8 embeddings)")
    fused = path("fp32 + ort fusions (MultiHeadAttention)")
    fused_info = graph_info(fused)
    out = path("int8 per-row on fused graph")
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_per_row(fused, out, fused_info.weight_nodes, fused_info.external_data)
    v["int8 per-row on fused graph"] = {"graph": out, "what": "per-row int8 after the MultiHeadAttention fusions"}
    per_row("+ pooler fp32", bare, pooler_fp32=True, smooth=False, gelu=False, embeddings=True,
            what="per-row, the pooler (one row per pair) kept fp32")
    per_row("+ smoothing", plain, pooler_fp32=True, smooth=True, gelu=False, embeddings=True,
            what=f"+ SmoothQuant scale migration on LayerNorm outputs (alpha {plain.record['smoothing']['alpha']})")
    per_row("+ gelu offset codes", plain, pooler_fp32=True, smooth=True, gelu=True, embeddings=True,
            what="+ GELU outputs coded 0..255 with a fixed zero point")
    record = build_int8(fp32, path("+ first token (int8 default)"), info, calib).to_dict()
    v["+ first token (int8 default)"] = {"graph": path("+ first token (int8 default)"), "build": record,
                                         "what": "+ last layer on the first token (what `memrerank export` builds)"}
    attention = path("+ int8 attention")
    v["+ int8 attention"] = {"graph": attention, "quantized_attention_products": _int8_attention(
        path("+ first token (int8 default)"), attention), "what": "the int8 default + attention's Q·Kᵀ and "
        "softmax·V in int8 (MatMulInteger; every scale one token's: Q per row, Kᵀ per column, V per row folded into P)"}
    per_row("default without smoothing", first, pooler_fp32=True, smooth=False, gelu=True, embeddings=True,
            what="the default with the smoothing taken away")
    per_row("default without gelu offset codes", first, pooler_fp32=True, smooth=True, gelu=False, embeddings=True,
            what="the default with the GELU offset codes taken away")
    per_row("default with fp32 embeddings", first, pooler_fp32=True, smooth=True, gelu=True, embeddings=False,
            what="the default with the embedding table left fp32")
    return v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=HERE / "out" / "minilm-locomo")
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-queries", type=int, default=300)
    ap.add_argument("--speed-queries", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default=None, help="comma-separated variant names to measure (default: all)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "encoder_levers.json")
    args = ap.parse_args()

    import torch

    from memrerank import LoadOptions, Reranker
    from memrerank.export.fidelity import CalibSet
    from memrerank.export.pairs import builtin_calibration_groups

    torch.set_num_threads(args.threads)
    artifact = args.workdir / "artifact"
    if not (artifact / "manifest.json").exists():
        raise SystemExit(f"{artifact}: run bench/peers_encoder.py --workdir {args.workdir} first")
    calib = CalibSet(artifact, builtin_calibration_groups())
    variants = build_variants(artifact, args.workdir / "levers", calib)
    if args.only:
        wanted = set(args.only.split(","))
        variants = {k: v for k, v in variants.items() if k in wanted or k == "fp32"}
    _, test = split_queries(args.locomo)
    speed_set, quality_set = test[: args.speed_queries], test[: args.eval_queries]
    n_speed = sum(len(q.documents) for q in speed_set)

    options = LoadOptions("fp32", threads=args.threads)
    fp32 = Reranker.load(artifact, options)
    rerankers = {k: fp32.with_graph(v["graph"], options) for k, v in variants.items()}
    st = st_onnx(args.workdir, args.threads)

    def ours(key: str):
        def run() -> None:
            for q in speed_set:
                rerankers[key].predict([(q.query, d) for d in q.documents], raw=True)
        return run

    def peer() -> None:
        for q in speed_set:
            st.predict([(q.query, d) for d in q.documents], batch_size=32, show_progress_bar=False,
                       activation_fn=torch.nn.Identity())

    runs = {"sentence-transformers onnx qint8": peer, **{k: ours(k) for k in variants}}
    for fn in runs.values():
        fn()  # warm-up
    wall, cpu, loads = interleaved(runs, args.repeats, cpu_clock=time.thread_time, progress=lambda rnd, _: print(
        f"round {rnd + 1}/{args.repeats}", file=sys.stderr, flush=True))
    st_cpu, st_wall = min(cpu["sentence-transformers onnx qint8"]), min(wall["sentence-transformers onnx qint8"])

    results: dict[str, dict] = {}
    ref_scores = None
    for key in runs:
        r = {"pairs_per_cpu_s": n_speed / min(cpu[key]), "pairs_per_s": n_speed / min(wall[key]),
             "vs_st_onnx_qint8_cpu": st_cpu / min(cpu[key]), "vs_st_onnx_qint8_wall": st_wall / min(wall[key]),
             "cpu_s": {"min": min(cpu[key]), "median": statistics.median(cpu[key])},
             "wall_s": {"min": min(wall[key]), "median": statistics.median(wall[key])}}
        if key in variants:
            r.update({k: v for k, v in variants[key].items() if k != "graph"})
            r["calibration_budget_metrics"] = calib.fidelity(calib.score(variants[key]["graph"]))
            scores = [rerankers[key].predict([(q.query, d) for d in q.documents], raw=True) for q in quality_set]
            ref_scores = scores if key == "fp32" else ref_scores
            r["held_out"] = quality(quality_set, scores, ref_scores)
        results[key] = r
        print(f"{key:<40} {r['vs_st_onnx_qint8_cpu']:5.2f}x ST (cpu)  "
              + (f"calib spearman {r['calibration_budget_metrics']['spearman_mean']:.4f} top10 "
                 f"{r['calibration_budget_metrics']['top10_overlap']:.3f}  "
                 f"held-out NDCG {r['held_out']['ndcg_vs_fp32']:.4f}"
                 f" top10 {r['held_out']['top10_vs_fp32']:.3f}" if key in variants else ""), file=sys.stderr)
    write(args.out, {
        "environment": {**environment(args.threads), **run_info(loads)},
        "workload": f"speed: {len(speed_set)} held-out LoCoMo queries, {n_speed} pairs, Reranker.predict (batch "
                    f"{fp32.batch_size}) vs CrossEncoder.predict(batch_size=32); {args.repeats} interleaved "
                    f"rounds, min; quality: {len(quality_set)} held-out queries",
        "budget": "export: spearman >= 0.99 and top-10 >= 0.95 on the built-in pairs; issue 16: NDCG@10 >= 99.5 % "
                  "of fp32 and top-10 overlap >= 0.95 on held-out labelled pairs",
        "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
