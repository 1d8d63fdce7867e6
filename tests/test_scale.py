"""memrerank.scale on a real local Ray instance (2 CPUs): Ray Data re-scoring and the Ray Serve deployment."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from memrerank import LoadOptions, Reranker  # noqa: E402
from memrerank.scale import RescoreError, RescoreJob, rescore, shared_block_rows  # noqa: E402
from texts import DOCS  # noqa: E402

#: Scores written by the Ray job vs the same artifact scored in-process (fp32; batch composition differs).
RAY_FP32_ATOL = 1e-5
FP32 = LoadOptions("fp32")

QUERIES = ["Who painted the portrait?", "When is the dentist appointment?", "What does Ana's sister study?",
           "Wo wohnt Jonas? 住在哪里?"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    yield
    ray.shutdown()


def _rows(n: int) -> list[dict]:
    """Pairs grouped by query, as memory stores list them, with an extra column that must come back untouched."""
    return [{"id": f"m{i:04d}", "query": QUERIES[(i // 9) % len(QUERIES)], "document": DOCS[i % len(DOCS)],
             "label": i % 3} for i in range(n)]


def _read_output(out: Path) -> list[dict]:
    rows = []
    for f in sorted(out.iterdir()):
        if f.suffix == ".parquet":
            rows += pq.read_table(f).to_pylist()
        elif f.suffix == ".json":
            rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


@pytest.mark.parametrize("artifact_fixture", ["bert_artifact", "qwen_artifact"])
def test_rescore_jsonl_with_two_actors_keeps_ids(local_ray, tmp_path, request, artifact_fixture):
    artifact = request.getfixturevalue(artifact_fixture)
    rows = _rows(150)
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    instruction = "Find the memory that answers the question" if artifact_fixture == "qwen_artifact" else None
    report = rescore(RescoreJob(src, tmp_path / "out", artifact, FP32, actors=2, block_rows=32,
                                instruction=instruction))
    assert report.rows == len(rows) and report.actors == 2 and report.output_format == "jsonl"
    got = _read_output(tmp_path / "out")
    assert sorted(r["id"] for r in got) == [r["id"] for r in rows]  # every id once: nothing lost or doubled
    assert set(got[0]) == {"id", "label", "score", "logit", "truncated"}  # texts not written back by default
    ref = Reranker.load(artifact, "fp32")
    want_logit = dict(zip((r["id"] for r in rows), ref.predict([(r["query"], r["document"]) for r in rows],
                                                                raw=True, instruction=instruction)))
    if instruction is not None:  # the instruction reached the actors: default-instruction scores differ
        default = ref.predict([(r["query"], r["document"]) for r in rows[:5]], raw=True)
        assert not np.allclose(default, [want_logit[r["id"]] for r in rows[:5]], atol=1e-4)
    by_id = {r["id"]: r for r in rows}
    for r in got:
        assert r["label"] == by_id[r["id"]]["label"]
        assert r["logit"] == pytest.approx(float(want_logit[r["id"]]), abs=RAY_FP32_ATOL)
        assert r["score"] == pytest.approx(float(ref.calibrator(np.float32([r["logit"]]))[0]), abs=1e-6)


def test_small_input_is_shared_by_every_actor(local_ray, tmp_path, bert_artifact):
    # 240 rows at the default 256 per batch were one batch, so a second actor sat idle (the 0.6B scale bench
    # measured 2 actors at 0.99x one): the batch is capped at ceil(rows / actors)
    cases = [(240, 2, 256), (41, 2, 256), (1000, 2, 256), (1, 4, 8)]
    assert [shared_block_rows(r, a, b) for r, a, b in cases] == [120, 21, 256, 1]
    rows = _rows(41)
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    two = rescore(RescoreJob(src, tmp_path / "two", bert_artifact, FP32, actors=2))
    one = rescore(RescoreJob(src, tmp_path / "one", bert_artifact, FP32, actors=1))
    assert (two.block_rows, one.block_rows) == (21, 256)
    got = {r["id"]: r["logit"] for r in _read_output(tmp_path / "two")}
    assert sorted(got) == [r["id"] for r in rows]
    for r in _read_output(tmp_path / "one"):
        assert got[r["id"]] == pytest.approx(r["logit"], abs=RAY_FP32_ATOL)


def test_rescore_parquet_keep_text_and_prefix(local_ray, tmp_path, bert_artifact):
    rows = [{**r, "score": 0.5} for r in _rows(40)]  # an earlier run's scores: must not be overwritten
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:25]), src / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[25:]), src / "b.parquet")
    with pytest.raises(ValueError, match="output_prefix"):
        rescore(src, tmp_path / "clash", bert_artifact, options=FP32)
    report = rescore(src, tmp_path / "out", bert_artifact, options=FP32.replace(threads=2), actors=1,
                     keep_text=True, output_prefix="new_")
    assert report.rows == 40 and report.output_format == "parquet" and report.threads == 2
    got = {r["id"]: r for r in _read_output(tmp_path / "out")}
    assert set(got) == {r["id"] for r in rows}
    ref = Reranker.load(bert_artifact, "fp32")
    for r in rows:
        g = got[r["id"]]
        assert g["query"] == r["query"] and g["document"] == r["document"] and g["score"] == 0.5
        assert g["new_logit"] == pytest.approx(float(ref.predict([(r["query"], r["document"])], raw=True)[0]),
                                               abs=RAY_FP32_ATOL)
    # the same output again: refused unless force=True, which replaces (not appends)
    with pytest.raises(FileExistsError, match=r"force=True \(--force\)"):
        rescore(src, tmp_path / "out", bert_artifact, options=FP32, output_prefix="new_")
    again = rescore(src, tmp_path / "out", bert_artifact, options=FP32, output_prefix="new_", force=True)
    assert again.rows == 40 and len(_read_output(tmp_path / "out")) == 40


def test_rescore_input_errors_are_clear(local_ray, tmp_path, bert_artifact):
    src = tmp_path / "pairs.jsonl"
    src.write_text(json.dumps({"key": 1, "question": "q", "text": "d"}) + "\n")
    with pytest.raises(ValueError, match=r"no column 'id', 'query', 'document'; it has key, question, text"):
        rescore(src, tmp_path / "o1", bert_artifact)
    with pytest.raises(ValueError, match=r"LoadOptions\.precision: unknown 'int3'"):
        rescore(src, tmp_path / "o2", bert_artifact, options=LoadOptions("int3"))
    with pytest.raises(ValueError, match="actors must be a positive integer"):
        rescore(src, tmp_path / "o3", bert_artifact, actors=0)
    with pytest.raises(TypeError, match="on the RescoreJob"):  # one job, its fields inside it
        rescore(RescoreJob(src, tmp_path / "o3", bert_artifact), actors=2)
    with pytest.raises(FileNotFoundError):
        rescore(tmp_path / "missing.jsonl", tmp_path / "o4", bert_artifact)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="input_format"):
        rescore(tmp_path / "notes.txt", tmp_path / "o5", bert_artifact)
    # renamed columns work; a null document names its row
    report = rescore(src, tmp_path / "o6", bert_artifact, options=FP32, id_column="key", query_column="question",
                     document_column="text")
    assert report.rows == 1 and _read_output(tmp_path / "o6")[0]["key"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "ok", "query": "q", "document": "d"}) + "\n"
                   + json.dumps({"id": "broken", "query": "q", "document": None}) + "\n")
    with pytest.raises(RescoreError, match=r"ValueError: row id='broken': column 'document' is NoneType"):
        rescore(bad, tmp_path / "o7", bert_artifact, options=FP32)
    assert not (tmp_path / "o7").exists() and not list(tmp_path.glob(".o7.*"))  # nothing committed: nothing left


def test_rescore_cli(local_ray, tmp_path, bert_artifact, capsys):
    from memrerank.cli import main

    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows(12)))
    assert main(["rescore", str(bert_artifact), str(src), "-o", str(tmp_path / "out"), "--precision", "fp32",
                 "--output-format", "parquet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 12
    assert sorted(r["id"] for r in _read_output(tmp_path / "out")) == [r["id"] for r in _rows(12)]
    assert main(["rescore", str(bert_artifact), str(src), "-o", str(tmp_path / "out")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["rescore", str(bert_artifact), str(src), "-o", str(tmp_path / "o2"), "--actors", "3"]) == 2
    assert "need 3 CPUs; the Ray cluster has 2" in capsys.readouterr().err


# --------------------------------------------------------------------------- exactly once, resumably
def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _resume_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.resume-*"))


def _beside(out: Path) -> list[str]:
    """What a job left beside ``out`` (staging directories, locks)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_rescore_ids_must_be_present_and_unique(local_ray, tmp_path, bert_artifact):
    """A duplicated id and a null id were both written and the job reported success: now each is refused up
    front, naming them, unless allow_duplicate_ids=True (then every row is still written, and counted)."""
    rows = _rows(6)
    rows[3]["id"] = rows[1]["id"]
    rows[5]["id"] = None
    src = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"1 row\(s\) with a null or missing 'id'.*--allow-duplicate-ids"):
        rescore(src, out, bert_artifact, options=FP32)
    rows[5]["id"] = "m9999"
    _write_jsonl(src, rows)
    with pytest.raises(ValueError, match=r"1 duplicate 'id' value\(s\): 'm0001' \(2 rows\)"):
        rescore(src, out, bert_artifact, options=FP32)
    assert not out.exists() and _beside(out) == []
    rows[5]["id"] = None
    _write_jsonl(src, rows)
    report = rescore(src, out, bert_artifact, options=FP32, allow_duplicate_ids=True)
    got = [r["id"] for r in _read_output(out)]
    assert report.rows == 6 and sorted(got, key=str) == sorted((r["id"] for r in rows), key=str)
    with pytest.raises(ValueError, match="needs unique ids"):
        RescoreJob(src, out, bert_artifact, resume=True, allow_duplicate_ids=True)


def test_rescore_fails_when_rows_out_differ_from_rows_in(local_ray, tmp_path, bert_artifact, monkeypatch):
    """Rows in and rows out were never compared: a block lost between scoring and the swap now fails the job
    with both counts, and nothing is written."""
    from memrerank import scale

    src = _write_jsonl(tmp_path / "pairs.jsonl", _rows(60))
    out = tmp_path / "out"
    lost = []

    def lose_a_block(point: str) -> None:
        if point == "verify":
            (staging,) = _resume_dirs(out)
            part = min(staging.glob("part-*"))
            lost.append(len(part.read_text().splitlines()))
            part.unlink()

    monkeypatch.setattr(scale, "_FAULT", lose_a_block)
    with pytest.raises(RescoreError, match=r"rows in 60, rows out \d+: .*exactly once; nothing was written"):
        rescore(src, out, bert_artifact, options=FP32, block_rows=16)
    assert lost and lost[0] > 0
    assert not out.exists() and _beside(out) == []


def test_interrupted_rescore_resumes_scoring_only_the_missing_rows(local_ray, tmp_path, bert_artifact,
                                                                   monkeypatch):
    """Interrupted once its first block is committed (Ctrl-C in the driver), the committed blocks stay beside
    OUT; the next start refuses to silently redo or drop them; a resume with other input or settings is
    refused; --resume scores only the rest, and the result is every id once with a clean run's scores."""
    from memrerank import scale

    rows = _rows(1200)
    src = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    rescore(src, tmp_path / "clean", bert_artifact, options=FP32, block_rows=16)
    clean = {r["id"]: r for r in _read_output(tmp_path / "clean")}
    out = tmp_path / "out"

    def interrupt(point: str) -> None:
        if point == "block":
            raise KeyboardInterrupt

    monkeypatch.setattr(scale, "_FAULT", interrupt)
    with pytest.raises(KeyboardInterrupt):
        rescore(src, out, bert_artifact, options=FP32, block_rows=16)
    monkeypatch.setattr(scale, "_FAULT", None)
    assert not out.exists()
    (staging,) = _resume_dirs(out)
    committed = {r["id"]: r for r in _read_output(staging)}
    assert 16 <= len(committed) < len(rows)

    with pytest.raises(FileExistsError, match=r"committed block\(s\).*--resume.*--force"):
        rescore(src, out, bert_artifact, options=FP32)
    with pytest.raises(ValueError, match=r"other input or settings \(keep_text False -> True\)"):
        rescore(src, out, bert_artifact, options=FP32, resume=True, keep_text=True)
    stat = src.stat()
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match=rf"other input or settings \(input {src} changed\)"):
        rescore(src, out, bert_artifact, options=FP32, resume=True)
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    report = rescore(src, out, bert_artifact, options=FP32, block_rows=16, resume=True, actors=2)
    assert report.rows == len(rows) and report.resumed >= len(committed)  # and what a straggler added before
    got = _read_output(out)
    assert sorted(r["id"] for r in got) == [r["id"] for r in rows]  # every id exactly once
    for r in got:
        assert r["label"] == clean[r["id"]]["label"]
        assert r["logit"] == pytest.approx(clean[r["id"]]["logit"], abs=RAY_FP32_ATOL)
        if r["id"] in committed:  # kept as committed, not scored again
            assert r == committed[r["id"]]
    assert _beside(out) == []


KILL_SCRIPT = """
import sys
from memrerank import LoadOptions
from memrerank.scale import rescore
rescore(sys.argv[1], sys.argv[2], sys.argv[3], options=LoadOptions("fp32"), block_rows=16, address=sys.argv[4])
"""


def test_rescore_killed_mid_job_resumes_to_every_id_exactly_once(local_ray, tmp_path, bert_artifact):
    """`rescore` killed with SIGKILL (a real driver process, on this Ray instance) once some blocks are
    committed: everything was lost before. Now the committed blocks survive and `--resume` scores only the
    missing rows; every id is written exactly once, with the scores of a clean run."""
    rows = _rows(2400)
    src = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(src), str(out), str(bert_artifact), address])
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            staging = _resume_dirs(out)
            if staging and len(list(staging[0].glob("part-*"))) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    (staging,) = _resume_dirs(out)
    committed = {r["id"] for r in _read_output(staging)}
    assert 3 * 16 <= len(committed) < len(rows)

    report = rescore(src, out, bert_artifact, options=FP32, block_rows=16, resume=True)
    assert report.resumed >= len(committed) and report.rows == len(rows)
    got = _read_output(out)
    assert sorted(r["id"] for r in got) == [r["id"] for r in rows]  # every id exactly once
    rescore(src, tmp_path / "clean", bert_artifact, options=FP32, block_rows=16)
    clean = {r["id"]: r["logit"] for r in _read_output(tmp_path / "clean")}
    for r in got:
        assert r["logit"] == pytest.approx(clean[r["id"]], abs=RAY_FP32_ATOL)
    assert _beside(out) == []


def test_rescore_never_clobbers_an_output_that_appeared_meanwhile(local_ray, tmp_path, bert_artifact, monkeypatch):
    """OUT is checked again at the swap: one that appeared while the job ran is left as it is (without --force),
    the scores are kept beside it, and --resume --force swaps them in without scoring again."""
    from memrerank import scale

    src = _write_jsonl(tmp_path / "pairs.jsonl", _rows(12))
    out = tmp_path / "out"

    def appear(point: str) -> None:
        if point == "verify":
            out.mkdir()
            (out / "theirs.json").write_text('{"id": "theirs"}\n')

    monkeypatch.setattr(scale, "_FAULT", appear)
    with pytest.raises(FileExistsError, match="appeared while the job ran.*--resume and --force"):
        rescore(src, out, bert_artifact, options=FP32)
    monkeypatch.setattr(scale, "_FAULT", None)
    assert [p.name for p in out.iterdir()] == ["theirs.json"]
    report = rescore(src, out, bert_artifact, options=FP32, resume=True, force=True)
    assert report.rows == report.resumed == 12
    assert sorted(r["id"] for r in _read_output(out)) == [r["id"] for r in _rows(12)]
    assert _beside(out) == []


def test_ray_serve_deployment_speaks_the_same_api(local_ray, bert_artifact):
    httpx = pytest.importorskip("httpx")
    from ray import serve

    from memrerank.scale import serve_on_ray
    from memrerank.serve import Limits, ServeConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve_on_ray(ServeConfig(bert_artifact, LoadOptions("fp32", threads=1), limits=Limits(max_documents=20)),
                 port=port, replicas=2, blocking=False)
    try:
        url = f"http://127.0.0.1:{port}"
        ref = Reranker.load(bert_artifact, "fp32")
        docs = DOCS[:6]
        r = httpx.post(f"{url}/v1/rerank", json={"query": QUERIES[0], "documents": docs, "top_n": 2,
                                                 "return_documents": True}, timeout=60)
        assert r.status_code == 200, r.text
        want = ref.rank(QUERIES[0], docs, top_k=2)
        assert [x["index"] for x in r.json()["results"]] == [h.index for h in want]
        assert r.json()["results"][0]["document"]["text"] == want[0].text
        r = httpx.post(f"{url}/rerank", json={"query": QUERIES[1], "texts": docs, "raw_scores": True}, timeout=60)
        got = np.array([x["score"] for x in sorted(r.json(), key=lambda x: x["index"])])
        np.testing.assert_allclose(got, ref.predict([(QUERIES[1], d) for d in docs], raw=True), atol=RAY_FP32_ATOL)
        r = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["d"] * 21}, timeout=60)
        assert r.status_code == 413 and "21 documents exceed the limit of 20" in r.json()["message"]
        pids = {httpx.get(f"{url}/health", timeout=30).json()["pid"] for _ in range(40)}
        assert len(pids) == 2  # two replicas, each its own process with its own artifact
    finally:
        serve.shutdown()


def test_build_app_is_a_serve_run_builder(bert_artifact):
    """``serve run memrerank.scale:build_app artifact=OUT num_replicas=2`` passes one dict of strings."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from memrerank.scale import build_app

    app = call_user_app_builder_with_args_if_necessary(
        build_app, {"artifact": str(bert_artifact), "num_replicas": "2", "max_wait_ms": "2.5", "precision": "fp32"})
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="unknown option.*replicas"):
        build_app({"artifact": str(bert_artifact), "replicas": "2"})
    with pytest.raises(ValueError, match="take integers"):
        build_app({"artifact": str(bert_artifact), "num_replicas": "two"})
    with pytest.raises(ValueError, match="needs artifact"):
        build_app({})
    with pytest.raises(ValueError, match=r"Limits\.max_documents must be a positive integer"):
        build_app({"artifact": str(bert_artifact), "max_documents": "0"})
    for threads in ("0", 2.7):  # a float is LoadOptions' to refuse, not rounded on the way
        with pytest.raises(ValueError, match=r"build_app: LoadOptions\.threads must be a positive integer"):
            build_app({"artifact": str(bert_artifact), "threads": threads})
    with pytest.raises(ValueError, match=r"allow_tf32='maybe'; pass true, false or none"):
        build_app({"artifact": str(bert_artifact), "allow_tf32": "maybe"})
    app = build_app({"artifact": str(bert_artifact), "providers": "cpu", "prefix_reuse": "false",
                     "max_batch_tokens": "1024", "batch_size": "8", "io_binding": "false"})
    config = app._bound_deployment.init_args[0]
    assert config.options == LoadOptions("auto", providers=("cpu",), threads=1, batch_size=8, max_batch_tokens=1024,
                                         prefix_reuse=False, io_binding=False)
    assert config.artifact == str(Path(bert_artifact).resolve())
    assert app._bound_deployment.ray_actor_options["num_cpus"] == 1
    app = build_app({"artifact": str(bert_artifact), "threads": "2"})  # a replica's CPUs are its threads
    assert app._bound_deployment.ray_actor_options["num_cpus"] == 2


def test_rescore_job_takes_one_load_options(tmp_path):
    """The actors' load options are one LoadOptions; its threads are each actor's CPUs and onnxruntime threads
    (1 when unset). ``batch_size`` keeps one meaning (model rows per call, in LoadOptions): rows per actor call
    are ``block_rows``; ``force`` replaces an output, as export's ``--force`` does."""
    src, out, art = tmp_path / "pairs.jsonl", tmp_path / "out", tmp_path / "art"
    job = RescoreJob(src, out, art, LoadOptions("int8", threads=2), actors=3, block_rows=64, force=True)
    assert job.options == LoadOptions("int8", threads=2) and (job.block_rows, job.force) == (64, True)
    assert RescoreJob(src, out, art).options == LoadOptions("auto", threads=1)
    assert RescoreJob(src, out, art, LoadOptions("fp32", batch_size=8)).options.threads == 1
    with pytest.raises(TypeError, match=r"RescoreJob\.options must be a memrerank\.LoadOptions"):
        RescoreJob(src, out, art, "fp32")
    with pytest.raises(ValueError, match=r"RescoreJob\.block_rows must be a positive integer"):
        RescoreJob(src, out, art, block_rows=0)
    with pytest.raises(ValueError, match=r"RescoreJob\.force must be True or False"):
        RescoreJob(src, out, art, force="no")
    for gone in ("precision", "providers", "threads_per_actor", "batch_size", "overwrite", "max_batch_tokens",
                 "prefix_reuse"):
        with pytest.raises(TypeError, match=gone):
            RescoreJob(src, out, art, **{gone: None})
    # the keyword form says where a load option or a renamed field went
    with pytest.raises(TypeError, match=r"precision= is no RescoreJob field; pass options=LoadOptions\(precision"):
        rescore(src, out, art, precision="fp32")
    with pytest.raises(TypeError, match=r"threads_per_actor= .*options=LoadOptions\(threads"):
        rescore(src, out, art, threads_per_actor=2)
    with pytest.raises(TypeError, match=r"batch_size= .*block_rows="):
        rescore(src, out, art, batch_size=64)


def test_rescore_actors_get_the_options_threads(local_ray, tmp_path, bert_artifact, monkeypatch):
    """``options.threads`` reaches each actor twice: the CPUs Ray reserves for it and the Reranker it loads."""
    import memrerank.scale as scale

    seen = []
    real = ray.data.Dataset.map_batches

    def spy(self, fn, **kw):
        seen.append((kw["num_cpus"], kw["fn_constructor_kwargs"]["job"].options))
        return real(self, fn, **kw)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", spy)
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows(6)))
    report = rescore(src, tmp_path / "out", bert_artifact, options=FP32.replace(threads=2))
    assert report.threads == 2 and report.rows == 6
    assert seen == [(2, FP32.replace(threads=2))]
    actor = scale.RerankActor(RescoreJob(src, tmp_path / "x", bert_artifact, FP32.replace(threads=2)))
    assert actor.reranker.backend.session.get_session_options().intra_op_num_threads == 2
    with pytest.raises(ValueError, match=r"1 actors x 3 threads need 3 CPUs; the Ray cluster has 2"):
        rescore(src, tmp_path / "o2", bert_artifact, options=FP32.replace(threads=3))
