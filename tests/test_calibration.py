"""Calibration: fits recover known parameters, metrics match hand computation, manifest round-trip."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from memrerank import LoadOptions, Reranker
from memrerank.calibration import Calibrator, sigmoid
from memrerank.calibration.fit import fit_platt, fit_temperature, informative_p_value, log_loss, platt_targets
from memrerank.calibration.metrics import brier, decision_agreement, ece
from memrerank.calibrate import CALIBRATION_METHODS, CalibrationRefusedError, calibrate_artifact
from memrerank.cli import main


def _synthetic(temperature=2.5, bias=0.0, n=40_000, seed=0):
    """Logits whose true probability is sigmoid(logit / T + b): labels drawn from that calibrated model."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 4, n)
    y = (rng.random(n) < sigmoid(z / temperature + bias)).astype(float)
    return z, y


def test_temperature_fit_recovers_known_temperature():
    z, y = _synthetic(2.5)
    assert fit_temperature(z, y) == pytest.approx(2.5, rel=0.03)


def test_platt_fit_recovers_slope_and_bias():
    z, y = _synthetic(2.0, bias=-1.5, seed=1)
    a, b = fit_platt(z, y)
    assert a == pytest.approx(0.5, rel=0.04) and b == pytest.approx(-1.5, abs=0.06)


def test_platt_slope_stays_positive_on_anti_correlated_data():
    z = np.linspace(-3, 3, 200)
    y = (z < 0).astype(float)  # the model ranks backwards
    a, _ = fit_platt(z, y)
    assert a > 0
    assert fit_temperature(z, y) > 0


def test_soft_targets_fit_the_teacher():
    z = np.linspace(-6, 6, 101)
    teacher = sigmoid(0.8 * z + 0.3)
    a, b = fit_platt(z, teacher)
    assert (a, b) == pytest.approx((0.8, 0.3), abs=1e-6)


def test_metrics_hand_computed():
    p = np.array([0.1, 0.2, 0.8, 0.9])
    y = np.array([0.0, 1.0, 1.0, 1.0])
    # 15 bins: 0.1 -> bin 1, 0.2 -> bin 3, 0.8 -> bin 12, 0.9 -> bin 13: each alone
    # ECE = (|0-0.1| + |1-0.2| + |1-0.8| + |1-0.9|) / 4 = (0.1 + 0.8 + 0.2 + 0.1) / 4 = 0.3
    assert ece(p, y) == pytest.approx(0.3)
    assert ece(np.array([0.2, 0.2]), np.array([0.0, 1.0])) == pytest.approx(0.3)  # one bin: |0.5 - 0.2|
    assert brier(p, y) == pytest.approx((0.01 + 0.64 + 0.04 + 0.01) / 4)
    assert log_loss(np.array([0.5]), np.array([1.0])) == pytest.approx(np.log(2))
    assert decision_agreement(np.array([0.2, 0.6, 0.8]), np.array([0.4, 0.4, 0.9])) == \
        pytest.approx({"0.3": 2 / 3, "0.5": 2 / 3, "0.7": 1.0})


def test_bad_targets_are_rejected():
    with pytest.raises(ValueError, match="targets"):
        fit_temperature(np.array([1.0, 2.0]), np.array([0.0, 2.0]))
    with pytest.raises(ValueError, match="as many"):
        fit_platt(np.array([1.0]), np.array([0.0, 1.0]))


WORDS = ["cat", "tea", "Lisbon", "climbing", "passport", "piano", "river", "Marco", "birthday", "cabin", "peanut",
         "train", "doctor", "garden", "wifi"]


def _labelled_jsonl(reranker, path, n_queries=60, seed=0, temperature=0.5, bias=-1.0):
    rng = np.random.default_rng(seed)
    rows = []
    for qi in range(n_queries):
        q = f"what about the {rng.choice(WORDS)} and the {rng.choice(WORDS)}?"
        docs = [" ".join(rng.choice(WORDS, rng.integers(2, 9))) for _ in range(8)]
        z = reranker.predict([(q, d) for d in docs], raw=True)
        # labels from a calibrated model (by default at temperature 0.5 with bias -1) on the artifact's own logits
        y = rng.random(len(docs)) < sigmoid(z / temperature + bias)
        rows += [{"query": q, "document": d, "label": int(l)} for d, l in zip(docs, y)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_calibrate_labels_mode_roundtrip(minilm_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(minilm_artifact, art)
    data = _labelled_jsonl(Reranker.load(art), tmp_path / "pairs.jsonl")
    rep = calibrate_artifact(art, data, method="platt", holdout=0.3, log=lambda m: None)
    r = rep["precisions"]["fp32"]
    assert r["after"]["log_loss"] < r["before"]["log_loss"] and r["beats_base_rate"] and r["beats_uncalibrated"]
    m = json.loads((art / "manifest.json").read_text())["calibration"]["fp32"]
    assert m["method"] == "platt" and m["params"]["a"] > 0 and m["mode"] == "labels"
    # the runtime applies exactly what the manifest records; raw logits are untouched; ranking unchanged
    rer = Reranker.load(art)
    pairs = [("q", "first memory"), ("q", "second one"), ("q", "")]
    z = rer.predict(pairs, raw=True)
    np.testing.assert_allclose(rer.predict(pairs), sigmoid(m["params"]["a"] * z + m["params"]["b"]), atol=1e-6)
    hits = rer.rank("q", ["first memory", "second one", ""])
    assert [h.index for h in hits] == list(np.argsort(-z, kind="stable"))
    cut = hits[0].score
    assert [h.index for h in rer.rank("q", ["first memory", "second one", ""], threshold=cut)] == [hits[0].index]


def _stretched_precision(art, name, scale, shift):
    """Register, as ``name``, the fp32 graph with its logit stretched and shifted (what quantization does to a
    threshold), so teacher calibration has a known answer: a = 1/scale, b = -shift/scale."""
    import onnx
    from onnx import helper, numpy_helper

    from memrerank.manifest import sha256_file

    model = onnx.load(str(art / "fp32" / "model.onnx"))
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [o if o != out else "raw_logits" for o in node.output]
    model.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), "s"),
                                    numpy_helper.from_array(np.array(shift, np.float32), "t")])
    model.graph.node.extend([helper.make_node("Mul", ["raw_logits", "s"], ["scaled"]),
                             helper.make_node("Add", ["scaled", "t"], [out])])
    (art / name).mkdir()
    onnx.save(model, str(art / name / "model.onnx"))
    m = json.loads((art / "manifest.json").read_text())
    rel = f"{name}/model.onnx"
    m["precisions"][name] = {**m["precisions"]["fp32"], "graph": rel, "files": {rel: {
        "sha256": sha256_file(art / rel), "bytes": (art / rel).stat().st_size}}}
    (art / "manifest.json").write_text(json.dumps(m))


def test_calibrate_teacher_mode_aligns_a_stretched_precision_with_fp32(minilm_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(minilm_artifact, art)
    _stretched_precision(art, "int8", scale=1.7, shift=0.8)
    data = tmp_path / "unlabelled.jsonl"
    rng = np.random.default_rng(3)
    words = ["cat", "tea", "Lisbon", "climbing", "passport", "piano", "river", "Marco", "birthday", "cabin"]
    data.write_text("\n".join(json.dumps({"query": f"what about {words[i % 10]}?",
                                          "document": " ".join(rng.choice(words, 6))}) for i in range(300)))
    rep = calibrate_artifact(art, data, method="platt", precisions=["int8"], log=lambda m: None)
    assert rep["mode"] == "teacher" and list(rep["precisions"]) == ["int8"]
    r = rep["precisions"]["int8"]
    assert (r["params"]["a"], r["params"]["b"]) == pytest.approx((1 / 1.7, -0.8 / 1.7), abs=1e-3)
    assert r["agreement_vs_fp32"]["before"]["0.5"] < 0.99
    assert r["agreement_vs_fp32"]["after"] == {"0.3": 1.0, "0.5": 1.0, "0.7": 1.0}
    q = r["agreement_at_fp32_quantiles"]  # thresholds where fp32's held-out scores are: its 90/95/99th percentiles
    assert q["quantiles"] == [0.9, 0.95, 0.99] and q["thresholds"] == sorted(q["thresholds"])
    assert 0.0 < q["thresholds"][0] < 1.0 and q["after"] == [1.0, 1.0, 1.0]
    fp32, int8 = Reranker.load(art, "fp32"), Reranker.load(art, "int8")
    pairs = [("what about tea?", "tea cat river"), ("what about tea?", "piano cabin")]
    np.testing.assert_allclose(int8.predict(pairs), fp32.predict(pairs), atol=1e-3)


def test_cli_calibrate_and_info(minilm_artifact, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(minilm_artifact, art)
    assert main(["info", str(art)]) == 0
    assert "none: scores are sigmoid(logit)" in capsys.readouterr().out
    data = _labelled_jsonl(Reranker.load(art), tmp_path / "pairs.jsonl", n_queries=30, temperature=0.25, bias=0.0)
    assert main(["calibrate", str(art), "--data", str(data), "--method", "temperature"]) == 0
    assert "ece before → after" in capsys.readouterr().out
    assert main(["info", str(art)]) == 0
    out = capsys.readouterr().out
    assert "calibration fp32        temperature" in out and "labels mode" in out
    bad = tmp_path / "mixed.jsonl"
    bad.write_text('{"query":"q","document":"d","label":1}\n{"query":"q","document":"e"}\n')
    assert main(["calibrate", str(art), "--data", str(bad)]) == 2
    assert "labels mode" in capsys.readouterr().err


def test_calibrate_takes_one_load_options(minilm_artifact, tmp_path, capsys):
    """calibrate_artifact loads every precision with one LoadOptions (a dict or the old keywords are refused);
    the options change how pairs run, not the fit; the CLI's load flags and -q reach it."""
    art = tmp_path / "art"
    shutil.copytree(minilm_artifact, art)
    data = _labelled_jsonl(Reranker.load(art), tmp_path / "pairs.jsonl", n_queries=30, temperature=0.25, bias=0.0)
    with pytest.raises(TypeError, match="providers"):
        calibrate_artifact(art, data, providers=["cpu"])
    with pytest.raises(TypeError, match="LoadOptions"):
        calibrate_artifact(art, data, options={"threads": 1})
    quiet = {"method": "temperature", "log": lambda m: None}
    base = calibrate_artifact(art, data, **quiet)
    tuned = calibrate_artifact(art, data, options=LoadOptions(batch_size=2, max_batch_tokens=64, threads=1), **quiet)
    assert tuned["precisions"]["fp32"]["params"] == pytest.approx(base["precisions"]["fp32"]["params"], rel=1e-4)
    assert main(["calibrate", str(art), "--data", str(data), "--method", "temperature", "--batch-size", "2",
                 "-q", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and json.loads(captured.out)["precisions"]["fp32"]["params"] == pytest.approx(
        base["precisions"]["fp32"]["params"], rel=1e-4)


def test_uncalibrated_calibrator_is_sigmoid():
    z = np.array([-3.0, 0.0, 2.0])
    np.testing.assert_allclose(Calibrator.from_block(None)(z), sigmoid(z), atol=1e-7)


# --------------------------------------------------------------------------------- honest fits (issue 27)
def test_platt_targets_are_platts():
    """(N+ + 1) / (N+ + 2) for a positive, 1 / (N- + 2) for a negative (Platt 1999; scikit-learn's sigmoid)."""
    np.testing.assert_allclose(platt_targets(np.array([1, 1, 0, 0, 0])), [3 / 4, 3 / 4, 1 / 5, 1 / 5, 1 / 5])
    with pytest.raises(ValueError, match="0/1"):
        platt_targets(np.array([0.5, 1.0]))


def test_platt_fit_is_never_worse_than_the_base_rate():
    """Logits that hardly vary (as a tiny random model's do): the fit reaches at least the best constant, the
    base rate, with the slope at its floor."""
    rng = np.random.default_rng(0)
    z = 0.34 + rng.normal(0, 8e-4, 240)
    y = (rng.random(240) < 0.39).astype(float)
    a, b = fit_platt(z, y)
    assert 0 < a < 1e-6
    assert log_loss(sigmoid(a * z + b), y) <= log_loss(np.full(z.size, y.mean()), y) + 1e-12
    a, b = fit_platt(np.full(10, 2.0), np.array([1.0] * 3 + [0.0] * 7))  # constant scores: the bias alone
    assert a > 0 and sigmoid(np.array([a * 2.0 + b]))[0] == pytest.approx(0.3)


def test_informative_p_value_tells_information_from_none():
    z = np.linspace(-3, 3, 200)
    twice, both = np.concatenate([z, z]), np.concatenate([np.ones(200), np.zeros(200)])
    assert informative_p_value(twice, both) == 1.0  # every score once with each label
    assert informative_p_value(z, (z < 0).astype(float)) == 1.0  # ranked backwards: none a calibration can use
    assert informative_p_value(*_synthetic(2.5, n=400)) < 1e-6
    rng = np.random.default_rng(1)  # under no information, p < 0.05 about 5 % of the time
    ps = [informative_p_value(rng.normal(0, 3, 200), (rng.random(200) < 0.3).astype(float)) for _ in range(200)]
    assert 0.01 <= np.mean(np.array(ps) < 0.05) <= 0.12


def _scored_pairs(reranker, n_queries=40, seed=0):
    """(query, document, logit) rows from the artifact's own scores."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_queries):
        q = f"what about the {rng.choice(WORDS)} and the {rng.choice(WORDS)}?"
        docs = [" ".join(rng.choice(WORDS, rng.integers(2, 9))) for _ in range(8)]
        rows += zip([q] * len(docs), docs, reranker.predict([(q, d) for d in docs], raw=True))
    return rows


def _write_pairs(path, rows):
    path.write_text("\n".join(json.dumps({"query": q, "document": d, "label": int(y)}) for q, d, y in rows))
    return path


def test_one_label_only_is_refused_and_nothing_is_written(minilm_artifact, tmp_path, capsys):
    """All-positive pairs used to give T = 0.0115 (every score 1.0), written silently."""
    art = tmp_path / "art"
    shutil.copytree(minilm_artifact, art)
    before = (art / "manifest.json").read_bytes()
    data = _write_pairs(tmp_path / "positives.jsonl", [(q, d, 1) for q, d, _ in _scored_pairs(Reranker.load(art))])
    for method in CALIBRATION_METHODS:
        with pytest.raises(CalibrationRefusedError,
                           match=r"needs both labels, at least 5 pairs of each .* \d+ labelled 1 and 0 labelled 0"):
            calibrate_artifact(art, data, method=method, log=lambda m: None)
    assert main(["calibrate", str(art), "--data", str(data)]) == 2
    assert "add pairs the model should score low" in capsys.readouterr().err.lower()
    assert (art / "manifest.json").read_bytes() == before


def test_uninformative_scores_are_refused_and_nothing_is_written(minilm_artifact, tmp_path, capsys):
    """Every pair once labelled 1 and once 0: the scores say nothing about the labels. This used to give
    T = 1.7e10 (every score 0.5), written silently."""
    art = tmp_path / "art"
    shutil.copytree(minilm_artifact, art)
    before = (art / "manifest.json").read_bytes()
    rows = _scored_pairs(Reranker.load(art))
    data = _write_pairs(tmp_path / "coin.jsonl", [(q, d, y) for q, d, _ in rows for y in (0, 1)])
    for method in CALIBRATION_METHODS:
        with pytest.raises(CalibrationRefusedError, match=r"fp32: the scores carry no information about these "
                                                          r"labels.*p = 1.*none was written"):
            calibrate_artifact(art, data, method=method, log=lambda m: None)
    assert main(["calibrate", str(art), "--data", str(data)]) == 2
    assert "carry no information" in capsys.readouterr().err
    assert (art / "manifest.json").read_bytes() == before


def test_teacher_mode_refuses_a_precision_whose_scores_do_not_vary(minilm_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(minilm_artifact, art)
    _stretched_precision(art, "int8", scale=0.0, shift=0.5)  # every int8 logit is 0.5
    before = (art / "manifest.json").read_bytes()
    data = tmp_path / "unlabelled.jsonl"
    data.write_text("\n".join(json.dumps({"query": q, "document": d}) for q, d, _ in
                              _scored_pairs(Reranker.load(art), n_queries=20)))
    with pytest.raises(CalibrationRefusedError, match=r"int8: .*(out of bounds|maps the middle 90 %).*hardly vary"):
        calibrate_artifact(art, data, method="platt", precisions=["int8"], log=lambda m: None)
    assert (art / "manifest.json").read_bytes() == before


def test_separable_labels_are_regularised_and_recorded(minilm_artifact, tmp_path, capsys):
    """Labels that the scores separate (every 1 above every 0): the bare labels' fit has no finite slope (it
    used to write a = 3,908); Platt's targets hold it finite, and the record and the output say so."""
    art = tmp_path / "art"
    shutil.copytree(minilm_artifact, art)
    rows = _scored_pairs(Reranker.load(art))
    cut = float(np.median([z for _, _, z in rows]))
    data = _write_pairs(tmp_path / "separable.jsonl", [(q, d, z > cut) for q, d, z in rows])
    notes: list[str] = []
    rep = calibrate_artifact(art, data, method="platt", log=notes.append)
    r = rep["precisions"]["fp32"]
    assert r["fit"]["separable"] is True and r["fit"]["regularisation"] == "platt-targets"
    z = np.array([z for _, _, z in rows], dtype=np.float64)
    y = (z > cut).astype(float)
    bare = fit_platt(z, y)[0]
    assert bare > 100, "the bare labels' fit runs off (what this test guards against)"
    assert 0 < r["params"]["a"] < bare / 5
    assert 0.05 < Reranker.load(art).calibrator(np.array([cut]))[0] < 0.95, "scores near the cut stay uncertain"
    assert any("separate these labels" in n and "regularised" in n for n in notes)
    record = json.loads((art / "manifest.json").read_text())["calibration"]["fp32"]
    assert record["separable"] is True and record["regularisation"] == "platt-targets"
    assert main(["calibrate", str(art), "--data", str(data), "--method", "platt", "-q"]) == 0
    assert "separate these labels" in capsys.readouterr().out


def test_the_fit_records_and_prints_its_held_out_ece_and_sizes(minilm_artifact, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(minilm_artifact, art)
    data = _labelled_jsonl(Reranker.load(art), tmp_path / "pairs.jsonl", n_queries=30)
    assert main(["calibrate", str(art), "--data", str(data), "--method", "platt", "-q"]) == 0
    out = capsys.readouterr().out
    record = json.loads((art / "manifest.json").read_text())["calibration"]["fp32"]
    held, train = record["held_out"], record["train"]
    assert held["pairs"] + train["pairs"] == record["data_size"] == 240
    assert train["positives"] + train["negatives"] == train["pairs"] and min(train["positives"],
                                                                            train["negatives"]) >= 5
    assert held["ece"] == pytest.approx(record["metrics"]["after"]["ece"]) and 0 <= held["ece"] <= 1
    assert record["informative_p_value"] < 0.05 and record["separable"] is False
    assert (f"held-out ECE {held['ece']:.4f} on {held['pairs']} pairs; fitted on {train['pairs']} pairs "
            f"({train['positives']} labelled 1, {train['negatives']} labelled 0)") in out
    assert main(["info", str(art)]) == 0
    assert f"held-out ECE {held['ece']:.4f} on {held['pairs']} pairs" in capsys.readouterr().out
