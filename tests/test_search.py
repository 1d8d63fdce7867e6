"""The bounded sensitivity search (export/fidelity.py): the real CalibSet and search on a simulated graph.

The 'graph' is simulated at the backend: each pair has a known fp32 logit, and every weight product left
quantized adds its own fixed noise to every pair's logit (its amplitude sets how much it damages the ranking).
Everything else — length-sorted batches, chunked scoring, early abandonment, the sample, the fidelity metrics,
the search — is the code an export runs. Expected fidelity is recomputed here with plain numpy (ranks by double
argsort, top-10 by sets), independently of memrerank.export.metrics. The real graphs are covered by
tests/test_precisions.py (strict budget on a tiny BERT) and the end-to-end progress test below.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from memrerank.export import fidelity
from memrerank.export.fidelity import (
    CalibSet,
    FidelityBudget,
    SearchLimits,
    _blocks,
    search_exclusions,
    stratified_groups,
)

FP32 = "fp32.onnx"
QUANT = "int8.onnx"
UNBOUNDED = SearchLimits(max_pairs=10**9, probe_pairs=10**9, max_blocks=1000, max_refine=1000, max_cost=math.inf)
#: The default bounds without the time-based one (the simulated graph builds in microseconds, so wall time says
#: nothing here; test_refinement_stops_at_the_cost_bound covers it).
BOUNDED = SearchLimits(max_cost=math.inf)


class SimulatedModel:
    """Pairs with known fp32 logits; each quantized product adds ``amplitude * z`` to a pair's logit (z fixed,
    standard normal per product and pair; ``only_groups`` confines a product's noise to some query groups)."""

    def __init__(self, group_sizes: list[int], amplitude: dict[str, float], seed: int = 0,
                 only_groups: dict[str, set[int]] | None = None) -> None:
        rng = np.random.default_rng(seed)
        self.group_of = np.repeat(np.arange(len(group_sizes)), group_sizes)
        self.n = len(self.group_of)
        self.reference = rng.standard_normal(self.n)
        self.amplitude = amplitude
        self.noise = {p: rng.standard_normal(self.n) for p in amplitude}
        for p, gs in (only_groups or {}).items():
            self.noise[p] = np.where(np.isin(self.group_of, list(gs)), self.noise[p], 0.0)
        self.builds: list[list[str]] = []

    def build(self, exclude: list[str]) -> None:
        self.builds.append(list(exclude))

    def logits(self, rows: np.ndarray, exclude: list[str] | None) -> np.ndarray:
        """Logits of ``rows`` on the fp32 graph (``exclude`` None) or on a graph keeping ``exclude`` in fp32."""
        out = self.reference[rows].copy()
        if exclude is not None:
            for p, a in self.amplitude.items():
                if p not in exclude:
                    out += a * self.noise[p][rows]
        return out


class SimulatedBackend:
    def __init__(self, model: SimulatedModel, fp32: bool) -> None:
        self.model, self.fp32 = model, fp32
        self.calls = 0

    def score(self, input_ids, attention_mask, token_type_ids):
        self.calls += 1
        rows = input_ids[:, 0] - 1  # each pair's first token is its row + 1
        return self.model.logits(rows, None if self.fp32 else self.model.builds[-1]).astype(np.float32)


class SimulatedCalib(CalibSet):
    """The real CalibSet over token ids that name their pair, scored by :class:`SimulatedBackend`."""

    def __init__(self, model: SimulatedModel, batch_size: int = 16) -> None:
        sizes = np.bincount(model.group_of)
        groups = [(f"query {g}", [f"doc {i}" for i in range(s)]) for g, s in enumerate(sizes)]
        ids = [np.full(4 + i % 7, i + 1, dtype=np.int64) for i in range(model.n)]  # lengths vary: sorted batches
        self._setup(groups, ids, None, model.group_of, batch_size, 0, "right")
        self.model = model
        self.scored_rows: list[int] = []
        self.reference = self.score(FP32)
        self.scored_rows.clear()

    def _backend(self, graph):
        backend = SimulatedBackend(self.model, fp32=graph == FP32)
        calib = self

        class Counting:
            def score(self, input_ids, attention_mask, token_type_ids):
                calib.scored_rows.extend((input_ids[:, 0] - 1).tolist())
                return backend.score(input_ids, attention_mask, token_type_ids)

        return Counting()


def independent_fidelity(model: SimulatedModel, exclude: list[str], groups=None) -> dict[str, float]:
    """Mean per-group Spearman (Pearson of double-argsort ranks; the logits are continuous, so no ties) and
    top-10 overlap, computed without memrerank.export.metrics."""
    spear, top = [], []
    for g in (range(model.group_of.max() + 1) if groups is None else groups):
        rows = np.flatnonzero(model.group_of == g)
        a, b = model.logits(rows, exclude), model.reference[rows]
        ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
        spear.append(np.corrcoef(ra, rb)[0, 1])
        k = min(10, len(rows))
        top.append(len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k)
    return {"spearman_mean": float(np.mean(spear)), "top10_overlap": float(np.mean(top))}


def _layers(n_layers: int, per_layer: int = 6) -> dict[str, list[str]]:
    return {f"layer {i}": [f"/enc/layer.{i}/p{j}/MatMul" for j in range(per_layer)] for i in range(n_layers)}


def _search(model, groups, budget, limits=None, progress=False, calib=None):
    logs: list[str] = []
    calib = calib or SimulatedCalib(model)
    report = search_exclusions(model.build, QUANT, calib, groups, budget, logs.append, limits=limits,
                               progress=progress)
    return report, logs, calib


@pytest.fixture(autouse=True)
def _no_size(monkeypatch):
    monkeypatch.setattr(fidelity, "_size", lambda graph: 1)


def _amplitudes(groups, base=0.01, loud=None):
    amp = {n: base for nodes in groups.values() for n in nodes}
    amp.update(loud or {})
    return amp


BUDGET = FidelityBudget(top10=0.9, spearman=0.99)


def test_chunked_scoring_matches_one_pass_and_stops_early():
    model = SimulatedModel([20] * 6, {"p": 0.3})
    calib = SimulatedCalib(model)
    model.build([])
    whole = calib.score(QUANT)
    np.testing.assert_allclose(whole, model.logits(np.arange(model.n), []), rtol=1e-6)
    units = [calib.group_rows[g] for g in (5, 2, 0)]
    part = calib.score(QUANT, units)
    scored = np.concatenate(units)
    np.testing.assert_array_equal(part[scored], whole[scored])
    assert np.isnan(np.delete(part, scored)).all()
    seen: list[int] = []
    calib.scored_rows.clear()
    every = [calib.group_rows[g] for g in range(6)]
    assert calib.score(QUANT, every, stop=lambda k: seen.append(k) or k >= 4) is None
    assert seen == [4] and sorted(calib.scored_rows) == sorted(np.concatenate(calib.group_rows[:4]).tolist())
    lengths = sorted((4 + i % 7 for i in range(80)), reverse=True)  # padded tokens of the length-sorted batches
    assert calib.last_timing[1] == sum(16 * lengths[s] for s in range(0, 80, 16))
    ref = independent_fidelity(model, [])
    got = calib.fidelity(whole)
    assert got["spearman_mean"] == pytest.approx(ref["spearman_mean"], abs=1e-9)
    assert got["top10_overlap"] == pytest.approx(ref["top10_overlap"])
    assert got["pairs"] == 120 and got["queries"] == 6


def test_plain_meeting_the_budget_is_one_build_on_every_pair():
    groups = _layers(2)
    model = SimulatedModel([20] * 4, _amplitudes(groups, base=0.001))
    report, logs, calib = _search(model, groups, BUDGET)
    assert model.builds == [[]] and report["kept_fp32"] == [] and report["meets_budget"]
    assert report["timing"]["builds"] == 1 and report["timing"]["scored_pairs"] == 80
    assert report["fidelity"]["spearman_mean"] == pytest.approx(independent_fidelity(model, [])["spearman_mean"])
    assert "1 builds" in logs[-1]


def test_finds_the_damaging_products_and_meets_the_budget_on_every_pair():
    groups = _layers(6)
    loud = {"/enc/layer.3/p5/MatMul": 0.5, "/enc/layer.1/p2/MatMul": 0.3}
    model = SimulatedModel([20] * 12, _amplitudes(groups, loud=loud))
    report, _, calib = _search(model, groups, BUDGET, limits=SearchLimits(max_refine=20, max_cost=math.inf))
    kept = report["kept_fp32_nodes"]
    assert set(loud) <= set(kept)
    assert set(report["kept_fp32"]) == {"layer 1", "layer 3"}
    assert len(kept) < 6, "the refinement gives most of the kept layers back"
    truth = independent_fidelity(model, kept)
    assert BUDGET.met(truth) and report["meets_budget"]
    assert report["fidelity"]["spearman_mean"] == pytest.approx(truth["spearman_mean"], abs=1e-9)
    assert report["fidelity"]["pairs"] == 240
    assert model.builds[-1] == kept, "the graph on disk is the one the report describes"
    assert list(report["sensitivity"])[:2] == ["layer 3", "layer 1"]
    assert {"plain", "sensitivity", "keep", "refine", "total"} <= set(report["timing"])
    assert "confirm" not in report["timing"], "the sample was every pair: the result is not scored again"


def test_abandoned_candidates_could_not_have_met_the_budget(monkeypatch):
    groups = _layers(4)
    loud = {"/enc/layer.0/p0/MatMul": 0.6, "/enc/layer.2/p3/MatMul": 0.25}
    model = SimulatedModel([20] * 10, _amplitudes(groups, loud=loud))
    abandoned: list[list[str]] = []
    real_score = CalibSet.score

    def recording(self, graph, units=None, *, stop=None, out=None):
        result = real_score(self, graph, units, stop=stop, out=out)
        if result is None:
            abandoned.append(list(model.builds[-1]))
        return result

    monkeypatch.setattr(CalibSet, "score", recording)
    # 200 pairs: the sample is every pair, no correction
    report, _, calib = _search(model, groups, BUDGET, limits=SearchLimits(max_refine=20, max_cost=math.inf))
    assert report["meets_budget"] and abandoned, "some candidates were abandoned early"
    for exclude in abandoned:
        assert not BUDGET.met(independent_fidelity(model, exclude)), exclude
    full_cost = report["timing"]["evaluations"] * model.n
    assert report["timing"]["scored_pairs"] < full_cost


def test_an_unlucky_sample_is_corrected_on_every_pair(monkeypatch):
    groups = _layers(4)
    # layer 2's product damages only groups the sample leaves out: the sample cannot see it
    loud = {"/enc/layer.0/p0/MatMul": 0.5, "/enc/layer.2/p0/MatMul": 0.5}
    model = SimulatedModel([20] * 40, _amplitudes(groups, loud=loud),
                           only_groups={"/enc/layer.2/p0/MatMul": set(range(20, 40))})
    monkeypatch.setattr(fidelity, "stratified_groups", lambda damage, sizes, max_pairs: list(range(10)))
    report, logs, calib = _search(model, groups, BUDGET, limits=SearchLimits(max_pairs=200, max_cost=math.inf))
    assert report["search_sample"]["pairs"] == 200 and report["search_sample"]["queries"] == 10
    assert report["meets_budget"] and report["fidelity"]["pairs"] == 800
    assert BUDGET.met(independent_fidelity(model, report["kept_fp32_nodes"]))
    assert set(loud) <= set(report["kept_fp32_nodes"])
    assert any("every pair" in m for m in logs)
    assert model.builds[-1] == report["kept_fp32_nodes"]


def test_a_sample_that_sees_less_damage_is_scaled_up(monkeypatch):
    groups = _layers(4)
    loud = {"/enc/layer.0/p0/MatMul": 0.5}
    # the sample's groups get a tenth of every product's noise: plain looks 100x less damaging there
    model = SimulatedModel([20] * 40, _amplitudes(groups, loud=loud))
    for p in model.noise:
        model.noise[p] = np.where(model.group_of < 10, 0.1, 1.0) * model.noise[p]
    monkeypatch.setattr(fidelity, "stratified_groups", lambda damage, sizes, max_pairs: list(range(10)))
    report, logs, _ = _search(model, groups, BUDGET, limits=SearchLimits(max_pairs=200, max_cost=math.inf))
    scale = report["search_sample"]["damage_scale"]["spearman_mean"]
    assert scale == fidelity.SAMPLE_CORRECTION_MAX, "the correction is capped"
    assert report["meets_budget"] and BUDGET.met(independent_fidelity(model, report["kept_fp32_nodes"]))
    assert "/enc/layer.0/p0/MatMul" in report["kept_fp32_nodes"]


@pytest.mark.parametrize("base, slack", [(0.005, 3), (0.02, None)], ids=["concentrated", "diffuse"])
def test_bounded_search_meets_the_budget_like_the_unbounded_one_for_far_less_scoring(base, slack):
    """Concentrated damage (a few loud products, as in MiniLM) and diffuse damage (every product matters): the
    bounded search meets the budget on every pair, as the unbounded one does, scoring a fraction of the pairs.
    With concentrated damage it keeps at most ``slack`` more products in fp32 (its refinement tries 6 graphs,
    the unbounded one every product); with diffuse damage only the budget is promised."""
    groups = _layers(6) | {"embeddings": ["/emb/Gather"]}
    loud = {"/enc/layer.4/p5/MatMul": 0.4, "/enc/layer.1/p2/MatMul": 0.3, "/emb/Gather": 0.15}
    model_a = SimulatedModel([20] * 48, _amplitudes(groups, base=base, loud=loud), seed=3)
    model_b = SimulatedModel([20] * 48, _amplitudes(groups, base=base, loud=loud), seed=3)
    bounded, _, _ = _search(model_a, groups, BUDGET, limits=BOUNDED)
    unbounded, _, _ = _search(model_b, groups, BUDGET, limits=UNBOUNDED)
    for report, model in ((bounded, model_a), (unbounded, model_b)):
        assert report["meets_budget"] and BUDGET.met(independent_fidelity(model, report["kept_fp32_nodes"]))
        assert report["fidelity"]["pairs"] == 960
    assert set(loud) <= set(bounded["kept_fp32_nodes"])
    if slack is not None:
        assert set(loud) == set(unbounded["kept_fp32_nodes"]), "the exhaustive search finds exactly the loud ones"
        assert len(bounded["kept_fp32_nodes"]) <= len(unbounded["kept_fp32_nodes"]) + slack
    assert bounded["timing"]["scored_pairs"] < 0.35 * unbounded["timing"]["scored_pairs"]
    assert bounded["timing"]["builds"] <= 1 + 7 + 2 * 3 + 6 + 4


def test_many_layers_are_searched_in_bounded_blocks():
    groups = _layers(28, per_layer=7) | {"other": ["/lm/other"], "embeddings": ["/emb/Gather"]}
    blocks = _blocks(groups, 8)
    assert len(blocks) == 8
    members = [g for gs in blocks.values() for g in gs]
    assert sorted(members) == sorted(groups)  # every group in exactly one block, adjacent layers together
    loud = {"/enc/layer.17/p6/MatMul": 0.6}
    model = SimulatedModel([20] * 8, _amplitudes(groups, base=0.002, loud=loud))
    limits = SearchLimits(max_blocks=8, max_refine=10, max_cost=math.inf)
    report, _, _ = _search(model, groups, BUDGET, limits=limits)
    assert report["meets_budget"] and "/enc/layer.17/p6/MatMul" in report["kept_fp32_nodes"]
    assert BUDGET.met(independent_fidelity(model, report["kept_fp32_nodes"]))
    assert len(report["kept_fp32_nodes"]) <= 7, "the merged block was split back to layer 17 or less"
    assert report["timing"]["builds"] <= 1 + 8 + 2 * 4 + 10 + 1
    assert len(report["sensitivity"]) == 8


def test_refinement_stops_at_the_cost_bound():
    groups = _layers(6)
    loud = {"/enc/layer.3/p5/MatMul": 0.5, "/enc/layer.1/p2/MatMul": 0.3}
    model = SimulatedModel([20] * 12, _amplitudes(groups, loud=loud))
    report, _, _ = _search(model, groups, BUDGET, limits=SearchLimits(max_refine=20, max_cost=1e-9))
    assert report["refine_trials"] == 0 and report["meets_budget"]
    assert set(report["kept_fp32"]) == {"layer 1", "layer 3"} and len(report["kept_fp32_nodes"]) == 12


class RecordingBar:
    made: list[RecordingBar] = []

    def __init__(self, total=None, desc=None, **kw):
        self.total, self.desc, self.n, self.file, self.closed = total, desc, 0, kw.get("file"), False
        RecordingBar.made.append(self)

    def update(self, k=1):
        self.n += k

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text

    def refresh(self):
        pass

    def close(self):
        self.closed = True

    def write(self, message, file=None):
        pass


@pytest.fixture
def bars(monkeypatch):
    import tqdm.auto

    RecordingBar.made = []
    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    return RecordingBar.made


def test_progress_bar_only_on_a_terminal_and_never_when_quiet(bars, monkeypatch):
    import sys

    groups = _layers(3)
    loud = {"/enc/layer.1/p0/MatMul": 0.6}
    for progress, terminal in ((False, True), (None, False)):  # --quiet on a terminal; a log file
        monkeypatch.setattr("memrerank.progress.on_terminal", lambda t=terminal: t)
        _search(SimulatedModel([20] * 4, _amplitudes(groups, loud=loud)), groups, BUDGET, progress=progress)
        assert bars == []
    monkeypatch.setattr("memrerank.progress.on_terminal", lambda: True)
    report, _, _ = _search(SimulatedModel([20] * 4, _amplitudes(groups, loud=loud)), groups, BUDGET,
                           progress=None)
    (bar,) = bars
    assert bar.desc == "sensitivity search" and bar.file is sys.stderr and bar.closed
    assert bar.n == report["timing"]["evaluations"] == bar.total, "one tick per candidate graph"


def test_export_shows_the_search_bar_and_records_its_steps(bars, monkeypatch, tmp_path, bert_ckpt):
    from memrerank.export import export_model

    monkeypatch.setattr("memrerank.progress.on_terminal", lambda: True)
    logs: list[str] = []
    out = export_model(str(bert_ckpt), tmp_path / "strict", precisions=["fp32", "int8"], max_length=64,
                       fidelity="top10=1.0,spearman=0.99999", log=logs.append, progress=None)
    assert [b.desc for b in bars] == ["export bert-tiny", "int8 search"]
    assert all(b.closed for b in bars)
    manifest = json.loads((out / "manifest.json").read_text())
    timing = manifest["precisions"]["int8"]["fidelity"]["timing"]
    assert {"plain", "sensitivity", "keep", "fp32_reference_once"} <= set(timing)
    assert timing["builds"] >= 3 and timing["total"] <= manifest["export"]["step_seconds"]["int8"]
    assert bars[1].n == timing["evaluations"]


def test_stratified_groups_spread_over_the_damage_and_respect_the_bound():
    damage = [0.1 * (i % 7) for i in range(40)]
    sizes = [30] * 40
    chosen = stratified_groups(damage, sizes, 320)
    assert len(chosen) == 10 and sum(sizes[g] for g in chosen) <= 320
    picked = sorted(damage[g] for g in chosen)
    assert picked[0] == min(damage) and picked[-1] == max(damage)
    assert stratified_groups(damage, [500] * 40, 320) != []  # one group even when it alone is too big


def test_limits_are_checked():
    for bad in ({"max_pairs": 0}, {"probe_pairs": 0}, {"max_blocks": 0}, {"max_refine": -1}, {"max_cost": 0}):
        with pytest.raises(ValueError, match="SearchLimits needs"):
            SearchLimits(**bad)


def test_the_keep_guess_scales_the_plain_shortfall_by_the_damage_left():
    from memrerank.export.fidelity import _predicted_keep

    plain = {"spearman_mean": 0.9, "top10_overlap": 1.0}
    budget = FidelityBudget(top10=0.95, spearman=0.99)
    # damage left quantized after keeping k blocks: 1.0, 0.5, 0.2, 0.1 (of 1.0); the shortfall 0.1 must shrink
    # to 0.01, so 0.1 of the damage may stay: k = 3
    assert _predicted_keep([0.5, 0.3, 0.1, 0.1], plain, budget) == 3
    assert _predicted_keep([0.5, 0.3, 0.1, 0.1], plain, FidelityBudget(top10=0.95, spearman=0.0)) == 1
    assert _predicted_keep([0.0, 0.0], plain, budget) == 1


def test_a_graph_without_layer_names_is_cut_into_runs_of_products():
    """An exporter that drops the layer scopes (``/q_proj_12/MatMul``) puts every product in one group: the
    search cuts it into runs in graph order so the sensitivity still tells the layers apart."""
    names = [f"/{m}{'' if i == 0 else f'_{i}'}/MatMul" for i in range(12)
             for m in ("q_proj", "k_proj", "mlp/up_proj")]
    groups = {"other": names, "embeddings": ["/embed_tokens/Gather"]}
    loud = {"/k_proj_9/MatMul": 0.6}
    model = SimulatedModel([20] * 8, _amplitudes(groups, base=0.002, loud=loud))
    report, _, _ = _search(model, groups, BUDGET, limits=SearchLimits(max_cost=math.inf))
    # 36 products in 7 runs (8 blocks less the embeddings): 6, 5, 5, 5, 5, 5, 5; /k_proj_9 is product 28
    assert len(report["sensitivity"]) == 8 and "other [31-35]" in report["sensitivity"]
    assert list(report["sensitivity"])[0] == "other [26-30]", "the run holding layer 9's k_proj is the loudest"
    assert report["meets_budget"] and BUDGET.met(independent_fidelity(model, report["kept_fp32_nodes"]))
    assert "/k_proj_9/MatMul" in report["kept_fp32_nodes"] and len(report["kept_fp32_nodes"]) <= 3
    assert report["kept_fp32"] == ["other [26-30]"]


def test_a_decoder_calibration_set_scores_as_the_runtime_does(qwen_artifact, bert_artifact):
    """A prefix-reuse decoder's calibration pairs are scored through the shared prefix, as ``Reranker`` scores
    them by default: the same logits as ``predict`` with reuse on, within 1e-5 of whole pairs, and the same
    values whether a group is scored whole, in pieces or among other groups. An encoder keeps whole pairs."""
    from memrerank import Reranker
    from memrerank.export.fidelity import CalibSet
    from memrerank.export.pairs import builtin_pairs

    groups = builtin_pairs()[:3]
    calib = CalibSet(qwen_artifact, groups, batch_size=4)
    assert calib.prefix_reuse
    pairs = [(q, d) for q, docs in groups for d in docs]
    reuse = Reranker.load(qwen_artifact, "fp32", prefix_reuse=True).predict(pairs, raw=True)
    whole = Reranker.load(qwen_artifact, "fp32", prefix_reuse=False).predict(pairs, raw=True)
    np.testing.assert_allclose(calib.reference, reuse, atol=1e-6, rtol=0)
    np.testing.assert_allclose(calib.reference, whole, atol=1e-5, rtol=0)
    graph = qwen_artifact / "fp32" / "model.onnx"
    g1 = calib.group_rows[1]
    pieces = [g1[::2], calib.group_rows[0], g1[1::2]]  # a group split across units, another in between
    got = calib.score(graph, pieces)
    scored = np.concatenate(pieces)
    np.testing.assert_allclose(got[scored], calib.reference[scored], atol=1e-6, rtol=0)
    assert np.isnan(np.delete(got, scored)).all(), "rows not asked for stay unscored"
    assert calib.last_timing[0] > 0 and calib.last_timing[1] > 0
    stopped = calib.score(graph, [calib.group_rows[0], calib.group_rows[2]], stop=lambda done: done >= 1)
    assert stopped is None
    assert not CalibSet(bert_artifact, groups).prefix_reuse


def test_layers_of_a_graph_whose_exporter_dropped_the_module_scopes(tmp_path):
    """At real decoder size the exporter names products ``/q_proj/MatMul``, ``/q_proj_1/MatMul``…: the repeat
    index is the layer, so the search's blocks are layers, not one ``other`` group of everything."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from memrerank.export.quantize import graph_info

    names = [f"/{m}{'' if i == 0 else f'_{i}'}/MatMul" for i in range(3) for m in ("q_proj", "mlp/down_proj")]
    names.append("/pooler/MatMul")  # occurs once: not a layer
    nodes, inits, x = [], [], "x"
    for k, name in enumerate(names):
        inits.append(numpy_helper.from_array(np.eye(4, dtype=np.float32), f"w{k}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{k}"], [f"h{k}"], name=name))
        x = f"h{k}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4])], inits)
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    info = graph_info(tmp_path / "m.onnx")
    body = {g: v for g, v in info.groups.items() if g != "embeddings"}
    assert {g: v for g, v in body.items() if g.startswith("layer")} == {
        "layer 0": ["/q_proj/MatMul", "/mlp/down_proj/MatMul"],
        "layer 1": ["/q_proj_1/MatMul", "/mlp/down_proj_1/MatMul"],
        "layer 2": ["/q_proj_2/MatMul", "/mlp/down_proj_2/MatMul"]}
    assert "/pooler/MatMul" not in {n for g, v in body.items() if g.startswith("layer") for n in v}
