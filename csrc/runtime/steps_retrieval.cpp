// Step builders of the retrieval-head kernels (fused NetVLAD, GeM, sign).
#include <memory>

#include "cpu/netvlad.h"
#include "runtime/step.h"

namespace cbir::runtime {
namespace {

class NetVladStep final : public Step {
 public:
  explicit NetVladStep(const cpu::NetVladParams& p) : p_(p) {}
  void run(cpu::Parallel& par) override { cpu::run_netvlad(p_, par); }
  size_t scratch_floats(int) const override { return cpu::netvlad_scratch_floats(p_); }

 private:
  cpu::NetVladParams p_;
};

// tensors: x [N, D, ...], w [K, D], b [K] (optional), c [K, D], y [N, K * D];
// ints: normalize_input; floats: eps_in, eps_intra, eps_out.
std::unique_ptr<Step> make_netvlad(Args& a) {
  cpu::NetVladParams p;
  const auto& xs = a.shape(0);
  const auto& ws = a.shape(1);
  if (xs.size() < 2 || ws.size() != 2) a.fail("x must be [N, D, ...] and w [K, D]");
  p.N = xs[0], p.D = xs[1], p.HW = 1;
  for (size_t d = 2; d < xs.size(); ++d) p.HW *= xs[d];
  p.K = ws[0];
  if (ws[1] != p.D) a.fail("w has the wrong descriptor size");
  if (a.t(3).numel() != p.K * p.D) a.fail("centroids must be [K, D]");
  if (a.t(4).numel() != p.N * p.K * p.D) a.fail("y must be [N, K * D]");
  if (a.t(2).present && a.t(2).numel() != p.K) a.fail("b must be [K]");
  p.normalize_input = a.i() != 0;
  p.eps_in = a.f(), p.eps_intra = a.f(), p.eps_out = a.f();
  p.x = a.need(0), p.w = a.need(1), p.b = a.p(2), p.c = a.need(3), p.y = a.need(4);
  return std::make_unique<NetVladStep>(p);
}

// tensors: x [N, C, ...], y [N, C, 1...]; floats: p, q, eps.
std::unique_ptr<Step> make_gem(Args& a) {
  cpu::GemParams p;
  const auto& xs = a.shape(0);
  if (xs.size() < 3) a.fail("x must be [N, C, spatial...]");
  p.rows = xs[0] * xs[1];
  p.inner = 1;
  for (size_t d = 2; d < xs.size(); ++d) p.inner *= xs[d];
  if (a.t(1).numel() != p.rows) a.fail("y must hold one value per (n, c)");
  p.p = a.f(), p.q = a.f(), p.eps = a.f();
  p.x = a.need(0), p.y = a.need(1);
  return simple<cpu::GemParams, cpu::run_gem>(p);
}

struct SignParams {
  const float* x;
  float* y;
  int64_t n;
};
void run_sign_step(const SignParams& p, cpu::Parallel& par) { cpu::run_sign(p.x, p.y, p.n, par); }

std::unique_ptr<Step> make_sign(Args& a) {
  if (a.t(0).numel() != a.t(1).numel()) a.fail("x and y differ in size");
  return simple<SignParams, run_sign_step>({a.need(0), a.need(1), a.t(0).numel()});
}

const KernelRegistrar reg_netvlad{"netvlad", make_netvlad};
const KernelRegistrar reg_gem{"gem", make_gem};
const KernelRegistrar reg_sign{"sign", make_sign};

}  // namespace
}  // namespace cbir::runtime
