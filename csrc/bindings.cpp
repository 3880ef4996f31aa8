// The pybind11 module cbir_engine._C: a flat list of entries. Each checks its inputs, fills a
// plain struct and calls into runtime/ or cpu/.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cpu/conv.h"
#include "cpu/gemm.h"
#include "runtime/executor.h"
#include "runtime/thread_pool.h"
// ---- hamming index includes (owned by the Hamming index work) ----
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
  if (!arr.dtype().is(py::dtype::of<float>()))
    throw py::type_error(std::string(what) + " must be float32, got " + std::string(py::str(arr.dtype())));
  return arr;
}

TensorRef to_ref(const py::handle& obj) {
  TensorRef r;
  if (obj.is_none()) return r;
  auto t = obj.cast<py::tuple>();
  if (t.size() != 3) throw py::value_error("a tensor reference is (is_const, offset, shape)");
  r.present = true;
  r.is_const = t[0].cast<bool>();
  r.offset = t[1].cast<int64_t>();
  r.shape = t[2].cast<std::vector<int64_t>>();
  for (int64_t d : r.shape)
    if (d < 0) throw py::value_error("negative dimension in a tensor reference");
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
      auto lock = ex->lock();
      for (size_t i = 0; i < arrays.size(); ++i)
        std::memcpy(ex->tensor_ptr(in_refs[i]), arrays[i].data(), size_t(arrays[i].size()) * sizeof(float));
      {
        py::gil_scoped_release nogil;
        ex->run_steps(times);
        for (size_t i = 0; i < outs.size(); ++i)
          std::memcpy(outs[i].mutable_data(), ex->tensor_ptr(ex->outputs()[i]),
                      size_t(outs[i].size()) * sizeof(float));
      }
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
      "pack_conv2d_weight",
      [](const py::object& w_obj, int groups) {
        check_float32(w_obj, "weight");
        auto w = FloatArray::ensure(w_obj);
        if (w.ndim() != 4) throw py::value_error("conv weight must be [K, C/groups, KH, KW]");
        const int K = int(w.shape(0)), Cg = int(w.shape(1)), KH = int(w.shape(2)), KW = int(w.shape(3));
        if (groups <= 0 || K % groups) throw py::value_error("output channels not divisible by groups");
        FloatArray out(py::ssize_t(cbir::cpu::conv2d_packed_weight_floats(K, Cg, KH, KW, groups)));
        cbir::cpu::pack_conv2d_weight(w.data(), K, Cg, KH, KW, groups, out.mutable_data());
        return out;
      },
      py::arg("weight"), py::arg("groups") = 1, "packs conv weights for the GEMM path");

  m.def(
      "pack_gemm_a",
      [](const py::object& a_obj) {
        auto a = check_float32(a_obj, "A");
        if (a.ndim() != 2) throw py::value_error("A must be 2-D");
        const int M = int(a.shape(0)), K = int(a.shape(1));
        FloatArray out(py::ssize_t(cbir::cpu::packed_a_floats(M, K)));
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
        FloatArray out(py::ssize_t(cbir::cpu::packed_b_floats(K, N)));
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
  // ---- end hamming index entries ----
}
