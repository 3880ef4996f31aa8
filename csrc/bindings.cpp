// The pybind11 module cbir_engine._C: a flat list of entries. Each checks its inputs, fills a
// plain struct and calls into runtime/ or cpu/.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cpu/conv.h"
#include "cpu/direct_conv.h"
#include "cpu/gemm.h"
#include "cpu/peak.h"
#include "cpu/winograd.h"
#include "runtime/executor.h"
#include "runtime/thread_pool.h"
// ---- hamming index includes (owned by the Hamming index work) ----
#include <mutex>

#include "cpu/hamming.h"
#include "cpu/mih.h"

namespace {

// The threads a HammingIndex owns; the mutex keeps two Python threads from running one pool at once.
struct HammingThreads {
  explicit HammingThreads(int threads) : pool(threads) {}
  cbir::runtime::ThreadPool pool;
  std::mutex mu;
};

// The C++ side of a built multi-index-hashing structure; Python only passes it back in.
struct PyMihTables {
  std::unique_ptr<cbir::cpu::MihTables> tables;
};

// A C-contiguous 2-D uint8 array of codes (Python has already said why, in its own words, if not).
pybind11::array codes_arg(const pybind11::handle& obj, const char* what) {
  namespace py = pybind11;
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(what) + " must be a numpy array");
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().equal(py::dtype::of<uint8_t>())) throw py::type_error(std::string(what) + " must be uint8");
  if (a.ndim() != 2) throw py::value_error(std::string(what) + " must be 2-D [n, code_bytes]");
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(what) + " must be C-contiguous");
  return a;
}

// Optional int64 labels, one per code.
const int64_t* ids_arg(const pybind11::handle& obj, int64_t n) {
  namespace py = pybind11;
  if (obj.is_none()) return nullptr;
  if (!py::isinstance<py::array>(obj)) throw py::type_error("ids must be a numpy array or None");
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().equal(py::dtype::of<int64_t>())) throw py::type_error("ids must be int64");
  if (a.ndim() != 1 || a.shape(0) != n) throw py::value_error("ids must be 1-D with one id per code");
  if (!(a.flags() & py::array::c_style)) throw py::value_error("ids must be C-contiguous");
  return static_cast<const int64_t*>(a.data());
}

pybind11::tuple range_result_to_numpy(cbir::cpu::HammingRangeResult& r) {
  namespace py = pybind11;
  py::array_t<int64_t> lims(py::ssize_t(r.lims.size()));
  py::array_t<int32_t> dist(py::ssize_t(r.distances.size()));
  py::array_t<int64_t> ids(py::ssize_t(r.ids.size()));
  std::copy(r.lims.begin(), r.lims.end(), lims.mutable_data());
  std::copy(r.distances.begin(), r.distances.end(), dist.mutable_data());
  std::copy(r.ids.begin(), r.ids.end(), ids.mutable_data());
  return py::make_tuple(lims, dist, ids);
}

}  // namespace
// ---- end hamming index includes ----

namespace py = pybind11;
using cbir::runtime::Executor;
using cbir::runtime::StepSpec;
using cbir::runtime::TensorRef;

namespace {

using FloatArray = py::array_t<float, py::array::c_style>;

// Checks that `obj` is a float32 numpy array (any strides) and returns it.
py::array check_float32(const py::handle& obj, const char* what) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(what) + " must be a numpy array");
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().equal(py::dtype::of<float>()))
    throw py::type_error(std::string(what) + " must be float32, got " + std::string(py::str(arr.dtype())));
  return arr;
}

// A new float32 array whose data is 64-byte aligned: packed weights are read with 32-byte
// vector loads, and numpy's default 16-byte alignment makes half of them split cache lines.
FloatArray aligned_array(py::ssize_t n) {
  void* mem = std::aligned_alloc(64, size_t((std::max<py::ssize_t>(n, 1) * 4 + 63) / 64 * 64));
  if (!mem) throw std::bad_alloc();
  py::capsule owner(mem, [](void* p) { std::free(p); });
  return FloatArray({n}, {py::ssize_t(sizeof(float))}, static_cast<float*>(mem), owner);
}

TensorRef to_ref(const py::handle& obj) {
  TensorRef r;
  if (obj.is_none()) return r;
  auto t = obj.cast<py::tuple>();
  if (t.size() != 3 && t.size() != 4)
    throw py::value_error("a tensor reference is (is_const, offset, shape[, batch_stride])");
  r.present = true;
  r.is_const = t[0].cast<bool>();
  r.offset = t[1].cast<int64_t>();
  r.shape = t[2].cast<std::vector<int64_t>>();
  for (int64_t d : r.shape)
    if (d < 0) throw py::value_error("negative dimension in a tensor reference");
  if (t.size() == 4) {
    r.batch_stride = t[3].cast<int64_t>();
    const int64_t per_item = r.shape.empty() || r.shape[0] == 0 ? 0 : r.numel() / r.shape[0];
    if (r.batch_stride != 0 && (r.is_const || r.shape.empty() || r.batch_stride < per_item))
      throw py::value_error("a batch stride needs an arena tensor and at least one item's floats");
  }
  return r;
}

// Owns the Python objects whose memory the executor points into.
struct PyExecutor {
  py::list keep_alive;
  std::unique_ptr<Executor> ex;

  py::list run(const py::list& inputs, std::vector<int64_t>* times) {
    const auto& in_refs = ex->inputs();
    if (inputs.size() != in_refs.size())
      throw py::value_error("expected " + std::to_string(in_refs.size()) + " inputs, got " +
                            std::to_string(inputs.size()));
    std::vector<FloatArray> arrays;
    for (size_t i = 0; i < inputs.size(); ++i) {
      check_float32(inputs[i], "input");
      auto a = FloatArray::ensure(inputs[i]);
      if (!a) throw py::type_error("input could not be read as float32");
      if (a.ndim() != py::ssize_t(in_refs[i].shape.size()))
        throw py::value_error("input " + std::to_string(i) + " has the wrong rank");
      for (py::ssize_t d = 0; d < a.ndim(); ++d)
        if (a.shape(d) != in_refs[i].shape[size_t(d)])
          throw py::value_error("input " + std::to_string(i) + " has the wrong shape");
      arrays.push_back(std::move(a));
    }
    std::vector<FloatArray> outs;
    for (const auto& r : ex->outputs()) outs.emplace_back(std::vector<py::ssize_t>(r.shape.begin(), r.shape.end()));
    {
      // Take the pool's lock only after releasing the GIL: a thread waiting for the lock while
      // holding the GIL would block the running thread from taking the GIL back.
      py::gil_scoped_release nogil;
      auto lock = ex->lock();
      for (size_t i = 0; i < arrays.size(); ++i)
        std::memcpy(ex->tensor_ptr(in_refs[i]), arrays[i].data(), size_t(arrays[i].size()) * sizeof(float));
      ex->run_steps(times);
      for (size_t i = 0; i < outs.size(); ++i)
        std::memcpy(outs[i].mutable_data(), ex->tensor_ptr(ex->outputs()[i]),
                    size_t(outs[i].size()) * sizeof(float));
    }
    py::list result;
    for (auto& o : outs) result.append(o);
    return result;
  }
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cbir-engine compiled core: executor and CPU kernels";

  m.def("default_threads", &cbir::runtime::default_threads, "CPUs this process may run on");
  m.def("kernel_names", &cbir::runtime::kernel_names, "kernels a plan step may name");
  m.def(
      "measure_fma_gflops",
      [](int threads, double seconds) {
        if (threads < 0 || !(seconds > 0.0)) throw py::value_error("threads >= 0 and seconds > 0");
        py::gil_scoped_release nogil;
        cbir::runtime::ThreadPool pool(threads);
        return cbir::cpu::measure_fma_gflops(pool, seconds);
      },
      py::arg("threads") = 0, py::arg("seconds") = 0.5, "measured FMA peak (GFLOP/s, fp32, AVX2)");

  m.def(
      "pack_conv2d_weight",
      [](const py::object& w_obj, int groups) {
        check_float32(w_obj, "weight");
        auto w = FloatArray::ensure(w_obj);
        if (w.ndim() != 4) throw py::value_error("conv weight must be [K, C/groups, KH, KW]");
        const int K = int(w.shape(0)), Cg = int(w.shape(1)), KH = int(w.shape(2)), KW = int(w.shape(3));
        if (groups <= 0 || K % groups) throw py::value_error("output channels not divisible by groups");
        FloatArray out = aligned_array(py::ssize_t(cbir::cpu::conv2d_packed_weight_floats(K, Cg, KH, KW, groups)));
        cbir::cpu::pack_conv2d_weight(w.data(), K, Cg, KH, KW, groups, out.mutable_data());
        return out;
      },
      py::arg("weight"), py::arg("groups") = 1, "packs conv weights for the GEMM path");

  // Both Winograd tile sizes: [K, C, 3, 3] weights transformed and packed by `pack`.
  auto def_winograd_pack = [&m](const char* name, size_t (*floats)(int, int),
                                void (*pack)(const float*, int, int, float*), const char* doc) {
    m.def(
        name,
        [floats, pack](const py::object& w_obj) {
          check_float32(w_obj, "weight");
          auto w = FloatArray::ensure(w_obj);
          if (w.ndim() != 4 || w.shape(2) != 3 || w.shape(3) != 3)
            throw py::value_error("Winograd weights must be [K, C, 3, 3]");
          const int K = int(w.shape(0)), C = int(w.shape(1));
          FloatArray out = aligned_array(py::ssize_t(floats(K, C)));
          pack(w.data(), K, C, out.mutable_data());
          return out;
        },
        py::arg("weight"), doc);
  };
  def_winograd_pack("pack_winograd_weight", cbir::cpu::winograd_packed_weight_floats, cbir::cpu::pack_winograd_weight,
                    "transforms and packs 3x3 conv weights for the Winograd F(4x4,3x3) path");
  def_winograd_pack("pack_winograd2_weight", cbir::cpu::winograd2_packed_weight_floats,
                    cbir::cpu::pack_winograd2_weight,
                    "transforms and packs 3x3 conv weights for the Winograd F(2x2,3x3) path");

  m.def(
      "pack_direct_conv_weight",
      [](const py::object& w_obj) {
        check_float32(w_obj, "weight");
        auto w = FloatArray::ensure(w_obj);
        if (w.ndim() != 4) throw py::value_error("conv weights must be [K, C, KH, KW]");
        const int K = int(w.shape(0)), C = int(w.shape(1)), KH = int(w.shape(2)), KW = int(w.shape(3));
        FloatArray out = aligned_array(py::ssize_t(cbir::cpu::direct_conv_packed_weight_floats(K, C, KH, KW)));
        cbir::cpu::pack_direct_conv_weight(w.data(), K, C, KH, KW, out.mutable_data());
        return out;
      },
      py::arg("weight"), "packs [K, C, KH, KW] conv weights for the direct kernel (16 output channels a row)");

  m.def(
      "pack_gemm_a",
      [](const py::object& a_obj) {
        auto a = check_float32(a_obj, "A");
        if (a.ndim() != 2) throw py::value_error("A must be 2-D");
        const int M = int(a.shape(0)), K = int(a.shape(1));
        FloatArray out = aligned_array(py::ssize_t(cbir::cpu::packed_a_floats(M, K)));
        cbir::cpu::pack_a(static_cast<const float*>(a.data()), a.strides(0) / 4, a.strides(1) / 4, M, K,
                          out.mutable_data());
        return out;
      },
      py::arg("a"), "packs a [M, K] matrix (any strides) as the GEMM A operand");

  m.def(
      "pack_gemm_b",
      [](const py::object& b_obj) {
        auto b = check_float32(b_obj, "B");
        if (b.ndim() != 2) throw py::value_error("B must be 2-D");
        const int K = int(b.shape(0)), N = int(b.shape(1));
        FloatArray out = aligned_array(py::ssize_t(cbir::cpu::packed_b_floats(K, N)));
        cbir::cpu::pack_b(static_cast<const float*>(b.data()), b.strides(0) / 4, b.strides(1) / 4, K, N,
                          out.mutable_data());
        return out;
      },
      py::arg("b"), "packs a [K, N] matrix (any strides) as the GEMM B operand");

  py::class_<cbir::runtime::ThreadPool, std::shared_ptr<cbir::runtime::ThreadPool>>(m, "ThreadPool")
      .def(py::init([](int threads) {
             if (threads < 0) throw py::value_error("threads must be >= 0 (0: all CPUs)");
             return std::make_shared<cbir::runtime::ThreadPool>(threads);
           }),
           py::arg("threads") = 0)
      .def_property_readonly("threads", &cbir::runtime::ThreadPool::threads);

  py::class_<PyExecutor>(m, "Executor")
      .def(py::init([](std::shared_ptr<cbir::runtime::ThreadPool> pool, int64_t arena_bytes, const py::list& constants, const py::list& steps,
                       const py::list& inputs, const py::list& outputs) {
             auto self = std::make_unique<PyExecutor>();
             std::vector<cbir::runtime::ConstantData> consts;
             for (const auto& c : constants) {
               check_float32(c, "constant");
               auto a = FloatArray::ensure(c);
               self->keep_alive.append(a);
               consts.push_back({a.data(), int64_t(a.size())});
             }
             std::vector<StepSpec> specs;
             for (const auto& s : steps) {
               auto t = s.cast<py::tuple>();
               if (t.size() != 4) throw py::value_error("a step is (kernel, ints, floats, tensors)");
               StepSpec spec;
               spec.kernel = t[0].cast<std::string>();
               spec.ints = t[1].cast<std::vector<int64_t>>();
               spec.floats = t[2].cast<std::vector<double>>();
               for (const auto& r : t[3].cast<py::list>()) spec.tensors.push_back(to_ref(r));
               specs.push_back(std::move(spec));
             }
             std::vector<TensorRef> ins, outs;
             for (const auto& r : inputs) ins.push_back(to_ref(r));
             for (const auto& r : outputs) outs.push_back(to_ref(r));
             if (!pool) throw py::value_error("pool must be a ThreadPool");
             py::gil_scoped_release nogil;  // building may wait for a run on the same pool
             self->ex = std::make_unique<Executor>(std::move(pool), arena_bytes, std::move(consts), specs,
                                                   std::move(ins), std::move(outs));
             return self;
           }),
           py::arg("pool"), py::arg("arena_bytes"), py::arg("constants"), py::arg("steps"),
           py::arg("inputs"), py::arg("outputs"))
      .def("run", [](PyExecutor& self, const py::list& inputs) { return self.run(inputs, nullptr); },
           py::arg("inputs"), "copies the inputs in, runs every step, returns new output arrays")
      .def(
          "profile",
          [](PyExecutor& self, const py::list& inputs) {
            std::vector<int64_t> times;
            py::list outs = self.run(inputs, &times);
            return py::make_tuple(outs, times);
          },
          py::arg("inputs"), "like run, and also returns each step's wall time in ns")
      .def_property_readonly("threads", [](const PyExecutor& s) { return s.ex->threads(); })
      .def_property_readonly("arena_bytes", [](const PyExecutor& s) { return s.ex->arena_bytes(); })
      .def_property_readonly("num_steps", [](const PyExecutor& s) { return s.ex->num_steps(); });

  // ---- hamming index entries (owned by the Hamming index work) ----
  py::class_<HammingThreads>(m, "HammingThreads")
      .def(py::init([](int threads) {
             if (threads < 0) throw py::value_error("threads must be >= 0 (0: all CPUs)");
             return std::make_unique<HammingThreads>(threads);
           }),
           py::arg("threads") = 0, "threads owned by one Hamming index")
      .def_property_readonly("threads", [](HammingThreads& t) { return t.pool.threads(); });

  m.def("gemm_isa", &cbir::cpu::gemm_isa, "the SIMD path of the GEMM micro-kernels (convs, Gemm, MatMul)");
  m.def("gemm_set_isa", [](const std::string& name) { return cbir::cpu::gemm_set_isa(name.c_str()); },
        py::arg("name"), "pins the GEMM micro-kernels to 'avx2', 'avx512' or 'auto'; False if unavailable");
  m.def("hamming_isa", &cbir::cpu::hamming_isa, "the SIMD path the Hamming scan uses");
  m.def("hamming_set_isa", [](const std::string& name) { return cbir::cpu::hamming_set_isa(name.c_str()); },
        py::arg("name"), "pins the Hamming scan to 'avx2', 'avx512-vpopcntdq' or 'auto'; False if unavailable");

  m.def(
      "hamming_knn",
      [](HammingThreads& threads, const py::object& db_obj, const py::object& ids_obj, bool ids_ascending,
         const py::object& q_obj, int64_t k) {
        auto db = codes_arg(db_obj, "database codes");
        auto q = codes_arg(q_obj, "queries");
        if (q.shape(1) != db.shape(1)) throw py::value_error("queries and database differ in code width");
        if (db.shape(1) < 1) throw py::value_error("codes must have at least one byte");
        if (k < 1 || k > db.shape(0)) throw py::value_error("k must be in [1, number of codes]");
        cbir::cpu::HammingKnnParams p;
        p.db = static_cast<const uint8_t*>(db.data());
        p.n = db.shape(0);
        p.code_bytes = int(db.shape(1));
        p.ids = ids_arg(ids_obj, p.n);
        p.ids_ascending = ids_ascending;
        p.queries = static_cast<const uint8_t*>(q.data());
        p.nq = q.shape(0);
        p.k = k;
        py::array_t<int32_t> dist({p.nq, k});
        py::array_t<int64_t> ids({p.nq, k});
        p.out_distances = dist.mutable_data();
        p.out_ids = ids.mutable_data();
        {
          py::gil_scoped_release nogil;
          std::lock_guard<std::mutex> lock(threads.mu);
          cbir::cpu::run_hamming_knn(p, threads.pool);
        }
        return py::make_tuple(dist, ids);
      },
      py::arg("threads"), py::arg("db"), py::arg("ids"), py::arg("ids_ascending"), py::arg("queries"),
      py::arg("k"), "exact k nearest codes by flat scan: (distances int32 [nq, k], ids int64 [nq, k])");

  m.def(
      "hamming_range",
      [](HammingThreads& threads, const py::object& db_obj, const py::object& ids_obj, const py::object& q_obj,
         int32_t radius) {
        auto db = codes_arg(db_obj, "database codes");
        auto q = codes_arg(q_obj, "queries");
        if (q.shape(1) != db.shape(1)) throw py::value_error("queries and database differ in code width");
        cbir::cpu::HammingRangeParams p;
        p.db = static_cast<const uint8_t*>(db.data());
        p.n = db.shape(0);
        p.code_bytes = int(db.shape(1));
        p.ids = ids_arg(ids_obj, p.n);
        p.queries = static_cast<const uint8_t*>(q.data());
        p.nq = q.shape(0);
        p.radius = radius;
        cbir::cpu::HammingRangeResult r;
        {
          py::gil_scoped_release nogil;
          std::lock_guard<std::mutex> lock(threads.mu);
          cbir::cpu::run_hamming_range(p, threads.pool, &r);
        }
        return range_result_to_numpy(r);
      },
      py::arg("threads"), py::arg("db"), py::arg("ids"), py::arg("queries"), py::arg("radius"),
      "codes within radius (inclusive) by flat scan: (lims, distances, ids)");

  m.def(
      "hamming_distances",
      [](HammingThreads& threads, const py::object& db_obj, const py::object& q_obj) {
        auto db = codes_arg(db_obj, "database codes");
        auto q = codes_arg(q_obj, "queries");
        if (q.shape(1) != db.shape(1)) throw py::value_error("queries and database differ in code width");
        py::array_t<int32_t> out({q.shape(0), db.shape(0)});
        const auto* dbp = static_cast<const uint8_t*>(db.data());
        const auto* qp = static_cast<const uint8_t*>(q.data());
        const int64_t n = db.shape(0), nq = q.shape(0);
        const int cb = int(db.shape(1));
        int32_t* o = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          std::lock_guard<std::mutex> lock(threads.mu);
          cbir::cpu::run_hamming_distances(dbp, n, qp, nq, cb, o, threads.pool);
        }
        return out;
      },
      py::arg("threads"), py::arg("db"), py::arg("queries"), "all pairwise distances, int32 [nq, n]");

  py::class_<PyMihTables>(m, "MihTables")
      .def_property_readonly("substrings", [](const PyMihTables& t) { return int(t.tables->tables.size()); })
      .def_property_readonly("substring_bits",
                             [](const PyMihTables& t) {
                               std::vector<int> bits;
                               for (const auto& tb : t.tables->tables) bits.push_back(tb.bits);
                               return bits;
                             })
      .def_property_readonly("size", [](const PyMihTables& t) { return t.tables->n; })
      .def_property_readonly("code_bytes", [](const PyMihTables& t) { return t.tables->code_bytes; })
      .def_property_readonly("memory_bytes", [](const PyMihTables& t) { return t.tables->memory_bytes(); });

  m.def("mih_default_substrings", &cbir::cpu::mih_default_substrings, py::arg("bits"), py::arg("n"),
        "substrings multi-index hashing picks for n codes of this length");

  m.def(
      "mih_build",
      [](HammingThreads& threads, const py::object& db_obj, int substrings) {
        auto db = codes_arg(db_obj, "database codes");
        if (db.shape(1) < 1) throw py::value_error("codes must have at least one byte");
        cbir::cpu::MihBuildParams p;
        p.db = static_cast<const uint8_t*>(db.data());
        p.n = db.shape(0);
        p.code_bytes = int(db.shape(1));
        p.substrings = substrings;
        auto out = std::make_unique<PyMihTables>();
        {
          py::gil_scoped_release nogil;
          std::lock_guard<std::mutex> lock(threads.mu);
          out->tables = cbir::cpu::run_mih_build(p, threads.pool);
        }
        return out;
      },
      py::arg("threads"), py::arg("db"), py::arg("substrings") = 0,
      "builds multi-index hashing tables (substrings 0: the default)");

  m.def(
      "mih_knn",
      [](HammingThreads& threads, const PyMihTables& tables, const py::object& ids_obj, bool ids_ascending,
         const py::object& q_obj, int64_t k, int serial_start_us) {
        auto q = codes_arg(q_obj, "queries");
        if (q.shape(1) != tables.tables->code_bytes) throw py::value_error("queries and tables differ in code width");
        if (k < 1 || k > tables.tables->n) throw py::value_error("k must be in [1, number of codes]");
        if (serial_start_us < 0) throw py::value_error("serial_start_us must be >= 0");
        cbir::cpu::MihKnnParams p;
        p.serial_start_us = serial_start_us;
        cbir::cpu::MihStats stats;
        p.tables = tables.tables.get();
        p.ids = ids_arg(ids_obj, tables.tables->n);
        p.ids_ascending = ids_ascending;
        p.queries = static_cast<const uint8_t*>(q.data());
        p.nq = q.shape(0);
        p.k = k;
        py::array_t<int32_t> dist({p.nq, k});
        py::array_t<int64_t> ids({p.nq, k});
        p.out_distances = dist.mutable_data();
        p.out_ids = ids.mutable_data();
        p.stats = &stats;
        {
          py::gil_scoped_release nogil;
          std::lock_guard<std::mutex> lock(threads.mu);
          cbir::cpu::run_mih_knn(p, threads.pool);
        }
        py::dict st;
        st["buckets"] = stats.buckets;
        st["candidates"] = stats.candidates;
        st["survivors"] = stats.survivors;
        return py::make_tuple(dist, ids, st);
      },
      py::arg("threads"), py::arg("tables"), py::arg("ids"), py::arg("ids_ascending"), py::arg("queries"),
      py::arg("k"), py::arg("serial_start_us") = 20,
      "exact k nearest codes by multi-index hashing: (distances, ids, stats); a lone query runs on "
      "the calling thread for serial_start_us before the other threads join it");

  m.def(
      "mih_range",
      [](HammingThreads& threads, const PyMihTables& tables, const py::object& ids_obj, const py::object& q_obj,
         int32_t radius) {
        auto q = codes_arg(q_obj, "queries");
        if (q.shape(1) != tables.tables->code_bytes) throw py::value_error("queries and tables differ in code width");
        cbir::cpu::MihRangeParams p;
        p.tables = tables.tables.get();
        p.ids = ids_arg(ids_obj, tables.tables->n);
        p.queries = static_cast<const uint8_t*>(q.data());
        p.nq = q.shape(0);
        p.radius = radius;
        cbir::cpu::HammingRangeResult r;
        {
          py::gil_scoped_release nogil;
          std::lock_guard<std::mutex> lock(threads.mu);
          cbir::cpu::run_mih_range(p, threads.pool, &r);
        }
        return range_result_to_numpy(r);
      },
      py::arg("threads"), py::arg("tables"), py::arg("ids"), py::arg("queries"), py::arg("radius"),
      "codes within radius (inclusive) by multi-index hashing: (lims, distances, ids)");
  // ---- end hamming index entries ----
}
