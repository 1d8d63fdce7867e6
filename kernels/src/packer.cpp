// The fused pair packer (see memrerank/kernels/packer.py for the contract and the numpy reference).
//
// One pass over the pieces of many (query, document) pairs: truncate each document to its head's budget, sort
// rows longest first (stable), cut batches under rows x width <= max_tokens and rows <= max_rows, and write the
// padded input_ids / attention_mask / segment ids of every batch into one flat buffer each. The Python lists of
// document ids are read under the GIL (only the tokens that survive truncation are copied); everything after
// that runs with the GIL released.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace nb = nanobind;
using I64In = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using I64Out = nb::ndarray<nb::numpy, int64_t, nb::ndim<1>>;
using U8Out = nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>;

namespace {

template <typename T, typename Out>
Out to_numpy(std::vector<T> &&v) {
    auto *owned = new std::vector<T>(std::move(v));
    nb::capsule owner(owned, [](void *p) noexcept { delete static_cast<std::vector<T> *>(p); });
    return Out(owned->data(), {owned->size()}, owner);
}

std::vector<int64_t> copy_in(const I64In &a) { return std::vector<int64_t>(a.data(), a.data() + a.shape(0)); }

nb::tuple pack(nb::list heads_in, I64In row_head_in, nb::list docs, I64In tail_in, I64In budgets_in, int64_t pad_id,
               bool left, int64_t max_rows, int64_t max_tokens, nb::object head_types_in, int64_t doc_type,
               nb::object tail_types_in, int64_t call_overhead) {
    const size_t n = nb::len(docs);
    const size_t n_heads = nb::len(heads_in);
    if (row_head_in.shape(0) != n) throw nb::value_error("row_head needs one entry per document");
    if (budgets_in.shape(0) != n_heads) throw nb::value_error("budgets needs one entry per head");
    if (max_rows < 1 || max_tokens < 1) throw nb::value_error("max_rows and max_tokens must be positive");
    if (call_overhead < 0) throw nb::value_error("call_overhead must be >= 0");
    const bool with_types = !head_types_in.is_none();

    std::vector<std::vector<int64_t>> heads(n_heads), head_types;
    for (size_t h = 0; h < n_heads; ++h) heads[h] = copy_in(nb::cast<I64In>(heads_in[h]));
    if (with_types) {
        nb::list ht = nb::cast<nb::list>(head_types_in);
        if (nb::len(ht) != n_heads) throw nb::value_error("head_types needs one array per head");
        head_types.resize(n_heads);
        for (size_t h = 0; h < n_heads; ++h) {
            head_types[h] = copy_in(nb::cast<I64In>(ht[h]));
            if (head_types[h].size() != heads[h].size()) throw nb::value_error("head_types and heads differ in size");
        }
    }
    const std::vector<int64_t> row_head = copy_in(row_head_in), budgets = copy_in(budgets_in), tail = copy_in(tail_in);
    std::vector<int64_t> tail_types(tail.size(), 0);
    if (!tail_types_in.is_none()) {
        tail_types = copy_in(nb::cast<I64In>(tail_types_in));
        if (tail_types.size() != tail.size()) throw nb::value_error("tail_types and tail differ in size");
    }
    for (int64_t h : row_head)
        if (h < 0 || static_cast<size_t>(h) >= n_heads) throw nb::value_error("row_head refers to a head that does not exist");

    // Read the kept document tokens (under the GIL: they are Python ints in Python lists).
    std::vector<int64_t> doc_tokens, doc_start(n + 1, 0), lengths(n);
    std::vector<uint8_t> truncated(n, 0);
    size_t r = 0;
    for (nb::handle row : docs) {
        if (!PyList_Check(row.ptr()) && !PyTuple_Check(row.ptr()))
            throw nb::type_error("docs must be a list of lists of token ids");
        const int64_t budget = std::max<int64_t>(budgets[row_head[r]], 0);
        const Py_ssize_t len = PySequence_Fast_GET_SIZE(row.ptr());  // list or tuple
        const Py_ssize_t keep = std::min<Py_ssize_t>(len, budget);
        PyObject **items = PySequence_Fast_ITEMS(row.ptr());
        for (Py_ssize_t t = 0; t < keep; ++t) {
            const long long v = PyLong_AsLongLong(items[t]);  // borrowed references: no refcount traffic
            if (v == -1 && PyErr_Occurred()) throw nb::python_error();
            doc_tokens.push_back(v);
        }
        truncated[r] = len > keep;
        doc_start[r + 1] = static_cast<int64_t>(doc_tokens.size());
        lengths[r] = static_cast<int64_t>(heads[row_head[r]].size()) + keep + static_cast<int64_t>(tail.size());
        ++r;
    }

    std::vector<int64_t> order(n), bounds{0}, widths, offsets{0}, input_ids, mask, types, last(n);
    {
        nb::gil_scoped_release release;
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
        // Length bucketing by dynamic programming (same rule and tie-breaking as plan_batches in packer.py).
        std::vector<int64_t> best(n + 1, 0), next(n + 1, static_cast<int64_t>(n));
        for (int64_t i = static_cast<int64_t>(n) - 1; i >= 0; --i) {
            const int64_t width = lengths[order[i]];
            int64_t best_cost = -1, best_j = i + 1;
            const int64_t stop = std::min<int64_t>(static_cast<int64_t>(n), i + max_rows);
            for (int64_t j = i + 1; j <= stop; ++j) {
                const int64_t rows = j - i;
                if (rows > 1 && rows * width > max_tokens) break;
                const int64_t cost = rows * width + call_overhead + best[j];
                if (best_cost < 0 || cost < best_cost) {
                    best_cost = cost;
                    best_j = j;
                }
            }
            best[i] = best_cost;
            next[i] = best_j;
        }
        while (bounds.back() < static_cast<int64_t>(n)) {
            const int64_t i = bounds.back(), j = next[i];
            widths.push_back(lengths[order[i]]);
            offsets.push_back(offsets.back() + (j - i) * lengths[order[i]]);
            bounds.push_back(j);
        }
        const size_t total = static_cast<size_t>(offsets.back());
        input_ids.assign(total, pad_id);
        mask.assign(total, 0);
        if (with_types) types.assign(total, 0);
        for (size_t b = 0; b < widths.size(); ++b) {
            const int64_t width = widths[b];
            for (int64_t p = bounds[b]; p < bounds[b + 1]; ++p) {
                const int64_t row = order[p];
                const int64_t length = lengths[row];
                const size_t start = static_cast<size_t>(offsets[b] + (p - bounds[b]) * width + (left ? width - length : 0));
                const auto &head = heads[row_head[row]];
                const int64_t *doc = doc_tokens.data() + doc_start[row];
                const size_t k = static_cast<size_t>(doc_start[row + 1] - doc_start[row]);
                int64_t *ids = input_ids.data() + start;
                std::copy(head.begin(), head.end(), ids);
                std::copy(doc, doc + k, ids + head.size());
                std::copy(tail.begin(), tail.end(), ids + head.size() + k);
                std::fill(mask.begin() + start, mask.begin() + start + length, 1);
                if (with_types) {
                    int64_t *ty = types.data() + start;
                    const auto &htypes = head_types[row_head[row]];
                    std::copy(htypes.begin(), htypes.end(), ty);
                    std::fill(ty + head.size(), ty + head.size() + k, doc_type);
                    std::copy(tail_types.begin(), tail_types.end(), ty + head.size() + k);
                }
                last[p] = left ? width - 1 : length - 1;
            }
        }
    }
    nb::object types_out = nb::none();
    if (with_types) types_out = nb::cast(to_numpy<int64_t, I64Out>(std::move(types)));
    return nb::make_tuple(to_numpy<int64_t, I64Out>(std::move(order)), to_numpy<int64_t, I64Out>(std::move(bounds)),
                          to_numpy<int64_t, I64Out>(std::move(widths)), to_numpy<int64_t, I64Out>(std::move(offsets)),
                          to_numpy<int64_t, I64Out>(std::move(input_ids)), to_numpy<int64_t, I64Out>(std::move(mask)),
                          types_out, to_numpy<int64_t, I64Out>(std::move(last)),
                          to_numpy<int64_t, I64Out>(std::move(lengths)), to_numpy<uint8_t, U8Out>(std::move(truncated)));
}

}  // namespace

NB_MODULE(_kernels, m) {
    m.doc() = "memrerank native kernels (numpy fallbacks in memrerank.kernels)";
    m.def("pack", &pack, nb::arg("heads"), nb::arg("row_head"), nb::arg("docs"), nb::arg("tail"), nb::arg("budgets"),
          nb::arg("pad_id"), nb::arg("left"), nb::arg("max_rows"), nb::arg("max_tokens"), nb::arg("head_types").none(),
          nb::arg("doc_type"), nb::arg("tail_types").none(), nb::arg("call_overhead"),
          "Fused pair packer; returns (order, bounds, widths, offsets, input_ids, attention_mask, token_type_ids, "
          "last, lengths, truncated_u8). The GIL is released while packing.");
}
