// Vectorized CPU row loops of the fused cross-entropy, compiled once per CPU capability.
//
// Included by ce_default.cpp, ce_avx2.cpp and ce_avx512.cpp after they define CPU_CAPABILITY
// (the namespace these functions land in) and switch the ISA; see vec_prelude.h for why the
// ISA is switched with a pragma after the common headers.
//
// Design
// - Rows are independent: at::parallel_for over rows, each chunk with its own row buffer of
//   round_up(V, 2W) floats (W = lanes of Vectorized<float>), never an N x V temporary.
// - One sweep over the logits per row. The row is cut into blocks of kBlock elements. For each
//   block: load + convert to fp32 (+ softcap), store z into the row buffer (L2 resident) and take
//   the block max; if it exceeds the running max M, the running sum S is rescaled by exp(M - m)
//   (online log-sum-exp, one scalar exp per block, not per element); then e = exp(z - M) is
//   computed from the L1-resident block, summed per lane and stored over z. The per-block M is
//   kept, so the gradient sweep gets p_j = e_j * exp(M_block - lse) with one multiply: one
//   vector exp per element in total.
// - Accuracy: exp is Sleef's 1-ulp expf (Vectorized::exp, not exp_u20); each lane sums at most
//   kBlock / W terms in fp32 and block sums are accumulated in double, so the relative error of
//   S stays ~1e-7 even for V = 262144. lse, the row loss and the reduction are done in double.
// - Padded tail lanes are set to -inf *after* the softcap (tanh would otherwise map the zero
//   padding to a finite value) so they add exp(-inf) = 0; their z sum contribution is exactly 0.
// - A block whose running max is still -inf (all -inf logits so far) gets e = 0 instead of
//   exp(-inf - -inf) = NaN; a NaN logit makes the row's lse NaN (like torch).
// - Argmax (token accuracy) costs one scalar compare per block: the first block that raised the
//   running max to its final value holds the first argmax; only that block is re-scanned.
// - The target element's gradient is rewritten by a scalar fix-up after the vector sweep, in
//   double from z_y and lse (p_y - 1 cancels badly in fp32 when the model is confident).
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including ce_kernel.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace sftctl {
namespace cpu {
namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int64_t kPair = 2 * kW;  // one Vectorized<BFloat16/Half> holds 2W elements
constexpr int64_t kBlock = 256;    // elements per online-softmax block (multiple of kPair)
static_assert(kBlock % kPair == 0, "kBlock must be a multiple of the pair width");

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Load/store 2W elements (the first n valid; the rest load as 0 and are not stored) as two
// fp32 vectors.
template <typename T>
struct Io {
  static_assert(at::vec::Vectorized<T>::size() == kPair, "reduced-float vector must hold 2W");
  static inline void load(const T* p, int64_t n, Vec& a, Vec& b) {
    auto v = n >= kPair ? at::vec::Vectorized<T>::loadu(p) : at::vec::Vectorized<T>::loadu(p, n);
    std::tie(a, b) = at::vec::convert_to_float<T>(v);
  }
  static inline void store(T* p, int64_t n, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<T>(a, b).store(p, static_cast<int>(std::min(n, kPair)));
  }
};

template <>
struct Io<float> {
  static inline void load(const float* p, int64_t n, Vec& a, Vec& b) {
    if (n >= kPair) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + kW);
    } else {
      a = Vec::loadu(p, std::min(n, kW));
      b = n > kW ? Vec::loadu(p + kW, n - kW) : Vec(0.f);
    }
  }
  static inline void store(float* p, int64_t n, const Vec& a, const Vec& b) {
    if (n >= kPair) {
      a.store(p);
      b.store(p + kW);
    } else {
      a.store(p, std::min(n, kW));
      if (n > kW) b.store(p + kW, n - kW);
    }
  }
};

inline float reduce_max(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, v);
}
inline float reduce_add(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

// softcap * tanh(x / softcap), lane-wise; the scalar path uses the same vector op so that a
// target's z is bit-identical to the z in the row sweep.
inline Vec cap_vec(const Vec& x, const Vec& c) { return c * (x / c).tanh(); }
inline float cap_scalar(float x, float c) {
  float out[kW];
  cap_vec(Vec(x), Vec(c)).store(out);
  return out[0];
}

struct RowCtx {
  int64_t vocab, n_blocks, ignore_index;
  float softcap, eps, z_loss, scale;
  float lscale;  // logit_scale: z = lscale * x (multiplying by 1 is exact, so always applied)
  bool want_grad;
};

// Processes row i; zbuf/ebuf are round_up(V, kPair) floats (ebuf == zbuf without softcap),
// bmax n_blocks floats. Returns the row loss (double). T: logits, G: gradient storage type.
template <typename T, typename G, bool kCap>
double ce_row(const CrossEntropyParams& p, const RowCtx& c, int64_t i, float* zbuf, float* ebuf,
              float* bmax) {
  const int64_t V = c.vocab;
  const int64_t y = p.targets[i];
  G* g = p.grad ? static_cast<G*>(p.grad) + i * p.grad_row_stride : nullptr;
  if (y == c.ignore_index) {
    if (p.lse) p.lse[i] = 0.f;
    if (p.correct) p.correct[i] = false;
    if (g) std::memset(static_cast<void*>(g), 0, sizeof(G) * V);  // all-zero bits are +0 in fp32/bf16/fp16
    return 0.0;
  }
  const T* x = static_cast<const T*>(p.logits) + i * p.logits_row_stride;
  const float ninf = -std::numeric_limits<float>::infinity();
  const Vec vninf(ninf), vcap(c.softcap), vls(c.lscale);

  // Sweep 1: online max / sum of exp / sum of z.
  float M = ninf;
  double S = 0.0, sum_z = 0.0;
  int64_t best_block = -1;
  bool nan_seen = false;
  for (int64_t blk = 0; blk < c.n_blocks; ++blk) {
    const int64_t j0 = blk * kBlock;
    const int64_t len = std::min(kBlock, V - j0);
    const int64_t lenp = round_up(len, kPair);
    float* zb = zbuf + j0;
    Vec vmax(ninf), vzs(0.f);
    for (int64_t j = 0; j < len; j += kPair) {
      const int64_t n = std::min(kPair, len - j);
      Vec a, b;
      Io<T>::load(x + j0 + j, n, a, b);  // 2 x [W] fp32
      a = a * vls;
      b = b * vls;
      if constexpr (kCap) {
        a = cap_vec(a, vcap);
        b = cap_vec(b, vcap);
      }
      vzs += a + b;  // padding lanes are exactly 0 here (tanh(0) = 0)
      if (n < kPair) {  // padding -> -inf after the cap, so it adds exp(-inf) = 0 below
        a = Vec::set(vninf, a, std::min(n, kW));
        b = Vec::set(vninf, b, std::max<int64_t>(n - kW, 0));
      }
      a.store(zb + j);
      b.store(zb + j + kW);
      vmax = at::vec::maximum(vmax, at::vec::maximum(a, b));
    }
    const float mb = reduce_max(vmax);
    if (std::isnan(mb)) nan_seen = true;
    if (mb > M) {
      S *= std::exp(static_cast<double>(M) - static_cast<double>(mb));  // M = -inf: S = 0 * 0
      M = mb;
      best_block = blk;
    }
    bmax[blk] = M;
    sum_z += static_cast<double>(reduce_add(vzs));
    float* eb = ebuf + j0;
    if (M == ninf) {  // nothing finite yet: exp(z - M) would be NaN, the true value is 0
      if (c.want_grad) std::fill(eb, eb + lenp, 0.f);
      continue;
    }
    const Vec vM(M);
    Vec vs(0.f);
    for (int64_t j = 0; j < lenp; j += kW) {
      const Vec e = (Vec::loadu(zb + j) - vM).exp();  // [W], <= 1
      vs += e;
      if (c.want_grad) e.store(eb + j);
    }
    S += static_cast<double>(reduce_add(vs));
  }
  double lse = static_cast<double>(M) + std::log(S);
  if (nan_seen) lse = std::numeric_limits<double>::quiet_NaN();

  float zy = static_cast<float>(x[y]) * c.lscale;
  if constexpr (kCap) zy = cap_scalar(zy, c.softcap);
  const double eps = c.eps;
  double loss = (1.0 - eps) * (lse - zy) + c.z_loss * lse * lse;
  if (eps != 0.0) loss += eps * (lse - sum_z / static_cast<double>(V));

  if (p.lse) p.lse[i] = static_cast<float>(lse);
  if (p.correct) {
    bool ok = false;
    if (best_block >= 0 && !nan_seen && y / kBlock == best_block) {
      // First index of the block whose z equals the final max (same ops as sweep 1).
      const int64_t j0 = best_block * kBlock;
      const int64_t len = std::min(kBlock, V - j0);
      int64_t first = -1;
      float tmp[kPair];
      for (int64_t j = 0; j < len && first < 0; j += kPair) {
        const int64_t n = std::min(kPair, len - j);
        Vec a, b;
        Io<T>::load(x + j0 + j, n, a, b);
        a = a * vls;
        b = b * vls;
        if constexpr (kCap) {
          a = cap_vec(a, vcap);
          b = cap_vec(b, vcap);
        }
        a.store(tmp);
        b.store(tmp + kW);
        for (int64_t k = 0; k < n; ++k) {
          if (tmp[k] == M) {
            first = j0 + j + k;
            break;
          }
        }
      }
      ok = first == y;
    }
    p.correct[i] = ok;
  }

  // Sweep 2: gradient from the cached e, rounded once to G.
  if (g) {
    // this row's factor: reduction scale x logit_scale (dz/dx) x the optional per-row factor
    const double rscale = static_cast<double>(c.scale) * static_cast<double>(c.lscale) *
                          (p.row_scale ? static_cast<double>(p.row_scale[i]) : 1.0);
    const double coef = (1.0 + 2.0 * static_cast<double>(c.z_loss) * lse) * rscale;
    const float c0 = static_cast<float>(rscale * eps / static_cast<double>(V));
    const Vec vc0(c0);
    for (int64_t blk = 0; blk < c.n_blocks; ++blk) {
      const int64_t j0 = blk * kBlock;
      const int64_t len = std::min(kBlock, V - j0);
      const float f = bmax[blk] == ninf
                          ? 0.f
                          : static_cast<float>(std::exp(static_cast<double>(bmax[blk]) - lse) * coef);
      const Vec vf(f);
      const float* eb = ebuf + j0;
      for (int64_t j = 0; j < len; j += kPair) {
        const int64_t n = std::min(kPair, len - j);
        Vec a = Vec::loadu(eb + j) * vf - vc0;  // [W] scale * (p * (1 + 2 z lse) - eps / V)
        Vec b = Vec::loadu(eb + j + kW) * vf - vc0;
        if constexpr (kCap) {  // d(c tanh(x/c))/dx = 1 - tanh^2 = 1 - (z/c)^2
          const Vec ta = Vec::loadu(zbuf + j0 + j) / vcap;
          const Vec tb = Vec::loadu(zbuf + j0 + j + kW) / vcap;
          a = a * (Vec(1.f) - ta * ta);
          b = b * (Vec(1.f) - tb * tb);
        }
        Io<G>::store(g + j0 + j, n, a, b);
      }
    }
    // Target element in double from z_y and lse: p_y * coef - (1 - eps) cancels when p_y -> 1,
    // and fp32 would leave an error of ~1e-7 of the terms instead of the result.
    const double py = std::exp(static_cast<double>(zy) - lse);
    double gy = (py * (1.0 + 2.0 * static_cast<double>(c.z_loss) * lse) - (1.0 - eps) -
                 eps / static_cast<double>(V)) * rscale;
    if constexpr (kCap) {
      const double ty = static_cast<double>(zy) / static_cast<double>(c.softcap);
      gy *= 1.0 - ty * ty;
    }
    g[y] = static_cast<G>(static_cast<float>(gy));
  }
  return loss;
}

template <typename T, typename G, bool kCap>
void ce_rows_t(const CrossEntropyParams& p, const RowCtx& c, double* row_loss) {
  const int64_t padded = round_up(c.vocab, kPair);
  // Rows are heavy for realistic V; small V gets bigger chunks to amortize the buffers.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(c.vocab, 1));
  at::parallel_for(0, p.n_rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf((kCap ? 2 : 1) * padded);
    std::vector<float> bmax(c.n_blocks);
    float* zbuf = buf.data();
    float* ebuf = kCap ? buf.data() + padded : zbuf;
    for (int64_t i = begin; i < end; ++i) {
      row_loss[i] = ce_row<T, G, kCap>(p, c, i, zbuf, ebuf, bmax.data());
    }
  });
}

template <typename T, typename G>
void ce_rows_dtype(const CrossEntropyParams& p, const RowCtx& c, double* row_loss) {
  if (c.softcap > 0.f) {
    ce_rows_t<T, G, true>(p, c, row_loss);
  } else {
    ce_rows_t<T, G, false>(p, c, row_loss);
  }
}

void ce_rows(const CrossEntropyParams& p, float scale, double* row_loss) {
  RowCtx c;
  c.vocab = p.vocab;
  c.n_blocks = (p.vocab + kBlock - 1) / kBlock;
  c.ignore_index = p.ignore_index;
  c.softcap = p.softcap;
  c.eps = p.label_smoothing;
  c.z_loss = p.z_loss;
  c.scale = scale;
  c.lscale = p.logit_scale;
  c.want_grad = p.grad != nullptr;
  const DType gd = grad_dtype_of(p);
  switch (p.dtype) {
    case DType::Float32:
      // fp32 logits may store their gradient in bf16/fp16 (the fused linear cross-entropy)
      if (gd == DType::BFloat16)
        ce_rows_dtype<float, c10::BFloat16>(p, c, row_loss);
      else if (gd == DType::Float16)
        ce_rows_dtype<float, c10::Half>(p, c, row_loss);
      else
        ce_rows_dtype<float, float>(p, c, row_loss);
      break;
    case DType::BFloat16:
      ce_rows_dtype<c10::BFloat16, c10::BFloat16>(p, c, row_loss);
      break;
    case DType::Float16:
      ce_rows_dtype<c10::Half, c10::Half>(p, c, row_loss);
      break;
  }
}

template <typename T>
void scale_rows_t(T* grad, int64_t n_rows, int64_t vocab, int64_t row_stride, const float* go,
                  bool per_row, float gs) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float num = per_row ? go[i] : go[0];
      if (num == gs) continue;  // the common case: nothing to write
      const Vec vf(num / gs);
      T* row = grad + i * row_stride;
      for (int64_t j = 0; j < vocab; j += kPair) {
        const int64_t n = std::min(kPair, vocab - j);
        Vec a, b;
        Io<T>::load(row + j, n, a, b);
        Io<T>::store(row + j, n, a * vf, b * vf);
      }
    }
  });
}

void scale_rows(void* grad, DType dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
                const float* grad_output, bool per_row, float grad_scale) {
  switch (dtype) {
    case DType::Float32:
      scale_rows_t(static_cast<float*>(grad), n_rows, vocab, row_stride, grad_output, per_row,
                   grad_scale);
      break;
    case DType::BFloat16:
      scale_rows_t(static_cast<c10::BFloat16*>(grad), n_rows, vocab, row_stride, grad_output,
                   per_row, grad_scale);
      break;
    case DType::Float16:
      scale_rows_t(static_cast<c10::Half*>(grad), n_rows, vocab, row_stride, grad_output, per_row,
                   grad_scale);
      break;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace sftctl
