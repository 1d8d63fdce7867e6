"""The fused pair packer: numpy reference vs an independent re-assembly, and native vs numpy bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memrerank import kernels
from memrerank.kernels import pack_numpy

native = pytest.mark.skipif(not kernels.NATIVE, reason="native kernels not built (no compiler or MEMRERANK_NO_KERNELS)")

ids = st.integers(min_value=0, max_value=151_668)


@st.composite
def packing_case(draw):
    n_heads = draw(st.integers(1, 4))
    heads = [draw(st.lists(ids, max_size=12)) for _ in range(n_heads)]
    n = draw(st.integers(0, 40))
    docs = [draw(st.lists(ids, max_size=30)) for _ in range(n)]
    row_head = [draw(st.integers(0, n_heads - 1)) for _ in range(n)]
    tail = draw(st.lists(ids, max_size=6))
    budgets = [draw(st.integers(0, 35)) for _ in range(n_heads)]
    typed = draw(st.booleans())
    kw = dict(pad_id=draw(st.integers(-1, 151_668)), left=draw(st.booleans()), max_rows=draw(st.integers(1, 16)),
              max_tokens=draw(st.integers(1, 400)), call_overhead=draw(st.integers(0, 200)))
    if typed:
        kw.update(head_types=[[draw(st.integers(0, 1)) for _ in h] for h in heads], doc_type=draw(st.integers(0, 1)),
                  tail_types=[draw(st.integers(0, 1)) for _ in tail])
    return heads, row_head, docs, tail, budgets, kw


def _expected_row(case, r):
    heads, row_head, docs, tail, budgets, kw = case
    h = row_head[r]
    ids_ = heads[h] + docs[r][: budgets[h]] + tail
    types = None
    if "head_types" in kw:
        types = kw["head_types"][h] + [kw["doc_type"]] * len(docs[r][: budgets[h]]) + kw["tail_types"]
    return ids_, types


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packing_case())
def test_numpy_packer_assembles_every_pair(case):
    """Independent check of the reference: every row is head + doc[:budget] + tail on the right side, batches are
    longest-first, within the token budget, and cover each row exactly once."""
    heads, row_head, docs, tail, budgets, kw = case
    packed = pack_numpy(heads, row_head, docs, tail, budgets, **kw)
    assert sorted(packed.order.tolist()) == list(range(len(docs)))
    lengths = [len(_expected_row(case, r)[0]) for r in range(len(docs))]
    assert packed.lengths.tolist() == lengths
    assert packed.truncated.tolist() == [len(docs[r]) > budgets[row_head[r]] for r in range(len(docs))]
    seen = [lengths[r] for r in packed.order]
    assert seen == sorted(seen, reverse=True)
    for batch in packed:
        rows, width = batch.input_ids.shape
        assert rows <= kw["max_rows"] and (rows == 1 or rows * width <= kw["max_tokens"])
        assert width == max(lengths[r] for r in batch.rows)
        for k, r in enumerate(batch.rows):
            want, types = _expected_row(case, r)
            n = len(want)
            cols = slice(width - n, width) if kw["left"] else slice(0, n)
            assert batch.input_ids[k, cols].tolist() == want
            assert batch.attention_mask[k].sum() == n and batch.attention_mask[k, cols].all()
            assert (batch.input_ids[k][batch.attention_mask[k] == 0] == kw["pad_id"]).all()
            assert batch.last[k] == (width - 1 if kw["left"] else n - 1)
            if types is not None:
                assert batch.token_type_ids[k, cols].tolist() == types
    if len(docs):
        assert 0.0 <= packed.padding_waste < 1.0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 60), max_size=9), st.integers(1, 5), st.integers(1, 200), st.integers(0, 100))
def test_batch_plan_is_the_cheapest_valid_cut(lengths, max_rows, max_tokens, overhead):
    """Brute force over every way to cut the sorted rows: the plan is valid and has the minimum cost."""
    import itertools

    from memrerank.kernels.packer import plan_batches

    lengths = sorted(lengths, reverse=True)
    n = len(lengths)

    def valid(bounds):
        return all(b - a <= max_rows and (b - a == 1 or (b - a) * lengths[a] <= max_tokens)
                   for a, b in zip(bounds, bounds[1:]))

    def cost(bounds):
        return sum((b - a) * lengths[a] + overhead for a, b in zip(bounds, bounds[1:]))

    plan = plan_batches(np.asarray(lengths), max_rows, max_tokens, overhead)
    assert plan[0] == 0 and plan[-1] == n and valid(plan)
    cuts = [[0, *c, n] for k in range(n) for c in itertools.combinations(range(1, n), k)] if n else [[0]]
    assert cost(plan) == min(cost(c) for c in cuts if valid(c))


@native
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packing_case())
def test_native_packer_is_bit_for_bit_numpy(case):
    heads, row_head, docs, tail, budgets, kw = case
    a = pack_numpy(heads, row_head, docs, tail, budgets, **kw)
    b = kernels.pack_native(heads, row_head, docs, tail, budgets, **kw)
    for name in ("order", "bounds", "widths", "offsets", "input_ids", "attention_mask", "last", "lengths",
                 "truncated"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert (a.token_type_ids is None) == (b.token_type_ids is None)
    if a.token_type_ids is not None:
        assert np.array_equal(a.token_type_ids, b.token_type_ids)


@native
def test_native_packer_errors_are_value_errors():
    with pytest.raises(ValueError, match="row_head"):
        kernels.pack_native([[1]], [0, 0], [[1]], [], [4], pad_id=0, left=True, max_rows=4, max_tokens=64)
    with pytest.raises(ValueError, match="head that does not exist"):
        kernels.pack_native([[1]], [3], [[1]], [], [4], pad_id=0, left=True, max_rows=4, max_tokens=64)
    with pytest.raises(TypeError, match="integer"):
        kernels.pack_native([[1]], [0], ["abc"], [], [4], pad_id=0, left=True, max_rows=4, max_tokens=64)


def test_no_kernels_env_selects_numpy(tmp_path):
    import subprocess
    import sys

    code = "import memrerank.kernels as k; print(k.backend_name())"
    out = subprocess.run([sys.executable, "-c", code], env={"MEMRERANK_NO_KERNELS": "1", "PATH": ""},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "numpy"


def test_info_system_reports_the_active_path(capsys):
    import json

    from memrerank.cli import main

    assert main(["info", "--system", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kernels"] == kernels.backend_name()
    assert "CPUExecutionProvider" in info["providers"]
    assert main(["info"]) == 2  # neither an artifact nor --system
