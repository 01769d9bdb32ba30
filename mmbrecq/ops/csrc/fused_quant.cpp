// One-pass CPU kernels for the reconstruction hot loop (see mmbrecq/ops/cpu_kernels.py).
//
// Every kernel reads its inputs once and writes each output once. Values follow the
// torch reference (mmbrecq/quantizers/functional.py, mmbrecq/reconstruction/objective.py)
// operation by operation, in float32 and in the same order, so that element-wise results
// are bit for bit the same (the build uses -ffp-contract=off: no fused multiply-add).
// Reductions accumulate in double: per block of BLOCK elements (LANES independent
// accumulators per sum, combined in a fixed order), then the block sums in block order.
// The block partition does not depend on the number of threads, so the sums are
// deterministic.
//
// Instruction sets: the build flags stay generic (the compiled module is cached on disk
// and may be loaded on another CPU), and the hot loops are compiled three times, for the
// baseline, AVX2 and AVX-512 (x86-64 with GCC), choosing one at run time from what the
// CPU supports. This file includes itself for that: the part between the #else and the
// #endif below is the loop code, compiled once per instruction set in its own namespace.
// All versions execute the same IEEE operations in the same order, so they give the same
// bits (tests compare them).
#ifndef MMBRECQ_FUSED_QUANT_BODY

// (the few headers needed rather than <torch/extension.h>: halves the first-use build time)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t BLOCK = 1 << 15;  // elements per reduction block (and parallel grain)
constexpr int CHUNK = 256;          // elements per inner chunk of a block
constexpr int LANES = 8;            // independent double accumulators per sum

struct Grid {
  float s, z, qmin, qmax;
};

// the logarithmic grid: delta, codes per octave, top code, mantissa thresholds
struct LogGrid {
  float delta;
  int32_t k, qmax, t0, t1;
};

}  // namespace

#define MMBRECQ_FUSED_QUANT_BODY
namespace {
namespace isa_base {
#include __FILE__
}  // namespace isa_base
}  // namespace

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MMBRECQ_MULTI_ISA 1
#pragma GCC push_options
#pragma GCC target("avx2")
namespace {
namespace isa_avx2 {
#include __FILE__
}  // namespace isa_avx2
}  // namespace
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,avx512f,avx512bw,avx512vl,avx512dq")
namespace {
namespace isa_avx512 {
#include __FILE__
}  // namespace isa_avx512
}  // namespace
#pragma GCC pop_options
#endif
#undef MMBRECQ_FUSED_QUANT_BODY

namespace {

// -- instruction set dispatch ------------------------------------------------------------
struct Kernels {
  const char* name;
  decltype(&isa_base::fake_quant) fake_quant;
  decltype(&isa_base::squared_error) squared_error;
  decltype(&isa_base::adaround_soft) adaround_soft;
  decltype(&isa_base::adaround_offset) adaround_offset;
  decltype(&isa_base::adaround_reg) adaround_reg;
  decltype(&isa_base::log_quant) log_quant;
  decltype(&isa_base::backward_from_x) backward_from_x;
};

#define MMBRECQ_KERNELS(ns)                                                                  \
  Kernels {                                                                                  \
    #ns, &ns::fake_quant, &ns::squared_error, &ns::adaround_soft, &ns::adaround_offset,       \
        &ns::adaround_reg, &ns::log_quant, &ns::backward_from_x                              \
  }

std::vector<Kernels> supported_kernels() {
  std::vector<Kernels> k{MMBRECQ_KERNELS(isa_base)};
#ifdef MMBRECQ_MULTI_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) {
    k.push_back(MMBRECQ_KERNELS(isa_avx2));
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      k.push_back(MMBRECQ_KERNELS(isa_avx512));
    }
  }
#endif
  return k;
}

const std::vector<Kernels>& all_kernels() {
  static const std::vector<Kernels> k = supported_kernels();
  return k;
}

int& level() {
  static int l = static_cast<int>(all_kernels().size()) - 1;  // the best one
  return l;
}

const Kernels& kernels() { return all_kernels()[level()]; }

// names of the supported instruction set versions, baseline first
std::vector<std::string> isa_names() {
  std::vector<std::string> names;
  for (const auto& k : all_kernels()) names.emplace_back(k.name);
  return names;
}

// use version ``name`` (one of isa_names()); returns the one used before
std::string set_isa(const std::string& name) {
  const std::string before = kernels().name;
  const auto& all = all_kernels();
  for (size_t i = 0; i < all.size(); ++i) {
    if (name == all[i].name) {
      level() = static_cast<int>(i);
      return before;
    }
  }
  TORCH_CHECK(false, "instruction set version ", name, " is not supported here");
}

std::string current_isa() { return kernels().name; }

// -- tensor checks -----------------------------------------------------------------------
Grid make_grid(double s, double z, int64_t qmin, int64_t qmax) {
  return Grid{static_cast<float>(s), static_cast<float>(z), static_cast<float>(qmin),
              static_cast<float>(qmax)};
}

void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
}

// A tensor whose elements occupy exactly numel() consecutive floats (contiguous,
// channels-last, any permutation): element-wise kernels can then run on the raw buffer.
at::Tensor dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

// ``t`` laid out with the same strides as the dense ``like`` (one copy when they differ,
// e.g. for the expanded gradient of a ``.sum()``).
at::Tensor same_layout(const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == like.sizes(), "shapes differ: ", t.sizes(), " and ", like.sizes());
  if (t.strides() == like.strides() && t.is_non_overlapping_and_dense()) return t;
  return at::empty_like(like, t.options()).copy_(t);
}

// -- 1. fake-quant forward ---------------------------------------------------------------
// Returns [out, dscale (if need_dscale), inside as bool (if need_mask)]; the optional
// ones are undefined (None in Python) otherwise. Outputs have the layout of x when x is
// dense (e.g. channels-last), contiguous otherwise.
std::vector<at::Tensor> fake_quant_forward(const at::Tensor& x_, double s, double z, int64_t qmin,
                                           int64_t qmax, bool need_dscale, bool need_mask) {
  check_float_cpu(x_, "x");
  const at::Tensor x = dense(x_);
  at::Tensor out = at::empty_like(x);
  at::Tensor dscale, mask;
  if (need_dscale) dscale = at::empty_like(x);
  if (need_mask) mask = at::empty_like(x, x.options().dtype(at::kBool));
  kernels().fake_quant(x.data_ptr<float>(), out.data_ptr<float>(),
                       need_dscale ? dscale.data_ptr<float>() : nullptr,
                       need_mask ? reinterpret_cast<uint8_t*>(mask.data_ptr<bool>()) : nullptr,
                       x.numel(), make_grid(s, z, qmin, qmax));
  return {out, dscale, mask};
}

// -- 2. fake-quant backward from the saved input -------------------------------------------
// (grad * inside, sum(grad * dscale)) with inside and dscale recomputed from x in the sweep:
// the forward then writes only its output (no dscale or mask buffers: less memory traffic and
// fewer fresh pages per step), and the backward reads x in their place. grad_x (if
// need_grad_x) is a new tensor; the sum is 0.0 unless need_sum.
std::tuple<at::Tensor, double> fake_quant_backward_x(const at::Tensor& grad_, const at::Tensor& x_, double s,
                                                     double z, int64_t qmin, int64_t qmax, bool need_grad_x,
                                                     bool need_sum) {
  check_float_cpu(grad_, "grad");
  check_float_cpu(x_, "x");
  if (!need_grad_x && !need_sum) return {at::Tensor(), 0.0};
  const at::Tensor x = dense(x_);
  const at::Tensor grad = same_layout(grad_, x);
  at::Tensor grad_x;
  if (need_grad_x) grad_x = at::empty_like(x);
  const double sum = kernels().backward_from_x(grad.data_ptr<float>(), x.data_ptr<float>(),
                                               need_grad_x ? grad_x.data_ptr<float>() : nullptr, x.numel(),
                                               make_grid(s, z, qmin, qmax), need_sum);
  return {grad_x, sum};
}

// -- 3./4. (quantized) weighted squared error with its gradients -------------------------
// Returns (sum of w * err^2 in double, d loss / d out or undefined, scale sum), where
// err = fq(out) - target (or out - target without quantization). The gradient buffer is
// ``(w * err * c) * inside`` with c = float32 2 / count, the torch nodes' expression for
// an incoming gradient of 1; the scale sum is sum((w * err * c) * dscale).
std::tuple<double, at::Tensor, double> squared_error_forward(
    const at::Tensor& out_, const at::Tensor& target_, const c10::optional<at::Tensor>& weight_,
    int64_t count, bool quantize, double s, double z, int64_t qmin, int64_t qmax, bool need_grad_out,
    bool need_grad_scale) {
  check_float_cpu(out_, "out");
  check_float_cpu(target_, "target");
  TORCH_CHECK(count > 0, "count must be positive");
  const at::Tensor out = dense(out_);
  const at::Tensor target = same_layout(target_, out);
  const bool has_w = weight_.has_value() && weight_->defined();
  at::Tensor weight;
  if (has_w) {
    check_float_cpu(*weight_, "weight");
    weight = same_layout(*weight_, out);
  }
  at::Tensor grad_out;
  if (need_grad_out) grad_out = at::empty_like(out);
  const float c = 2.0f / static_cast<float>(count);
  const auto r = kernels().squared_error(
      out.numel(), out.data_ptr<float>(), target.data_ptr<float>(),
      has_w ? weight.data_ptr<float>() : nullptr, need_grad_out ? grad_out.data_ptr<float>() : nullptr,
      quantize, need_grad_scale && quantize, make_grid(s, z, qmin, qmax), c);
  return {r[0], grad_out, r[1]};
}

// -- 5. AdaRound (sigmoid and pow stay torch's vectorised ones; the glue is one sweep) ----
// Soft weight: from sig = sigmoid(alpha) and the weight (both contiguous, channel-major:
// channel c = element / inner), writes w_q = s * (clamp(floor(w/s) + h + z, qmin, qmax) - z)
// into a new tensor and d w_q / d alpha into sig's buffer (returned as the second output).
std::vector<at::Tensor> adaround_soft_forward(at::Tensor sig, const at::Tensor& w, const at::Tensor& s,
                                              const at::Tensor& z, double zeta_gamma, double gamma,
                                              int64_t qmin, int64_t qmax) {
  check_float_cpu(sig, "sig");
  check_float_cpu(w, "w");
  check_float_cpu(s, "scale");
  check_float_cpu(z, "zero_point");
  TORCH_CHECK(sig.is_contiguous() && w.is_contiguous() && s.is_contiguous() && z.is_contiguous(),
              "adaround_soft_forward needs contiguous tensors");
  TORCH_CHECK(sig.sizes() == w.sizes(), "alpha and weight shapes differ");
  const int64_t n = w.numel(), channels = s.numel();
  TORCH_CHECK(channels > 0 && z.numel() == channels && n % channels == 0, "one scale and zero point per channel");
  at::Tensor wq = at::empty_like(w);
  kernels().adaround_soft(sig.data_ptr<float>(), w.data_ptr<float>(), s.data_ptr<float>(), z.data_ptr<float>(),
                          wq.data_ptr<float>(), n, n / channels, static_cast<float>(zeta_gamma),
                          static_cast<float>(gamma), static_cast<float>(qmin), static_cast<float>(qmax));
  return {wq, sig};
}

// Rounding loss, step 1: |2 h - 1| (a new tensor) from sig = sigmoid(alpha)
at::Tensor adaround_offset(const at::Tensor& sig, double zeta_gamma, double gamma) {
  check_float_cpu(sig, "sig");
  TORCH_CHECK(sig.is_contiguous(), "sig must be contiguous");
  at::Tensor t = at::empty_like(sig);
  kernels().adaround_offset(sig.data_ptr<float>(), t.data_ptr<float>(), sig.numel(), static_cast<float>(zeta_gamma),
                            static_cast<float>(gamma));
  return t;
}

// Rounding loss, step 2: with p = |t|^(beta-1), t = 2 h - 1 (recomputed from sig), returns
// sum(1 - |t| p) (in double) and writes d loss / d alpha = dh * p * sign(t) * (-2 beta) into p.
double adaround_reg(const at::Tensor& sig, at::Tensor p, double zeta_gamma, double gamma, double beta) {
  check_float_cpu(sig, "sig");
  check_float_cpu(p, "p");
  TORCH_CHECK(sig.is_contiguous() && p.is_contiguous(), "contiguous tensors needed");
  TORCH_CHECK(sig.numel() == p.numel(), "sizes differ");
  return kernels().adaround_reg(sig.data_ptr<float>(), p.data_ptr<float>(), sig.numel(),
                                static_cast<float>(zeta_gamma), static_cast<float>(gamma),
                                static_cast<float>(-2.0 * beta));
}

// -- 6. logarithmic fake quantizer (Log2Quantizer, see mmbrecq/quantizers/log2.py) --------
// out = levels[c] * delta for the code c = round(-k log2(max(x / delta, tiny))) (exact
// rounding: the exponent field, then the mantissa against the k thresholds of
// ``mantissa_bits``, the 23-bit fields of the smallest floats above 2^(-(j + 1/2) / k)),
// clamped to >= 0; 0 where c >= qmax or x <= 0; nan stays nan. ``levels`` holds the
// qmax floats 2^(-c / k) as the torch code computes them, then 0 (the top code's value).
at::Tensor log_quant_forward(const at::Tensor& x_, double delta, int64_t k, int64_t qmax,
                             const at::Tensor& levels, const std::vector<int64_t>& mantissa_bits) {
  check_float_cpu(x_, "x");
  check_float_cpu(levels, "levels");
  TORCH_CHECK(levels.is_contiguous() && levels.numel() == qmax + 1 && qmax > 0, "levels must hold qmax + 1 floats");
  TORCH_CHECK((k == 1 || k == 2) && static_cast<int64_t>(mantissa_bits.size()) == k,
              "codes per octave must be 1 or 2, with one mantissa threshold each");
  const at::Tensor x = dense(x_);
  at::Tensor out = at::empty_like(x);
  const int32_t t0 = static_cast<int32_t>(mantissa_bits[0]);
  const int32_t t1 = k == 2 ? static_cast<int32_t>(mantissa_bits[1]) : 0;  // (m < 0: never)
  const LogGrid g{static_cast<float>(delta), static_cast<int32_t>(k), static_cast<int32_t>(qmax), t0, t1};
  kernels().log_quant(x.data_ptr<float>(), out.data_ptr<float>(), x.numel(), levels.data_ptr<float>(), g);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the kernels touch no Python object: other Python threads may run meanwhile
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("dense", &dense, "t itself when its elements fill numel() consecutive floats, else a contiguous copy");
  m.def("fake_quant_forward", &fake_quant_forward, release(),
        "fake-quant forward (+ LSQ dscale, grid mask)");
  m.def("fake_quant_backward_x", &fake_quant_backward_x, release(),
        "fake-quant backward from the saved input: grad_x, sum(grad * dscale)");
  m.def("squared_error_forward", &squared_error_forward, release(),
        "(quantized) weighted squared error: loss sum, d loss / d out, scale gradient sum");
  m.def("adaround_soft_forward", &adaround_soft_forward, release(),
        "AdaRound soft weight and its alpha-derivative (into sig's buffer)");
  m.def("adaround_offset", &adaround_offset, release(), "AdaRound |2 h - 1| from sigmoid(alpha)");
  m.def("adaround_reg", &adaround_reg, release(), "AdaRound rounding loss and its alpha-gradient (into p)");
  m.def("log_quant_forward", &log_quant_forward, release(), "logarithmic fake quantizer forward");
  m.def("isa_names", &isa_names, "instruction set versions supported here, baseline first");
  m.def("set_isa", &set_isa, "use one instruction set version (tests); returns the previous one");
  m.def("current_isa", &current_isa, "the instruction set version in use");
}

#else  // MMBRECQ_FUSED_QUANT_BODY: the loop code, once per instruction set

// Round half to even, as torch.round / std::nearbyint in the default rounding mode,
// written so that it vectorises without SSE4.1: below 2^23, adding and removing 2^23
// leaves the nearest integer (ties to even: the sum's last bit is the integer's parity);
// from 2^23 on every float is an integer already (and inf / nan pass through).
inline float round_half_even(float v) {
  const float big = 8388608.0f;  // 2^23
  const float a = std::fabs(v);
  const float r = std::copysign((a + big) - big, v);
  return a < big ? r : v;
}

// The fake quantizer on one element: ``xs = x / s``, the integer offset ``q`` from the
// zero point, and whether ``round(xs) + z`` was on the grid (``in``; ``inside`` as 1.f / 0.f).
struct FQ {
  float xs, q, inside;
  int in;
};

inline FQ fake_quant_elem(float x, const Grid& g) {
  FQ e;
  e.xs = x / g.s;
  const float r = round_half_even(e.xs) + g.z;
  e.in = (r >= g.qmin) & (r <= g.qmax);
  // clamp(r, qmin, qmax); nan stays nan, as torch.clamp
  const float lo = r < g.qmin ? g.qmin : r;
  const float c = lo > g.qmax ? g.qmax : lo;
  e.q = c - g.z;
  e.inside = static_cast<float>(e.in);
  return e;
}

// d out / d s (LSQ): ``q - xs * inside``, exactly the torch node's ``q.sub_(xs.mul_(inside))``
inline float lsq_dscale(const FQ& e) { return e.q - e.xs * e.inside; }

// Deterministic double sums over [0, n): the range is cut into blocks of BLOCK elements
// (whatever the thread count), each block into chunks of CHUNK. ``f(begin, len, tmp)``
// handles the elements [begin, begin + len): it writes its outputs and, for each of the
// NSUM sums, the terms into tmp[k][0..len) (a plain element-wise loop, vectorised). The
// terms go into LANES accumulators per sum, combined in a fixed order per block, then
// the blocks in order.
template <int NSUM, typename F>
std::array<double, NSUM> block_sums(int64_t n, const F& f) {
  const int64_t nblocks = (n + BLOCK - 1) / BLOCK;
  std::vector<std::array<double, NSUM>> partial(nblocks);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    double tmp[NSUM][CHUNK];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * BLOCK, end = std::min(n, begin + BLOCK);
      double acc[NSUM][LANES] = {};
      for (int64_t c = begin; c < end; c += CHUNK) {
        const int len = static_cast<int>(std::min<int64_t>(CHUNK, end - c));
        f(c, len, tmp);
        for (int k = 0; k < NSUM; ++k) {
          int j = 0;
          for (; j + LANES <= len; j += LANES) {
            for (int l = 0; l < LANES; ++l) acc[k][l] += tmp[k][j + l];
          }
          for (int l = 0; j < len; ++j, ++l) acc[k][l] += tmp[k][j];
        }
      }
      for (int k = 0; k < NSUM; ++k) {
        double sum = 0.0;
        for (int l = 0; l < LANES; ++l) sum += acc[k][l];
        partial[b][k] = sum;
      }
    }
  });
  std::array<double, NSUM> total{};
  for (int64_t b = 0; b < nblocks; ++b) {
    for (int k = 0; k < NSUM; ++k) total[k] += partial[b][k];
  }
  return total;
}

// (restrict pointers and the grid by value: a uint8_t store may alias anything, which would
// otherwise keep the loop from being vectorised)
template <bool D, bool M>
void fake_quant_range(const float* __restrict x, float* __restrict o, float* __restrict d,
                      uint8_t* __restrict m, int64_t n, const Grid g) {
  for (int64_t i = 0; i < n; ++i) {
    const FQ e = fake_quant_elem(x[i], g);
    o[i] = e.q * g.s;
    if (D) d[i] = lsq_dscale(e);
    if (M) m[i] = static_cast<uint8_t>(e.in);
  }
}

// out = (clamp(round(x / s) + z, qmin, qmax) - z) * s; d (if not null) = LSQ's d out / d s;
// m (if not null) = the grid mask
void fake_quant(const float* x, float* o, float* d, uint8_t* m, int64_t n, Grid g) {
  at::parallel_for(0, n, BLOCK, [&](int64_t begin, int64_t end) {
    const int64_t len = end - begin;
    float* db = d ? d + begin : nullptr;
    uint8_t* mb = m ? m + begin : nullptr;
    if (d && m) {
      fake_quant_range<true, true>(x + begin, o + begin, db, mb, len, g);
    } else if (d) {
      fake_quant_range<true, false>(x + begin, o + begin, db, mb, len, g);
    } else if (m) {
      fake_quant_range<false, true>(x + begin, o + begin, db, mb, len, g);
    } else {
      fake_quant_range<false, false>(x + begin, o + begin, db, mb, len, g);
    }
  });
}

// gx = g * inside (if gx) and sum(g * dscale) (if Sum), inside and dscale recomputed from x
template <bool GX, bool Sum>
double backward_from_x_impl(const float* pg, const float* px, float* pgx, int64_t n, const Grid g) {
  if (!Sum) {
    at::parallel_for(0, n, BLOCK, [&](int64_t begin, int64_t end) {
      const float* __restrict gr = pg + begin;
      const float* __restrict x = px + begin;
      float* __restrict gx = pgx + begin;
      const Grid gg = g;
      for (int64_t i = 0, len = end - begin; i < len; ++i) gx[i] = gr[i] * fake_quant_elem(x[i], gg).inside;
    });
    return 0.0;
  }
  return block_sums<1>(n, [&](int64_t c, int len, double (*tmp)[CHUNK]) {
    const float* __restrict gr = pg + c;
    const float* __restrict x = px + c;
    float* __restrict gx = GX ? pgx + c : nullptr;
    double* __restrict t = tmp[0];
    const Grid gg = g;
    for (int j = 0; j < len; ++j) {
      const FQ e = fake_quant_elem(x[j], gg);
      const float gj = gr[j];
      t[j] = static_cast<double>(gj * lsq_dscale(e));
      if (GX) gx[j] = gj * e.inside;
    }
  })[0];
}

double backward_from_x(const float* pg, const float* px, float* pgx, int64_t n, Grid g, bool need_sum) {
  if (pgx != nullptr) {
    return need_sum ? backward_from_x_impl<true, true>(pg, px, pgx, n, g)
                    : backward_from_x_impl<true, false>(pg, px, pgx, n, g);
  }
  return backward_from_x_impl<false, true>(pg, px, pgx, n, g);
}

template <bool Quant, bool HasW, bool GradOut, bool GradScale>
std::array<double, 2> squared_error_impl(int64_t n, const float* po, const float* py, const float* pw,
                                         float* pgo, const Grid g, const float c) {
  constexpr int NSUM = GradScale ? 2 : 1;
  const auto sums = block_sums<NSUM>(n, [&](int64_t c0, int len, double (*tmp)[CHUNK]) {
    const float* __restrict o = po + c0;
    const float* __restrict y = py + c0;
    const float* __restrict w = HasW ? pw + c0 : nullptr;
    float* __restrict go = GradOut ? pgo + c0 : nullptr;
    double* __restrict t0 = tmp[0];
    double* __restrict t1 = tmp[NSUM - 1];
    for (int j = 0; j < len; ++j) {
      float v = o[j];
      FQ e{};
      if (Quant) {
        e = fake_quant_elem(v, g);
        v = e.q * g.s;
      }
      const float err = v - y[j];
      const float werr = HasW ? err * w[j] : err;
      const float gq = werr * c;  // d loss / d fq(out), as the torch node's werr * (grad * 2 / count)
      if (GradOut) go[j] = Quant ? gq * e.inside : gq;
      t0[j] = static_cast<double>(werr) * static_cast<double>(err);
      if (GradScale) t1[j] = static_cast<double>(gq * lsq_dscale(e));
    }
  });
  return {sums[0], GradScale ? sums[NSUM - 1] : 0.0};
}

template <bool Quant, bool HasW>
std::array<double, 2> squared_error_w(bool grad_out, bool grad_scale, int64_t n, const float* po,
                                      const float* py, const float* pw, float* pgo, const Grid g,
                                      const float c) {
  if (grad_out) {
    return grad_scale ? squared_error_impl<Quant, HasW, true, Quant>(n, po, py, pw, pgo, g, c)
                      : squared_error_impl<Quant, HasW, true, false>(n, po, py, pw, pgo, g, c);
  }
  return grad_scale ? squared_error_impl<Quant, HasW, false, Quant>(n, po, py, pw, pgo, g, c)
                    : squared_error_impl<Quant, HasW, false, false>(n, po, py, pw, pgo, g, c);
}

// [sum(w * err^2), sum((w * err * c) * dscale)] and, if pgo, d loss / d out for grad 1
std::array<double, 2> squared_error(int64_t n, const float* po, const float* py, const float* pw,
                                    float* pgo, bool quant, bool grad_scale, Grid g, float c) {
  const bool grad_out = pgo != nullptr;
  if (quant) {
    return pw ? squared_error_w<true, true>(grad_out, grad_scale, n, po, py, pw, pgo, g, c)
              : squared_error_w<true, false>(grad_out, grad_scale, n, po, py, pw, pgo, g, c);
  }
  return pw ? squared_error_w<false, true>(grad_out, false, n, po, py, pw, pgo, g, c)
            : squared_error_w<false, false>(grad_out, false, n, po, py, pw, pgo, g, c);
}

// -- AdaRound ------------------------------------------------------------------------------
// h = clamp(sig * (zeta - gamma) + gamma, 0, 1); d h / d alpha = sig (1 - sig) (zeta - gamma)
// where the clamp is inactive (inclusive bounds, as torch.clamp's backward)
struct Rect {
  float h, dh;
};

inline Rect rectified(float sg, float zg, float gamma) {
  const float hr = sg * zg + gamma;
  const float in = static_cast<float>((hr >= 0.f) & (hr <= 1.f));
  const float lo = hr < 0.f ? 0.f : hr;
  return Rect{lo > 1.f ? 1.f : lo, ((sg * (1.f - sg)) * zg) * in};
}

// w_q and, over sig, d w_q / d alpha (see adaround_soft_forward); in the order of the torch
// node in mmbrecq/quantizers/adaround_functional.py
void adaround_soft(float* psig, const float* pw, const float* ps, const float* pz, float* pwq, int64_t n,
                   int64_t inner, float zg, float gamma, float qmin, float qmax) {
  at::parallel_for(0, n, BLOCK, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t c = i / inner, stop = std::min(end, (c + 1) * inner);
      const float s = ps[c], z = pz[c];
      float* __restrict sig = psig;
      const float* __restrict w = pw;
      float* __restrict wq = pwq;
      for (int64_t j = i; j < stop; ++j) {
        const Rect r = rectified(sig[j], zg, gamma);
        const float q = (std::floor(w[j] / s) + r.h) + z;
        const float qin = static_cast<float>((q >= qmin) & (q <= qmax));
        const float lo = q < qmin ? qmin : q;
        wq[j] = ((lo > qmax ? qmax : lo) - z) * s;
        sig[j] = (r.dh * qin) * s;
      }
      i = stop;
    }
  });
}

// |t| with t = 2 h - 1
void adaround_offset(const float* psig, float* pt, int64_t n, float zg, float gamma) {
  at::parallel_for(0, n, BLOCK, [&](int64_t begin, int64_t end) {
    const float* __restrict sig = psig;
    float* __restrict t = pt;
    for (int64_t j = begin; j < end; ++j) t[j] = std::fabs(rectified(sig[j], zg, gamma).h * 2.f - 1.f);
  });
}

// sum(1 - |t| p) and p := dh * p * sign(t) * m2b (m2b = -2 beta)
double adaround_reg(const float* psig, float* pp, int64_t n, float zg, float gamma, float m2b) {
  return block_sums<1>(n, [&](int64_t c, int len, double (*tmp)[CHUNK]) {
    const float* __restrict sig = psig + c;
    float* __restrict p = pp + c;
    double* __restrict acc = tmp[0];
    for (int j = 0; j < len; ++j) {
      const Rect r = rectified(sig[j], zg, gamma);
      const float tj = r.h * 2.f - 1.f, pj = p[j];
      const float sign = static_cast<float>((tj > 0.f) - (tj < 0.f));
      acc[j] = static_cast<double>(1.f - std::fabs(tj) * pj);
      p[j] = ((r.dh * pj) * sign) * m2b;
    }
  })[0];
}

// -- logarithmic fake quantizer ------------------------------------------------------------
// (see log_quant_forward; r = max(x / delta, tiny) = m 2^e with m in [0.5, 1): e is the
// exponent field - 126 and m < threshold compares the mantissa fields, exactly. Signed
// integers, the code clamped into the table, no branch, restrict pointers and the grid by
// value: the loop vectorises, with a gather for the table)
void log_quant_range(const float* __restrict x, float* __restrict o, int64_t n, const float* __restrict levels,
                     const LogGrid g) {
  const float tiny = 1.17549435e-38f;  // FLT_MIN
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    const float q = xi / g.delta;
    const float r = q < tiny ? tiny : q;  // nan stays nan
    int32_t bits;
    std::memcpy(&bits, &r, sizeof bits);
    const int32_t e = ((bits >> 23) & 0xFF) - 126;
    const int32_t mb = bits & 0x7FFFFF;
    int32_t c = -g.k * e + (mb < g.t0 ? 1 : 0) + (mb < g.t1 ? 1 : 0);
    c = c < 0 ? 0 : c;
    c = c > g.qmax ? g.qmax : c;  // levels[qmax] = 0
    const float v = levels[c] * g.delta;
    const float vz = xi > 0.f ? v : 0.f;
    o[i] = r != r ? r : vz;
  }
}

void log_quant(const float* px, float* po, int64_t n, const float* lv, LogGrid g) {
  at::parallel_for(0, n, BLOCK, [&](int64_t begin, int64_t end) {
    log_quant_range(px + begin, po + begin, end - begin, lv, g);
  });
}

#endif  // MMBRECQ_FUSED_QUANT_BODY
