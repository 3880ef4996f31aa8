#include "runtime/executor.h"
#include "runtime/step.h"

#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <new>
#include <stdexcept>

#include "cpu/conv.h"
#include "cpu/direct_conv.h"
#include "cpu/gemm.h"
#include "cpu/huge_pages.h"
#include "cpu/ops.h"
#include "cpu/winograd.h"

namespace cbir::runtime {

int64_t TensorRef::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t TensorRef::extent() const {
  const int64_t n = numel();
  if (!batch_stride || n == 0) return n;
  return (shape[0] - 1) * batch_stride + n / shape[0];
}

namespace {

using cpu::Act;

enum class ConvMethod : int { Gemm = 0, Depthwise = 1, Winograd = 2, Winograd2 = 3, Direct = 4 };

class ConvStep final : public Step {
 public:
  // `raw_weight` set: the weight is computed at run time and packed on every run into `packed_`.
  ConvStep(const cpu::Conv2dParams& p, ConvMethod method, const float* raw_weight)
      : p_(p), method_(method), raw_(raw_weight) {
    if (raw_) {
      packed_.resize(cpu::conv2d_packed_weight_floats(p.K, p.C / p.groups, p.KH, p.KW, p.groups));
      p_.w = packed_.data();
    }
  }
  void run(cpu::Parallel& par) override {
    if (raw_) cpu::pack_conv2d_weight(raw_, p_.K, p_.C / p_.groups, p_.KH, p_.KW, p_.groups, packed_.data());
    switch (method_) {
      case ConvMethod::Gemm: cpu::run_conv2d(p_, par); break;
      case ConvMethod::Depthwise: cpu::run_depthwise_conv2d(p_, par); break;
      case ConvMethod::Winograd: cpu::run_winograd_conv3x3(p_, workspace_, par); break;
      case ConvMethod::Winograd2: cpu::run_winograd2_conv3x3(p_, workspace_, par); break;
      case ConvMethod::Direct: cpu::run_direct_conv2d(p_, workspace_, par); break;
    }
  }
  size_t scratch_floats(int threads) const override {
    switch (method_) {
      case ConvMethod::Gemm: return cpu::conv2d_scratch_floats(p_, threads);
      case ConvMethod::Winograd: return cpu::winograd_scratch_floats(p_, threads);
      case ConvMethod::Winograd2: return cpu::winograd2_scratch_floats(p_, threads);
      default: return 0;
    }
  }
  size_t workspace_floats(int threads) const override {
    switch (method_) {
      case ConvMethod::Gemm: return cpu::conv2d_workspace_floats(p_, threads);
      case ConvMethod::Winograd: return cpu::winograd_workspace_floats(p_);
      case ConvMethod::Winograd2: return cpu::winograd2_workspace_floats(p_);
      case ConvMethod::Direct: return cpu::direct_conv_workspace_floats(p_);
      default: return 0;
    }
  }
  void bind_workspace(float* ws) override {
    workspace_ = ws;
    p_.workspace = ws;
  }

 private:
  cpu::Conv2dParams p_;
  ConvMethod method_;
  const float* raw_;
  std::vector<float> packed_;
  float* workspace_ = nullptr;
};

std::unique_ptr<Step> make_conv2d(Args& a) {
  cpu::Conv2dParams p;
  const auto& xs = a.shape(0);
  const auto& ys = a.shape(4);
  if (xs.size() != 4 || ys.size() != 4) a.fail("x and y must be 4-D");
  p.N = int(xs[0]), p.C = int(xs[1]), p.H = int(xs[2]), p.W = int(xs[3]);
  p.K = int(ys[1]), p.OH = int(ys[2]), p.OW = int(ys[3]);
  p.KH = a.i32(), p.KW = a.i32(), p.SH = a.i32(), p.SW = a.i32();
  p.PT = a.i32(), p.PL = a.i32(), p.DH = a.i32(), p.DW = a.i32();
  p.groups = a.i32();
  p.act = Act(a.i32());
  const int method_id = a.i32();
  const bool prepacked = a.i() != 0;
  p.act_a = a.f(), p.act_b = a.f();
  if (p.groups <= 0 || p.C % p.groups || p.K % p.groups) a.fail("bad groups");
  if (method_id < 0 || method_id > 4) a.fail("unknown conv method");
  const auto method = ConvMethod(method_id);
  p.x = a.need(0), p.w = a.need(1), p.bias = a.p(2), p.residual = a.p(3), p.y = a.need(4);
  p.x_bs = a.t(0).batch_stride, p.y_bs = a.t(4).batch_stride;
  if ((p.x_bs || p.y_bs) && method == ConvMethod::Depthwise) a.fail("the depthwise conv takes no batch strides");
  if (p.y_bs && p.residual) a.fail("a conv with a residual writes a whole tensor (no batch stride)");
  for (size_t k : {size_t(1), size_t(2), size_t(3)})
    if (k < a.tensors() && a.t(k).batch_stride) a.fail("only x and y may have batch strides");
  if (a.has_int()) {  // an input affine (+ReLU) folded in: scale and shift are tensors 5 and 6
    p.in_relu = a.i() != 0;
    p.in_scale = a.need(5), p.in_shift = a.need(6);
    const bool pointwise = p.KH == 1 && p.KW == 1 && p.SH == 1 && p.SW == 1 && p.PT == 0 && p.PL == 0 &&
                           p.OH == p.H && p.OW == p.W;
    if (method_id != 0 || !pointwise || a.t(5).numel() != p.C || a.t(6).numel() != p.C)
      a.fail("an input affine needs a pointwise GEMM conv and one scale and shift per input channel");
  }
  const int64_t wn = a.t(1).numel();
  const int64_t raw = int64_t(p.K) * (p.C / p.groups) * p.KH * p.KW;
  int64_t want = raw;
  if (method == ConvMethod::Winograd || method == ConvMethod::Winograd2) {
    if (p.KH != 3 || p.KW != 3 || p.SH != 1 || p.SW != 1 || p.DH != 1 || p.DW != 1 || p.groups != 1 || !prepacked)
      a.fail("Winograd needs a prepacked 3x3 stride-1 undilated ungrouped conv");
    want = int64_t(method == ConvMethod::Winograd ? cpu::winograd_packed_weight_floats(p.K, p.C)
                                                  : cpu::winograd2_packed_weight_floats(p.K, p.C));
  } else if (method == ConvMethod::Direct) {
    if (p.groups != 1 || !prepacked) a.fail("the direct conv needs a prepacked ungrouped conv");
    want = int64_t(cpu::direct_conv_packed_weight_floats(p.K, p.C, p.KH, p.KW));
  } else if (method == ConvMethod::Gemm && prepacked) {
    want = int64_t(cpu::conv2d_packed_weight_floats(p.K, p.C / p.groups, p.KH, p.KW, p.groups));
  }
  if (wn != want) a.fail("weight has " + std::to_string(wn) + " floats, expected " + std::to_string(want));
  const bool pack_at_run = method == ConvMethod::Gemm && !prepacked;
  return std::make_unique<ConvStep>(p, method, pack_at_run ? p.w : nullptr);
}

// General (batched, broadcast) GEMM; one run_gemm per batch index when the batch dims do not
// collapse into one stride.
class GemmStep final : public Step {
 public:
  GemmStep(const cpu::GemmParams& base, int nb, const int64_t* bshape, const int64_t* as,
           const int64_t* bs, const int64_t* rs)
      : base_(base), nb_(nb) {
    for (int d = 0; d < nb; ++d) bshape_[d] = bshape[d], as_[d] = as[d], bs_[d] = bs[d], rs_[d] = rs[d];
    batches_ = 1;
    for (int d = 0; d < nb; ++d) batches_ *= bshape_[d];
  }
  void run(cpu::Parallel& par) override {
    if (nb_ == 0) {
      cpu::run_gemm(base_, par);
      return;
    }
    const int64_t cstride = int64_t(base_.M) * base_.N;
    for (int64_t t = 0; t < batches_; ++t) {
      int64_t oa = 0, ob = 0, orr = 0, rem = t;
      for (int d = nb_ - 1; d >= 0; --d) {
        const int64_t i = rem % bshape_[d];
        rem /= bshape_[d];
        oa += i * as_[d], ob += i * bs_[d], orr += i * rs_[d];
      }
      cpu::GemmParams g = base_;
      if (g.a) g.a += oa;
      if (g.b) g.b += ob;
      if (g.ep.residual) g.ep.residual += orr;
      g.c += t * cstride;
      cpu::run_gemm(g, par);
    }
  }
  size_t scratch_floats(int threads) const override { return cpu::gemm_scratch_floats(base_, threads); }
  size_t workspace_floats(int threads) const override { return cpu::gemm_workspace_floats(base_, threads); }
  void bind_workspace(float* ws) override { base_.workspace = ws; }

 private:
  cpu::GemmParams base_;
  int nb_;
  int64_t bshape_[cpu::kMaxRank] = {}, as_[cpu::kMaxRank] = {}, bs_[cpu::kMaxRank] = {}, rs_[cpu::kMaxRank] = {};
  int64_t batches_;
};

std::unique_ptr<Step> make_gemm(Args& a) {
  cpu::GemmParams g;
  g.M = a.i32(), g.N = a.i32(), g.K = a.i32();
  const bool a_packed = a.i() != 0;
  g.a_rs = a.i(), g.a_cs = a.i();
  const bool b_packed = a.i() != 0;
  g.b_rs = a.i(), g.b_cs = a.i();
  const int bias_mode = a.i32();
  g.ep.res_rs = a.i(), g.ep.res_cs = a.i();
  g.ep.act = Act(a.i32());
  const int nb = a.i32();
  int64_t bshape[cpu::kMaxRank], as[cpu::kMaxRank], bs[cpu::kMaxRank], rs[cpu::kMaxRank];
  read_dims(a, nb, bshape);
  read_dims(a, nb, as);
  read_dims(a, nb, bs);
  read_dims(a, nb, rs);
  g.ep.alpha = a.f(), g.ep.beta = a.f(), g.ep.act_a = a.f(), g.ep.act_b = a.f();
  float* pa = a.need(0);
  float* pb = a.need(1);
  if (a_packed) {
    if (a.t(0).numel() != int64_t(cpu::packed_a_floats(g.M, g.K))) a.fail("packed A has the wrong size");
    g.a_packed = pa;
  } else {
    g.a = pa;
  }
  if (b_packed) {
    if (a.t(1).numel() != int64_t(cpu::packed_b_floats(g.K, g.N))) a.fail("packed B has the wrong size");
    g.b_packed = pb;
  } else {
    g.b = pb;
  }
  g.ep.bias = a.p(2);
  g.ep.bias_per_row = bias_mode == 1;
  if (!g.ep.bias != (bias_mode == 0)) a.fail("bias mode and bias tensor disagree");
  g.ep.residual = a.p(3);
  g.c = a.need(4);
  g.ldc = g.N;
  g.c_bs = int64_t(g.M) * g.N;
  return std::make_unique<GemmStep>(g, nb, bshape, as, bs, rs);
}

class PoolStep final : public Step {
 public:
  PoolStep(const cpu::Pool2dParams& p, bool max) : p_(p), max_(max) {}
  void run(cpu::Parallel& par) override {
    if (max_) cpu::run_maxpool2d(p_, par);
    else cpu::run_avgpool2d(p_, par);
  }
  size_t scratch_floats(int) const override { return cpu::pool2d_scratch_floats(p_); }

 private:
  cpu::Pool2dParams p_;
  bool max_;
};

cpu::Pool2dParams read_pool(Args& a) {
  cpu::Pool2dParams p;
  const auto& xs = a.shape(0);
  const auto& ys = a.shape(1);
  if (xs.size() != 4 || ys.size() != 4) a.fail("x and y must be 4-D");
  p.N = int(xs[0]), p.C = int(xs[1]), p.H = int(xs[2]), p.W = int(xs[3]);
  p.OH = int(ys[2]), p.OW = int(ys[3]);
  p.KH = a.i32(), p.KW = a.i32(), p.SH = a.i32(), p.SW = a.i32();
  p.PT = a.i32(), p.PL = a.i32(), p.PB = a.i32(), p.PR = a.i32();
  p.DH = a.i32(), p.DW = a.i32();
  p.count_include_pad = a.i() != 0;
  p.x = a.need(0), p.y = a.need(1);
  p.y_bs = a.t(1).batch_stride;
  if (a.tensors() > 2) {  // average pools: an input affine (scale, shift per channel), then a ReLU flag
    if (!a.has_int()) a.fail("an input affine needs its ReLU flag");
    p.in_relu = a.i() != 0;
    p.in_scale = a.need(2), p.in_shift = a.need(3);
    if (a.t(2).numel() != p.C || a.t(3).numel() != p.C) a.fail("input scale and shift need one value a channel");
  }
  return p;
}

class GlobalPoolStep final : public Step {
 public:
  GlobalPoolStep(cpu::GlobalPool k, int64_t outer, int64_t inner, const float* x, float* y)
      : k_(k), outer_(outer), inner_(inner), x_(x), y_(y) {}
  void run(cpu::Parallel& par) override { cpu::run_global_pool(k_, outer_, inner_, x_, y_, par); }

 private:
  cpu::GlobalPool k_;
  int64_t outer_, inner_;
  const float* x_;
  float* y_;
};

class ConcatStep final : public Step {
 public:
  ConcatStep(int64_t outer, std::vector<const float*> in, std::vector<int64_t> chunks, float* y)
      : in_(std::move(in)), chunks_(std::move(chunks)) {
    p_.outer = outer;
    p_.count = int(in_.size());
    p_.inputs = in_.data();
    p_.chunks = chunks_.data();
    p_.y = y;
  }
  void run(cpu::Parallel& par) override { cpu::run_concat(p_, par); }

 private:
  std::vector<const float*> in_;
  std::vector<int64_t> chunks_;
  cpu::ConcatParams p_;
};

class CopyStep final : public Step {
 public:
  CopyStep(const float* x, float* y, int64_t n) : x_(x), y_(y), n_(n) {}
  void run(cpu::Parallel&) override {
    if (x_ != y_) std::memmove(y_, x_, size_t(n_) * sizeof(float));
  }

 private:
  const float* x_;
  float* y_;
  int64_t n_;
};

const KernelRegistrar kRegistered[] = {
      {"conv2d", make_conv2d},
      {"gemm", make_gemm},
      {"maxpool2d",
       [](Args& a) -> std::unique_ptr<Step> {
         const cpu::Pool2dParams p = read_pool(a);
         if (p.in_scale) a.fail("max pools take no input affine");
         return std::make_unique<PoolStep>(p, true);
       }},
      {"avgpool2d", [](Args& a) -> std::unique_ptr<Step> { return std::make_unique<PoolStep>(read_pool(a), false); }},
      {"global_pool",
       [](Args& a) -> std::unique_ptr<Step> {
         const auto& xs = a.shape(0);
         if (xs.size() < 2) a.fail("x must have at least 2 dims");
         int64_t inner = 1;
         for (size_t d = 2; d < xs.size(); ++d) inner *= xs[d];
         return std::make_unique<GlobalPoolStep>(cpu::GlobalPool(a.i32()), xs[0] * xs[1], inner, a.need(0), a.need(1));
       }},
      {"lrn",
       [](Args& a) {
         cpu::LrnParams p;
         const auto& xs = a.shape(0);
         if (xs.size() < 2) a.fail("x must have at least 2 dims");
         p.N = xs[0], p.C = xs[1], p.HW = 1;
         for (size_t d = 2; d < xs.size(); ++d) p.HW *= xs[d];
         p.size = a.i32();
         p.alpha = a.f(), p.beta = a.f(), p.bias = a.f();
         p.x = a.need(0), p.y = a.need(1);
         return simple<cpu::LrnParams, cpu::run_lrn>(p);
       }},
      {"unary",
       [](Args& a) {
         cpu::UnaryParams p;
         p.op = cpu::Unary(a.i32());
         p.a = a.f(), p.b = a.f();
         p.n = a.t(0).numel();
         p.x = a.need(0), p.y = a.need(1);
         return simple<cpu::UnaryParams, cpu::run_unary>(p);
       }},
      {"binary",
       [](Args& a) {
         cpu::BinaryParams p;
         p.op = cpu::Binary(a.i32());
         p.act = Act(a.i32());
         p.rank = a.i32();
         read_dims(a, p.rank, p.shape);
         read_dims(a, p.rank, p.a_strides);
         read_dims(a, p.rank, p.b_strides);
         p.act_a = a.f(), p.act_b = a.f();
         p.a = a.need(0), p.b = a.need(1), p.y = a.need(2);
         if (a.tensors() > 3) {
           p.residual = a.need(3);
           if (a.t(3).numel() != a.t(2).numel()) a.fail("the residual must have the output's size");
         }
         return simple<cpu::BinaryParams, cpu::run_binary>(p);
       }},
      {"channel_affine",
       [](Args& a) {
         cpu::ChannelAffineParams p;
         const auto& xs = a.shape(0);
         if (xs.size() < 2) a.fail("x must have at least 2 dims");
         p.N = xs[0], p.C = xs[1], p.inner = 1;
         for (size_t d = 2; d < xs.size(); ++d) p.inner *= xs[d];
         p.act = Act(a.i32());
         p.act_a = a.f(), p.act_b = a.f();
         p.x = a.need(0), p.scale = a.need(1), p.shift = a.need(2), p.y = a.need(3);
         return simple<cpu::ChannelAffineParams, cpu::run_channel_affine>(p);
       }},
      {"reduce",
       [](Args& a) {
         cpu::ReduceParams p;
         p.op = cpu::Reduce(a.i32());
         p.rank = a.i32();
         read_dims(a, p.rank, p.shape);
         int64_t flags[cpu::kMaxRank];
         read_dims(a, p.rank, flags);
         for (int d = 0; d < p.rank; ++d) p.reduced[d] = flags[d] != 0;
         p.x = a.need(0), p.y = a.need(1);
         return simple<cpu::ReduceParams, cpu::run_reduce>(p);
       }},
      {"softmax",
       [](Args& a) {
         cpu::SoftmaxParams p;
         p.outer = a.i(), p.axis = a.i(), p.inner = a.i(), p.log = a.i() != 0;
         p.x = a.need(0), p.y = a.need(1);
         return simple<cpu::SoftmaxParams, cpu::run_softmax>(p);
       }},
      {"lp_normalize",
       [](Args& a) {
         cpu::LpNormParams p;
         p.outer = a.i(), p.axis = a.i(), p.inner = a.i(), p.p = a.i32();
         p.x = a.need(0), p.y = a.need(1);
         return simple<cpu::LpNormParams, cpu::run_lp_normalize>(p);
       }},
      {"concat",
       [](Args& a) -> std::unique_ptr<Step> {
         const int64_t outer = a.i();
         const size_t n = a.tensors() - 1;
         std::vector<const float*> in;
         std::vector<int64_t> chunks;
         for (size_t k = 0; k < n; ++k) {  // an absent input was written in place already
           chunks.push_back(a.i());
           in.push_back(a.p(k));
         }
         return std::make_unique<ConcatStep>(outer, std::move(in), std::move(chunks), a.need(n));
       }},
      {"transpose",
       [](Args& a) {
         cpu::TransposeParams p;
         p.rank = a.i32();
         read_dims(a, p.rank, p.shape);
         int64_t perm[cpu::kMaxRank];
         read_dims(a, p.rank, perm);
         for (int d = 0; d < p.rank; ++d) p.perm[d] = int(perm[d]);
         p.x = a.need(0), p.y = a.need(1);
         return simple<cpu::TransposeParams, cpu::run_transpose>(p);
       }},
      {"pad",
       [](Args& a) {
         cpu::PadParams p;
         p.mode = cpu::PadMode(a.i32());
         p.rank = a.i32();
         read_dims(a, p.rank, p.shape);
         read_dims(a, p.rank, p.begin);
         read_dims(a, p.rank, p.end);
         p.value = a.f();
         p.x = a.need(0), p.y = a.need(1);
         return simple<cpu::PadParams, cpu::run_pad>(p);
       }},
      {"copy",
       [](Args& a) -> std::unique_ptr<Step> {
         if (a.t(0).numel() != a.t(1).numel()) a.fail("copy between tensors of different sizes");
         return std::make_unique<CopyStep>(a.need(0), a.need(1), a.t(0).numel());
       }},
};

}  // namespace

std::map<std::string, Builder>& kernel_registry() {
  static std::map<std::string, Builder> registry;
  return registry;
}

KernelRegistrar::KernelRegistrar(const char* name, Builder builder) {
  auto& reg = kernel_registry();
  if (!reg.emplace(name, std::move(builder)).second)
    throw std::logic_error(std::string("kernel '") + name + "' registered twice");
}

void Executor::HugePageFree::operator()(char* p) const { cpu::huge_page_free(p); }

std::vector<std::string> kernel_names() {
  std::vector<std::string> out;
  for (const auto& kv : kernel_registry()) out.push_back(kv.first);
  return out;
}

Executor::Executor(std::shared_ptr<ThreadPool> pool, int64_t arena_bytes, std::vector<ConstantData> constants,
                   const std::vector<StepSpec>& steps, std::vector<TensorRef> inputs,
                   std::vector<TensorRef> outputs)
    : pool_(std::move(pool)),
      arena_bytes_(arena_bytes),
      constants_(std::move(constants)),
      inputs_(std::move(inputs)),
      outputs_(std::move(outputs)) {
  if (arena_bytes < 0) throw std::invalid_argument("negative arena size");
  arena_.reset(static_cast<char*>(cpu::huge_page_alloc(size_t((arena_bytes + 63) / 64 * 64 + 64))));
  for (const auto& t : inputs_)
    if (t.is_const) throw std::invalid_argument("an input cannot be a constant");
  for (const auto& t : outputs_) tensor_ptr(t);  // validates the reference
  size_t scratch = 0, workspace = 0;
  for (const auto& spec : steps) {
    auto it = kernel_registry().find(spec.kernel);
    if (it == kernel_registry().end()) throw std::invalid_argument("unknown kernel '" + spec.kernel + "'");
    Args args(spec, *this);
    // Batch strides: conv steps' x and y, pools' y (read_pool, make_conv2d); nothing else.
    const bool pool = spec.kernel == "maxpool2d" || spec.kernel == "avgpool2d";
    for (size_t k = 0; k < spec.tensors.size(); ++k)
      if (spec.tensors[k].batch_stride && spec.kernel != "conv2d" && !(pool && k == 1))
        args.fail("takes no tensor with a batch stride here");
    steps_.push_back(it->second(args));
    scratch = std::max(scratch, steps_.back()->scratch_floats(pool_->threads()));
    workspace = std::max(workspace, steps_.back()->workspace_floats(pool_->threads()));
  }
  pool_->reserve_scratch(scratch);
  if (workspace) {
    workspace_.reset(static_cast<char*>(cpu::huge_page_alloc(workspace * sizeof(float))));
    for (auto& s : steps_) s->bind_workspace(reinterpret_cast<float*>(workspace_.get()));
  }
}

float* Executor::tensor_ptr(const TensorRef& t) {
  if (t.is_const) {
    if (t.offset < 0 || size_t(t.offset) >= constants_.size())
      throw std::invalid_argument("constant index out of range");
    const ConstantData& c = constants_[size_t(t.offset)];
    if (c.numel != t.numel())
      throw std::invalid_argument("constant " + std::to_string(t.offset) + " has " +
                                  std::to_string(c.numel) + " floats, the step expects " +
                                  std::to_string(t.numel()));
    return const_cast<float*>(c.data);
  }
  const int64_t bytes = t.extent() * int64_t(sizeof(float));
  if (t.offset < 0 || t.offset % int64_t(sizeof(float)) || t.offset + bytes > arena_bytes_)
    throw std::invalid_argument("tensor outside the arena");
  return reinterpret_cast<float*>(arena_.get() + t.offset);
}

void Executor::run_steps(std::vector<int64_t>* times_ns) {
  using clock = std::chrono::steady_clock;
  if (times_ns) times_ns->assign(steps_.size(), 0);
  for (size_t i = 0; i < steps_.size(); ++i) {
    if (times_ns) {
      auto t0 = clock::now();
      steps_[i]->run(*pool_);
      (*times_ns)[i] = std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now() - t0).count();
    } else {
      steps_[i]->run(*pool_);
    }
  }
  pool_->rest();
}

}  // namespace cbir::runtime
