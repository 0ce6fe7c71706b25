// CPU kernels called from XLA through its FFI (see cpu_kernels.py, which builds and loads this
// file). Every kernel is pure: it reads its input buffers and writes its result buffer only.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float Vec16 __attribute__((vector_size(64)));  // 16 floats; the compiler picks the ISA

inline Vec16 Load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

using Image = ffi::Buffer<ffi::F32, 4>;   // NHWC
using Matrix = ffi::Buffer<ffi::F32, 2>;
using Taps3 = ffi::Buffer<ffi::F32, 3>;  // (taps, C_in, C_out)

inline void Store16(float* p, Vec16 v) { std::memcpy(p, &v, sizeof(v)); }

// Runs body(u) for every u in [0, n) on the calling thread and on up to
// min(n, max_threads) - 1 tasks of XLA's intra-op thread pool. Units are claimed one at a
// time, so the caller never waits for a task that has not started: on a busy pool (another
// XLA device's work) it simply does them all. A task that starts after every unit is claimed
// touches only the shared counters.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t max_threads, int64_t n, const Body& body) {
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto work = [counters, n, &body] {
    for (int64_t u; (u = counters->next.fetch_add(1)) < n;) {
      body(u);
      counters->done.fetch_add(1);
    }
  };
  const int64_t helpers = std::min({pool.num_threads(), max_threads, n}) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (counters->done.load() < n) std::this_thread::yield();
}

// Kernel gradient of a stride-1 depthwise 3x3 correlation over channels [0, C - C % 16), from
// output rows [r_lo, r_hi) of the B * Ho:
//   dw[3 i + j, c] += sum over (b, ho, wo) of x[b, ho + i - p, wo + j - p, c] * dy[b, ho, wo, c]
// (x zero outside its H x W). For each output row and 16 channels the nine sums stay in
// registers over the row; rows of x outside the image read `zero` (W * C zeros), so only the
// columns where some tap leaves the image need a bounds check.
void DepthwiseGrad3x3(const float* __restrict x, const float* __restrict dy,
                      float* __restrict dw, const float* __restrict zero, int64_t H, int64_t W,
                      int64_t C, int64_t Ho, int64_t Wo, int64_t p, int64_t r_lo, int64_t r_hi) {
  // Output columns whose three taps are all inside the image: wo - p >= 0, wo - p + 2 < W.
  const int64_t in_lo = std::min<int64_t>(Wo, std::max<int64_t>(0, p));
  const int64_t in_hi = std::max<int64_t>(in_lo, std::min<int64_t>(Wo, W - 2 + p));
  for (int64_t r = r_lo; r < r_hi; ++r) {  // output rows r = b * Ho + ho
    {
      const int64_t b = r / Ho, ho = r % Ho;
      const float* dy_row = dy + r * Wo * C;
      const float* rows[3];
      for (int i = 0; i < 3; ++i) {
        const int64_t h = ho + i - p;
        rows[i] = (h < 0 || h >= H) ? zero : x + (b * H + h) * W * C;
      }
      for (int64_t c0 = 0; c0 + 16 <= C; c0 += 16) {
        const float* r0 = rows[0] + c0;
        const float* r1 = rows[1] + c0;
        const float* r2 = rows[2] + c0;
        Vec16 s00 = {}, s01 = {}, s02 = {}, s10 = {}, s11 = {}, s12 = {}, s20 = {}, s21 = {},
              s22 = {};
        for (int64_t wo = in_lo; wo < in_hi; ++wo) {
          const Vec16 g = Load16(dy_row + wo * C + c0);
          const int64_t o = (wo - p) * C;
          s00 += Load16(r0 + o) * g;
          s01 += Load16(r0 + o + C) * g;
          s02 += Load16(r0 + o + 2 * C) * g;
          s10 += Load16(r1 + o) * g;
          s11 += Load16(r1 + o + C) * g;
          s12 += Load16(r1 + o + 2 * C) * g;
          s20 += Load16(r2 + o) * g;
          s21 += Load16(r2 + o + C) * g;
          s22 += Load16(r2 + o + 2 * C) * g;
        }
        Vec16 sums[9] = {s00, s01, s02, s10, s11, s12, s20, s21, s22};
        for (int64_t wo = 0; wo < Wo; ++wo) {  // the border columns
          if (wo >= in_lo && wo < in_hi) continue;
          const Vec16 g = Load16(dy_row + wo * C + c0);
          for (int j = 0; j < 3; ++j) {
            const int64_t w = wo + j - p;
            if (w < 0 || w >= W) continue;
            for (int i = 0; i < 3; ++i) sums[3 * i + j] += Load16(rows[i] + w * C + c0) * g;
          }
        }
        for (int t = 0; t < 9; ++t) {
          float* out = dw + t * C + c0;
          Store16(out, Load16(out) + sums[t]);
        }
      }
    }
  }
}

// Stride-1 depthwise 3x3 correlation over channels [0, C - C % 16):
//   y[b, ho, wo, c] = sum over (i, j) of x[b, ho + i - p, wo + j - p, c] * w[3 i + j, c]
// (x zero outside its H x W; p may be negative, which crops). The nine weights of 16 channels
// stay in registers over an output row; rows of x outside the image read `zero`.
void DepthwiseConv3x3(const float* __restrict x, const float* __restrict wt,
                      float* __restrict y, const float* __restrict zero, int64_t B, int64_t H,
                      int64_t W, int64_t C, int64_t Ho, int64_t Wo, int64_t p) {
  const int64_t in_lo = std::min<int64_t>(Wo, std::max<int64_t>(0, p));
  const int64_t in_hi = std::max<int64_t>(in_lo, std::min<int64_t>(Wo, W - 2 + p));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t ho = 0; ho < Ho; ++ho) {
      float* y_row = y + (b * Ho + ho) * Wo * C;
      const float* rows[3];
      for (int i = 0; i < 3; ++i) {
        const int64_t h = ho + i - p;
        rows[i] = (h < 0 || h >= H) ? zero : x + (b * H + h) * W * C;
      }
      for (int64_t c0 = 0; c0 + 16 <= C; c0 += 16) {
        Vec16 k[9];
        for (int t = 0; t < 9; ++t) k[t] = Load16(wt + t * C + c0);
        const float* r0 = rows[0] + c0;
        const float* r1 = rows[1] + c0;
        const float* r2 = rows[2] + c0;
        for (int64_t wo = in_lo; wo < in_hi; ++wo) {
          const int64_t o = (wo - p) * C;
          Vec16 a = Load16(r0 + o) * k[0] + Load16(r0 + o + C) * k[1];
          a += Load16(r0 + o + 2 * C) * k[2];
          a += Load16(r1 + o) * k[3] + Load16(r1 + o + C) * k[4] + Load16(r1 + o + 2 * C) * k[5];
          a += Load16(r2 + o) * k[6] + Load16(r2 + o + C) * k[7] + Load16(r2 + o + 2 * C) * k[8];
          Store16(y_row + wo * C + c0, a);
        }
        for (int64_t wo = 0; wo < Wo; ++wo) {  // the border columns
          if (wo >= in_lo && wo < in_hi) continue;
          Vec16 a = {};
          for (int j = 0; j < 3; ++j) {
            const int64_t w = wo + j - p;
            if (w < 0 || w >= W) continue;
            for (int i = 0; i < 3; ++i) a += Load16(rows[i] + w * C + c0) * k[3 * i + j];
          }
          Store16(y_row + wo * C + c0, a);
        }
      }
    }
  }
}

// The same correlation for any k x k kernel, over channels [c_begin, C).
void DepthwiseConvAny(const float* x, const float* wt, float* y, int64_t B, int64_t H, int64_t W,
                      int64_t C, int64_t Ho, int64_t Wo, int64_t k, int64_t p, int64_t c_begin) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t ho = 0; ho < Ho; ++ho)
      for (int64_t wo = 0; wo < Wo; ++wo) {
        float* out = y + ((b * Ho + ho) * Wo + wo) * C;
        for (int64_t c = c_begin; c < C; ++c) out[c] = 0.f;
        for (int64_t i = 0; i < k; ++i) {
          const int64_t h = ho + i - p;
          if (h < 0 || h >= H) continue;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t w = wo + j - p;
            if (w < 0 || w >= W) continue;
            const float* xv = x + ((b * H + h) * W + w) * C;
            const float* kv = wt + (i * k + j) * C;
            for (int64_t c = c_begin; c < C; ++c) out[c] += xv[c] * kv[c];
          }
        }
      }
}

inline Vec16 Splat16(float f) { return Vec16{} + f; }

// Kernel gradient of a stride-1 dense convolution, one output row of one tap, for 8 input
// channels ci0.. and 32 output channels co0..:
//   dk[ci, co] += sum over w in [w0, w1) of x_row[w + shift, ci] * g_row[w, co]
// The 8 x 32 sums stay in 16 vector registers over the row.
inline void DenseGradTile(const float* __restrict x_row, const float* __restrict g_row,
                          float* __restrict dk, int64_t Ci, int64_t Co, int64_t w0, int64_t w1,
                          int64_t shift, int64_t ci0, int64_t co0) {
  Vec16 s[8][2];
  for (int r = 0; r < 8; ++r) {
    s[r][0] = Load16(dk + (ci0 + r) * Co + co0);
    s[r][1] = Load16(dk + (ci0 + r) * Co + co0 + 16);
  }
  for (int64_t w = w0; w < w1; ++w) {
    const Vec16 g0 = Load16(g_row + w * Co + co0);
    const Vec16 g1 = Load16(g_row + w * Co + co0 + 16);
    const float* xv = x_row + (w + shift) * Ci + ci0;
    for (int r = 0; r < 8; ++r) {
      const Vec16 b = Splat16(xv[r]);
      s[r][0] += b * g0;
      s[r][1] += b * g1;
    }
  }
  for (int r = 0; r < 8; ++r) {
    Store16(dk + (ci0 + r) * Co + co0, s[r][0]);
    Store16(dk + (ci0 + r) * Co + co0 + 16, s[r][1]);
  }
}

// dk[i * kw + j, ci, co] = sum over (b, h, w) of x[b, h + i - pt, w + j - pl, ci] * g[b, h, w, co]
// (x zero outside its H x W), for Ci % 8 == 0 and Co % 32 == 0, summed over output rows
// [r_lo, r_hi) of the B * Ho. Output row by output row, so
// that the gradient row and the input rows it meets are read from the L1 / L2 cache.
void DenseKernelGrad(const float* x, const float* g, float* dk, int64_t H, int64_t W, int64_t Ci,
                     int64_t Ho, int64_t Wo, int64_t Co, int64_t kh, int64_t kw, int64_t pt,
                     int64_t pl, int64_t r_lo, int64_t r_hi) {
  for (int64_t r = r_lo; r < r_hi; ++r) {  // output rows r = b * Ho + h
    {
      const int64_t b = r / Ho, h = r % Ho;
      const float* g_row = g + r * Wo * Co;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t hx = h + i - pt;
        if (hx < 0 || hx >= H) continue;
        const float* x_row = x + (b * H + hx) * W * Ci;
        for (int64_t j = 0; j < kw; ++j) {
          const int64_t shift = j - pl;  // the input column of output column w is w + shift
          const int64_t w0 = std::max<int64_t>(0, -shift);
          const int64_t w1 = std::min<int64_t>(Wo, W - shift);
          float* d = dk + (i * kw + j) * Ci * Co;
          for (int64_t ci0 = 0; ci0 < Ci; ci0 += 8) {
            for (int64_t co0 = 0; co0 < Co; co0 += 32) {
              if (w1 > w0) DenseGradTile(x_row, g_row, d, Ci, Co, w0, w1, shift, ci0, co0);
            }
          }
        }
      }
    }
  }
}

// The same sums for any k x k kernel, over channels [c_begin, C).
void DepthwiseGradAny(const float* x, const float* dy, float* dw, int64_t B, int64_t H,
                      int64_t W, int64_t C, int64_t Ho, int64_t Wo, int64_t k, int64_t p,
                      int64_t c_begin) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t ho = 0; ho < Ho; ++ho)
      for (int64_t i = 0; i < k; ++i) {
        const int64_t h = ho + i - p;
        if (h < 0 || h >= H) continue;
        for (int64_t wo = 0; wo < Wo; ++wo) {
          const float* g = dy + ((b * Ho + ho) * Wo + wo) * C;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t w = wo + j - p;
            if (w < 0 || w >= W) continue;
            const float* xv = x + ((b * H + h) * W + w) * C;
            float* out = dw + (i * k + j) * C;
            for (int64_t c = c_begin; c < C; ++c) out[c] += xv[c] * g[c];
          }
        }
      }
}

ffi::Error DepthwiseKernelGrad(ffi::ThreadPool pool, Image x, Image dy,
                               ffi::ResultBuffer<ffi::F32, 2> dw, int64_t k, int64_t padding,
                               int64_t threads) {
  const auto xd = x.dimensions();
  const auto gd = dy.dimensions();
  const int64_t B = xd[0], H = xd[1], W = xd[2], C = xd[3], Ho = gd[1], Wo = gd[2];
  if (gd[0] != B || gd[3] != C || Ho != H + 2 * padding - k + 1 || Wo != W + 2 * padding - k + 1 ||
      dw->dimensions()[0] != k * k || dw->dimensions()[1] != C) {
    return ffi::Error::InvalidArgument("depthwise_kernel_grad: inconsistent shapes");
  }
  float* out = dw->typed_data();
  std::fill(out, out + k * k * C, 0.f);
  int64_t done = 0;
  if (k == 3 && C >= 16) {
    std::vector<float> zero(W * C, 0.f);
    const int64_t rows = B * Ho, n = std::max<int64_t>(1, std::min(threads, rows));
    std::vector<float> partial((n - 1) * k * k * C, 0.f);  // unit 0 sums into `out`
    ParallelFor(pool, threads, n, [&](int64_t u) {  // a block of output rows per unit
      float* sums = u == 0 ? out : partial.data() + (u - 1) * k * k * C;
      DepthwiseGrad3x3(x.typed_data(), dy.typed_data(), sums, zero.data(), H, W, C, Ho, Wo,
                       padding, rows * u / n, rows * (u + 1) / n);
    });
    for (size_t t = 0; t < partial.size(); ++t) out[t % (k * k * C)] += partial[t];
    done = C - C % 16;
  }
  if (done < C) {
    DepthwiseGradAny(x.typed_data(), dy.typed_data(), out, B, H, W, C, Ho, Wo, k, padding, done);
  }
  return ffi::Error::Success();
}

ffi::Error DepthwiseConv(Image x, Matrix w, ffi::ResultBuffer<ffi::F32, 4> y, int64_t k,
                         int64_t padding) {
  const auto xd = x.dimensions();
  const auto yd = y->dimensions();
  const int64_t B = xd[0], H = xd[1], W = xd[2], C = xd[3], Ho = yd[1], Wo = yd[2];
  if (yd[0] != B || yd[3] != C || Ho != H + 2 * padding - k + 1 || Wo != W + 2 * padding - k + 1 ||
      w.dimensions()[0] != k * k || w.dimensions()[1] != C) {
    return ffi::Error::InvalidArgument("depthwise_conv: inconsistent shapes");
  }
  int64_t done = 0;
  if (k == 3 && C >= 16) {
    std::vector<float> zero(W * C, 0.f);
    DepthwiseConv3x3(x.typed_data(), w.typed_data(), y->typed_data(), zero.data(), B, H, W, C,
                     Ho, Wo, padding);
    done = C - C % 16;
  }
  if (done < C) {
    DepthwiseConvAny(x.typed_data(), w.typed_data(), y->typed_data(), B, H, W, C, Ho, Wo, k,
                     padding, done);
  }
  return ffi::Error::Success();
}

ffi::Error ConvKernelGrad(ffi::ThreadPool pool, Image x, Image dy,
                          ffi::ResultBuffer<ffi::F32, 3> dk, int64_t kh, int64_t kw, int64_t pt,
                          int64_t pl, int64_t threads) {
  const auto xd = x.dimensions();
  const auto gd = dy.dimensions();
  const auto kd = dk->dimensions();
  const int64_t B = xd[0], H = xd[1], W = xd[2], Ci = xd[3], Ho = gd[1], Wo = gd[2], Co = gd[3];
  if (gd[0] != B || kd[0] != kh * kw || kd[1] != Ci || kd[2] != Co || Ci % 8 != 0 ||
      Co % 32 != 0) {
    return ffi::Error::InvalidArgument("conv_kernel_grad: inconsistent or unsupported shapes");
  }
  float* out = dk->typed_data();
  std::fill(out, out + kh * kw * Ci * Co, 0.f);
  const int64_t rows = B * Ho, n = std::max<int64_t>(1, std::min(threads, rows));
  const int64_t size = kh * kw * Ci * Co;
  std::vector<float> partial((n - 1) * size, 0.f);  // unit 0 sums into `out`
  ParallelFor(pool, threads, n, [&](int64_t u) {  // a block of output rows per unit
    float* sums = u == 0 ? out : partial.data() + (u - 1) * size;
    DenseKernelGrad(x.typed_data(), dy.typed_data(), sums, H, W, Ci, Ho, Wo, Co, kh, kw, pt, pl,
                    rows * u / n, rows * (u + 1) / n);
  });
  for (size_t t = 0; t < partial.size(); ++t) out[t % size] += partial[t];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EvafusionConvKernelGrad, ConvKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Image>()
                                  .Arg<Image>()
                                  .Ret<Taps3>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EvafusionDepthwiseConv, DepthwiseConv,
                              ffi::Ffi::Bind()
                                  .Arg<Image>()
                                  .Arg<Matrix>()
                                  .Ret<Image>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("padding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EvafusionDepthwiseKernelGrad, DepthwiseKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Image>()
                                  .Arg<Image>()
                                  .Ret<Matrix>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("padding")
                                  .Attr<int64_t>("threads"));
