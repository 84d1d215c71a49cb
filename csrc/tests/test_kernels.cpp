// ctest executable: the CPU kernels of sftctl against plain double-precision loops.
//
// Fills the torch-free params structs directly (no tensors, no dispatcher), so it checks the
// kernels themselves: every compiled CPU variant this machine can run (baseline, AVX2, AVX-512
// row loops called directly) and the dispatching entry points (validation, reductions), over
// several shapes, dtypes and options. Criteria match the Python tests: loss and lse relative
// error <= 1e-6 against double; the gradient's max error <= 2x the max error of rounding the
// double gradient to the logits' dtype, plus 1e-6 of the largest element and 3e-7 of the largest
// summed term (fp32 cancellation in p * c - eps / V).
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "kernels/params.h"

using namespace sftctl;

namespace {

int g_failures = 0;
int g_checks = 0;

void expect(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

template <typename T>
DType dtype_of();
template <>
DType dtype_of<float>() { return DType::Float32; }
template <>
DType dtype_of<c10::BFloat16>() { return DType::BFloat16; }
template <>
DType dtype_of<c10::Half>() { return DType::Float16; }

template <typename T>
const char* name_of();
template <>
const char* name_of<float>() { return "fp32"; }
template <>
const char* name_of<c10::BFloat16>() { return "bf16"; }
template <>
const char* name_of<c10::Half>() { return "fp16"; }

struct Options {
  float eps = 0.f, z_loss = 0.f, softcap = 0.f;
  Reduction reduction = Reduction::Mean;
  bool use_normalizer = false;
  float normalizer = 0.f;
  float grad_scale = 1.f;
  bool use_grad_scale = false;
  bool inplace = false;
  std::string label() const {
    char b[200];
    std::snprintf(b, sizeof(b), "red=%d eps=%g z=%g cap=%g norm=%s gs=%g%s",
                  static_cast<int>(reduction), eps, z_loss, softcap,
                  use_normalizer ? std::to_string(normalizer).c_str() : "-", grad_scale,
                  inplace ? " inplace" : "");
    return b;
  }
};

struct Reference {
  std::vector<double> row_loss, lse, grad;  // grad [N, V]
  std::vector<bool> correct;
  double loss = 0.0, term_max = 0.0;
};

// Plain double loops; x holds the logits' exact values.
Reference reference(const std::vector<double>& x, const std::vector<int64_t>& y, int64_t N,
                    int64_t V, const Options& o, int64_t ignore) {
  Reference r;
  r.row_loss.assign(N, 0.0);
  r.lse.assign(N, 0.0);
  r.correct.assign(N, false);
  r.grad.assign(N * V, 0.0);
  int64_t n_valid = 0;
  for (int64_t i = 0; i < N; ++i) n_valid += y[i] != ignore;
  double scale = o.grad_scale;
  double div = 1.0;
  if (o.reduction == Reduction::Mean) {
    div = o.use_normalizer ? o.normalizer : static_cast<double>(n_valid);
    scale = div == 0.0 ? 0.0 : scale / div;
  }
  std::vector<double> z(V);
  double total = 0.0;
  for (int64_t i = 0; i < N; ++i) {
    if (y[i] == ignore) continue;
    double m = -INFINITY, sum_z = 0.0;
    int64_t arg = 0;
    for (int64_t j = 0; j < V; ++j) {
      const double v = x[i * V + j];
      z[j] = o.softcap > 0 ? o.softcap * std::tanh(v / o.softcap) : v;
      if (z[j] > m) {
        m = z[j];
        arg = j;
      }
      sum_z += z[j];
    }
    double s = 0.0;
    for (int64_t j = 0; j < V; ++j) s += std::exp(z[j] - m);
    const double lse = m + std::log(s);
    const double eps = o.eps;
    double loss = (1 - eps) * (lse - z[y[i]]) + o.z_loss * lse * lse;
    if (eps != 0) loss += eps * (lse - sum_z / V);
    r.row_loss[i] = loss;
    r.lse[i] = lse;
    r.correct[i] = arg == y[i];
    total += loss;
    const double coef = 1 + 2 * o.z_loss * lse;
    for (int64_t j = 0; j < V; ++j) {
      const double p = std::exp(z[j] - lse);
      double g = p * coef - eps / V - (j == y[i] ? 1 - eps : 0.0);
      if (o.softcap > 0) {
        const double t = z[j] / o.softcap;
        g *= 1 - t * t;
      }
      r.grad[i * V + j] = g * scale;
    }
    r.term_max = std::max(r.term_max, std::abs(scale) * coef);
  }
  r.loss = o.reduction == Reduction::Sum ? total
           : o.reduction == Reduction::Mean ? (div == 0.0 ? 0.0 : total / div)
                                            : 0.0;
  return r;
}

bool close_rel(double got, double want, double rel = 1e-6, double abs_ = 1e-7) {
  if (std::isnan(want)) return std::isnan(got);
  return std::abs(got - want) <= rel * std::abs(want) + abs_;
}

template <typename T>
double round_to(double v) {
  return static_cast<double>(static_cast<float>(T(static_cast<float>(v))));
}
template <>
double round_to<float>(double v) {
  return static_cast<double>(static_cast<float>(v));
}

template <typename T>
void check_case(int64_t N, int64_t V, const Options& o, double ignore_frac, uint32_t seed,
                const std::vector<std::pair<std::string, std::function<void(
                    const CrossEntropyParams&, float, double*)>>>& variants) {
  const int64_t ignore = -100;
  const int64_t stride = V + (seed % 3 == 0 ? 7 : 0);  // sometimes a padded row stride
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.f, o.softcap > 0 ? 10.f : 3.f);
  std::uniform_real_distribution<float> unif(0.f, 1.f);
  std::vector<T> logits(N * stride, T(0.f));
  std::vector<double> x(N * V);
  std::vector<int64_t> y(N);
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t j = 0; j < V; ++j) {
      logits[i * stride + j] = T(normal(gen));
      x[i * V + j] = static_cast<double>(static_cast<float>(logits[i * stride + j]));
    }
    y[i] = unif(gen) < ignore_frac ? ignore : static_cast<int64_t>(gen() % V);
  }
  const Reference r = reference(x, y, N, V, o, ignore);
  const std::string label = std::string(name_of<T>()) + " " + std::to_string(N) + "x" +
                            std::to_string(V) + " " + o.label();

  CrossEntropyParams p;
  p.logits_row_stride = stride;
  p.targets = y.data();
  p.n_rows = N;
  p.vocab = V;
  p.ignore_index = ignore;
  p.dtype = dtype_of<T>();
  p.reduction = o.reduction;
  p.label_smoothing = o.eps;
  p.z_loss = o.z_loss;
  p.softcap = o.softcap;
  const float normalizer = o.normalizer, grad_scale = o.grad_scale;
  p.normalizer = o.use_normalizer ? &normalizer : nullptr;
  p.grad_scale = o.use_grad_scale ? &grad_scale : nullptr;

  auto check_grad = [&](const T* g, int64_t gstride, const std::string& who) {
    double err = 0, rounding = 0, gmax = 0;
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t j = 0; j < V; ++j) {
        const double want = r.grad[i * V + j];
        err = std::max(err, std::abs(static_cast<double>(static_cast<float>(g[i * gstride + j])) - want));
        rounding = std::max(rounding, std::abs(round_to<T>(want) - want));
        gmax = std::max(gmax, std::abs(want));
      }
    }
    const double tol = 2 * rounding + 1e-6 * gmax + 3e-7 * r.term_max + 1e-12;
    char b[160];
    std::snprintf(b, sizeof(b), " grad err %.3e > tol %.3e", err, tol);
    expect(err <= tol, who + " " + label + b);
  };

  // 1) The dispatching entry point: reduction, lse, correct, gradient.
  {
    std::vector<T> work = logits;  // memory mode writes here
    std::vector<T> grad(o.inplace ? 0 : N * V);
    std::vector<float> loss(o.reduction == Reduction::None ? N : 1), lse(N);
    std::vector<char> correct(N);
    p.logits = work.data();
    p.loss = loss.data();
    p.lse = lse.data();
    p.correct = reinterpret_cast<bool*>(correct.data());
    p.grad = o.inplace ? static_cast<void*>(work.data()) : static_cast<void*>(grad.data());
    p.grad_row_stride = o.inplace ? stride : V;
    cpu::cross_entropy_forward(p);
    if (o.reduction == Reduction::None) {
      for (int64_t i = 0; i < N; ++i)
        expect(close_rel(loss[i], r.row_loss[i]), "row loss " + label);
    } else {
      expect(close_rel(loss[0], r.loss), "loss " + label + " got " + std::to_string(loss[0]) +
                                             " want " + std::to_string(r.loss));
    }
    for (int64_t i = 0; i < N; ++i) {
      expect(close_rel(lse[i], r.lse[i]), "lse " + label);
      expect(static_cast<bool>(correct[i]) == r.correct[i], "correct " + label);
    }
    check_grad(o.inplace ? work.data() : grad.data(), o.inplace ? stride : V,
               std::string("entry/") + cpu::kernel_capability());
  }
  // 2) Each runnable capability's row loop directly (per-row loss, gradient).
  if (o.inplace) return;
  const float scale = static_cast<float>(
      o.reduction == Reduction::Mean
          ? [&] {
              int64_t n_valid = 0;
              for (int64_t i = 0; i < N; ++i) n_valid += y[i] != ignore;
              const double div = o.use_normalizer ? o.normalizer : n_valid;
              return div == 0.0 ? 0.0 : o.grad_scale / div;
            }()
          : o.grad_scale);
  for (const auto& [vname, fn] : variants) {
    std::vector<T> grad(N * V);
    std::vector<double> row_loss(N);
    p.logits = logits.data();
    p.lse = nullptr;
    p.correct = nullptr;
    p.grad = grad.data();
    p.grad_row_stride = V;
    fn(p, scale, row_loss.data());
    for (int64_t i = 0; i < N; ++i)
      expect(close_rel(row_loss[i], r.row_loss[i]), vname + " row loss " + label);
    check_grad(grad.data(), V, vname);
  }
}

template <typename T>
void scale_grad_case() {
  const int64_t N = 3, V = 70;
  std::vector<T> g(N * V);
  for (int64_t k = 0; k < N * V; ++k) g[k] = T(static_cast<float>(k % 13) - 6.f);
  const std::vector<T> orig = g;
  const float go_same = 4.f, gs = 4.f;
  cpu::scale_grad(g.data(), dtype_of<T>(), N, V, V, &go_same, false, &gs);
  bool same = true;
  for (int64_t k = 0; k < N * V; ++k) same &= static_cast<float>(g[k]) == static_cast<float>(orig[k]);
  expect(same, std::string("scale_grad no-op ") + name_of<T>());
  const float per_row[3] = {2.f, 4.f, 0.5f};
  cpu::scale_grad(g.data(), dtype_of<T>(), N, V, V, per_row, true, &gs);
  bool ok = true;
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < V; ++j)
      ok &= static_cast<float>(g[i * V + j]) ==
            static_cast<float>(T(static_cast<float>(orig[i * V + j]) * (per_row[i] / gs)));
  expect(ok, std::string("scale_grad per row ") + name_of<T>());
}

void sft_labels_case() {
  // Two rows, T = 6: row 0 has a 2-token prompt and padding at the end; row 1 packs two
  // documents (position_ids restart at 0) with a loss mask.
  const std::vector<int64_t> ids = {5, 6, 7, 8, 9, 0, 11, 12, 13, 14, 15, 16};
  const std::vector<int64_t> attn = {1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1};
  const std::vector<int64_t> lm = {0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1};
  const std::vector<int64_t> pos = {0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2};
  std::vector<int64_t> labels(12);
  int64_t num = -1;
  SftLabelsParams p;
  p.input_ids = ids.data();
  p.batch = 2;
  p.seq_len = 6;
  p.loss_mask = lm.data();
  p.attention_mask = attn.data();
  p.position_ids = pos.data();
  p.labels = labels.data();
  p.num_trainable = &num;
  cpu::sft_labels(p);
  const std::vector<int64_t> want = {-100, 7, 8, 9, -100, -100, 12, 13, -100, 15, 16, -100};
  expect(labels == want && num == 7, "sft_labels packed + prompt + padding");
}

void invalid_target_case() {
  std::vector<float> logits(2 * 5, 0.f);
  std::vector<int64_t> y = {1, 5};
  float loss = 0.f;
  CrossEntropyParams p;
  p.logits = logits.data();
  p.logits_row_stride = 5;
  p.targets = y.data();
  p.n_rows = 2;
  p.vocab = 5;
  p.loss = &loss;
  bool thrown = false;
  try {
    cpu::cross_entropy_forward(p);
  } catch (const c10::Error& e) {
    thrown = std::string(e.what()).find("targets[1] = 5 is out of range [0, 5)") != std::string::npos;
  }
  expect(thrown, "invalid target raises a clear error");
}

}  // namespace

int main() {
  const std::string cap = at::get_cpu_capability();
  std::vector<std::pair<std::string, std::function<void(const CrossEntropyParams&, float, double*)>>>
      variants = {{"DEFAULT", &cpu::DEFAULT::ce_rows}};
#if defined(SFTCTL_CPU_X86_VARIANTS)
  if (cap == "AVX2" || cap == "AVX512") variants.push_back({"AVX2", &cpu::AVX2::ce_rows});
  if (cap == "AVX512") variants.push_back({"AVX512", &cpu::AVX512::ce_rows});
#endif
  std::printf("ATen CPU capability %s; dispatch picks %s; testing row loops:", cap.c_str(),
              cpu::kernel_capability());
  for (const auto& v : variants) std::printf(" %s", v.first.c_str());
  std::printf("\n");

  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {1, 1}, {5, 123}, {3, 50257}, {17, 1000}, {4, 16 * 17 + 5}, {2, 256}, {2, 257}};
  std::vector<Options> opts;
  for (Reduction red : {Reduction::Mean, Reduction::Sum, Reduction::None}) {
    Options o;
    o.reduction = red;
    opts.push_back(o);
    o.eps = 0.1f;
    opts.push_back(o);
    o.z_loss = 1e-3f;
    o.softcap = 7.f;
    opts.push_back(o);
    o.use_grad_scale = true;
    o.grad_scale = 1024.f;
    o.inplace = true;
    opts.push_back(o);
  }
  Options norm;
  norm.use_normalizer = true;
  norm.normalizer = 37.f;
  opts.push_back(norm);
  norm.normalizer = 0.f;  // zero divisor: loss 0, zero gradient
  opts.push_back(norm);

  uint32_t seed = 1;
  for (const auto& [N, V] : shapes) {
    for (const auto& o : opts) {
      for (double ignore_frac : {0.0, 0.4, 1.0}) {
        check_case<float>(N, V, o, ignore_frac, seed++, variants);
        check_case<c10::BFloat16>(N, V, o, ignore_frac, seed++, variants);
        check_case<c10::Half>(N, V, o, ignore_frac, seed++, variants);
      }
    }
  }
  scale_grad_case<float>();
  scale_grad_case<c10::BFloat16>();
  scale_grad_case<c10::Half>();
  sft_labels_case();
  invalid_target_case();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
