// jaxnas's CPU kernels, called through the XLA FFI (jaxnas/ops/native.py): the depthwise
// 2-D convolution and its weight gradient, and max pooling's index, gather and scatter.
//
// Layout: x [*Bx, N, H, W, C], w [*B, kh, kw, C], y [*B, N, Ho, Wo, C], float32, row
// major; *B are leading (vmapped) axes, flattened here to E, and *Bx are the last of
// them (Ex of the E): filter e reads sample block e % Ex of x, so an x shared by
// several filters is not copied per filter. With `relu` x is read as max(x, 0); with
// `flip` (the conv) w is read mirrored in kh and kw. The geometry is the one of
// jaxnas/ops/depthwise.py: pad each sample with (lo, hi) rows and columns (negative
// values crop) and lhs_dilation - 1 zeros between pixels, then
//   y[ho, wo, c] = sum_{i, j} xp[ho * stride + i * rhs_dilation,
//                                wo * stride + j * rhs_dilation, c] * w[i, j, c].
// The weight gradient is dw[i, j, c] = sum_{n, ho, wo} xp[...] * g[n, ho, wo, c] in the
// same geometry. Each (e, n) sample is padded once into a per-worker scratch buffer,
// split by stride s into s * s phase planes (plane (a, b) holds the padded pixels whose
// row is a and column b modulo s), so that for every stride each (ho, i, j) term reads
// one contiguous span of Wo * C floats of one plane; it is multiplied by that tap's
// weights tiled Wo times (loops the compiler vectorizes).
// Samples are spread over XLA's intra-op thread pool; the calling thread takes part,
// so the kernels finish even when no pool thread is free.

#include <algorithm>
#include <cmath>
#include <limits>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t stride, lhs_dilation, rhs_dilation, pad_h_lo, pad_h_hi, pad_w_lo, pad_w_hi;

  int64_t padded(int64_t size, int64_t lo, int64_t hi) const {
    return lo + hi + (size - 1) * lhs_dilation + 1;
  }
  int64_t out(int64_t padded_size, int64_t k) const {
    return (padded_size - rhs_dilation * (k - 1) - 1) / stride + 1;
  }
};

struct Dims {
  int64_t e = 1, n, h, w, c;
};

// The product of the leading axes of an array whose last `core` axes are its own.
int64_t LeadingSize(ffi::Span<const int64_t> d, size_t core) {
  int64_t e = 1;
  for (size_t i = 0; i + core < d.size(); ++i) e *= d[i];
  return e;
}

// x's [*B, N, H, W, C] as (E, N, H, W, C).
Dims SplitDims(ffi::Span<const int64_t> d) {
  Dims out;
  const size_t r = d.size();
  for (size_t i = 0; i + 4 < r; ++i) out.e *= d[i];
  out.n = d[r - 4];
  out.h = d[r - 3];
  out.w = d[r - 2];
  out.c = d[r - 1];
  return out;
}

// Runs body(item, worker) for item in [0, count) on the calling thread and on up to
// num_threads - 1 pool threads; worker < max_workers indexes per-worker scratch.
// Items are claimed one at a time, so a pool task that starts late finds none left
// and returns without touching the caller's (by then released) state.
void ParallelFor(ffi::ThreadPool& pool, int64_t count, int max_workers,
                 const std::function<void(int64_t, int)>& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int> workers{1};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
    const std::function<void(int64_t, int)>* body;
    int64_t count;
  };
  auto state = std::make_shared<State>();
  state->body = &body;
  state->count = count;
  auto work = [](State& s, int worker) {
    int64_t finished = 0;
    for (int64_t i; (i = s.next.fetch_add(1)) < s.count; ++finished) (*s.body)(i, worker);
    if (finished) {
      std::lock_guard<std::mutex> lock(s.mu);
      s.done += finished;
      if (s.done == s.count) s.cv.notify_all();
    }
  };
  const int64_t helpers =
      std::min<int64_t>({pool.num_threads(), count, max_workers}) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([state, work] {
      if (state->next.load() >= state->count) return;
      const int worker = state->workers.fetch_add(1);
      work(*state, worker);
    });
  }
  work(*state, 0);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == state->count; });
}

int MaxWorkers(ffi::ThreadPool& pool) {
  return static_cast<int>(std::max<int64_t>(1, pool.num_threads()));
}

// The padded sample's s * s phase planes, each [hq, wq, C]: padded pixel (r, q) is at
// (r / s, q / s) of plane (r % s, q % s).
struct Planes {
  int64_t s, hq, wq, c;
  const float* data;
  // The start of the contiguous span that output row `ho` reads for tap offsets (di, dj)
  // (i * rhs_dilation, j * rhs_dilation).
  const float* span(int64_t ho, int64_t di, int64_t dj) const {
    return data + ((((di % s) * s + dj % s) * hq + ho + di / s) * wq + dj / s) * c;
  }
};

// n floats from src to dst, rectified where `relu`.
void CopyPixels(float* dst, const float* src, int64_t n, bool relu) {
  if (!relu) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] < 0.0f ? 0.0f : src[i];  // NaN stays.
}

// Pads (and dilates) one [H, W, C] sample into its phase planes in `buffer`.
Planes PadSample(const float* x, const Dims& d, const Geometry& g, int64_t hp, int64_t wp,
                 bool relu, std::vector<float>& buffer) {
  const int64_t s = g.stride;
  Planes p{s, (hp + s - 1) / s, (wp + s - 1) / s, d.c, nullptr};
  buffer.assign(s * s * p.hq * p.wq * d.c, 0.0f);
  float* out = buffer.data();
  for (int64_t h = 0; h < d.h; ++h) {
    const int64_t r = g.pad_h_lo + h * g.lhs_dilation;
    if (r < 0 || r >= hp) continue;
    const float* xr = x + h * d.w * d.c;
    if (s == 1 && g.lhs_dilation == 1) {  // One run of the row, cropped.
      const int64_t w0 = std::max<int64_t>(0, -g.pad_w_lo);
      const int64_t w1 = std::min<int64_t>(d.w, wp - g.pad_w_lo);
      if (w1 > w0)
        CopyPixels(out + (r * wp + g.pad_w_lo + w0) * d.c, xr + w0 * d.c, (w1 - w0) * d.c,
                   relu);
      continue;
    }
    for (int64_t w = 0; w < d.w; ++w) {
      const int64_t q = g.pad_w_lo + w * g.lhs_dilation;
      if (q < 0 || q >= wp) continue;
      CopyPixels(out + ((((r % s) * s + q % s) * p.hq + r / s) * p.wq + q / s) * d.c,
                 xr + w * d.c, d.c, relu);
    }
  }
  p.data = buffer.data();
  return p;
}

// Each tap's C weights repeated `times` times: [kh * kw, times * C]. With `flip` the
// filter is mirrored in both spatial axes, i.e. the taps are read in reverse order.
void TileTaps(const float* w, int64_t taps, int64_t c, int64_t times, bool flip,
              float* tiled) {
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t k = 0; k < times; ++k)
      std::memcpy(tiled + (t * times + k) * c, w + (flip ? taps - 1 - t : t) * c,
                  c * sizeof(float));
}

struct Scratch {
  std::vector<float> padded, tiled, acc;
  int64_t tiled_e = -1;  // Whose weights `tiled` holds.
};

constexpr int64_t kBlock = 32;

ffi::Error Conv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t lhs_dilation,
                int64_t rhs_dilation, int64_t pad_h_lo, int64_t pad_h_hi, int64_t pad_w_lo,
                int64_t pad_w_hi, int64_t flip, int64_t relu) {
  const Geometry g{stride, lhs_dilation, rhs_dilation, pad_h_lo, pad_h_hi, pad_w_lo, pad_w_hi};
  const Dims d = SplitDims(x.dimensions());
  const auto wd = w.dimensions();
  const int64_t kh = wd[wd.size() - 3], kw = wd[wd.size() - 2], taps = kh * kw;
  const int64_t hp = g.padded(d.h, pad_h_lo, pad_h_hi), wp = g.padded(d.w, pad_w_lo, pad_w_hi);
  const int64_t ho = g.out(hp, kh), wo = g.out(wp, kw);
  const auto yd = y->dimensions();
  if (ho != yd[yd.size() - 3] || wo != yd[yd.size() - 2])
    return ffi::Error::InvalidArgument("jaxnas depthwise conv: output shape mismatch");
  const int64_t filters = LeadingSize(wd, 3);  // E of the filters; d.e (of x) divides it.
  if (filters % d.e)
    return ffi::Error::InvalidArgument(
        "jaxnas depthwise conv: x's leading axes must end w's");
  const int64_t row = wo * d.c;
  const float* xs = x.typed_data();
  const float* ws = w.typed_data();
  float* ys = y->typed_data();
  const int workers = MaxWorkers(pool);
  std::vector<Scratch> scratch(workers);
  ParallelFor(pool, filters * d.n, workers, [&](int64_t item, int worker) {
    Scratch& s = scratch[worker];
    const int64_t e = item / d.n;
    const int64_t sample = (e % d.e) * d.n + item % d.n;
    const Planes p = PadSample(xs + sample * d.h * d.w * d.c, d, g, hp, wp, relu != 0,
                               s.padded);
    if (s.tiled_e != e) {  // Samples of one e come in a run; tile its weights once.
      s.tiled.resize(taps * row);
      TileTaps(ws + e * taps * d.c, taps, d.c, wo, flip != 0, s.tiled.data());
      s.tiled_e = e;
    }
    float* out = ys + item * ho * row;
    for (int64_t r = 0; r < ho; ++r) {
      float* yr = out + r * row;
      // Blocks of kBlock outputs, summed over all taps in registers.
      for (int64_t k0 = 0; k0 < row; k0 += kBlock) {
        const int64_t len = std::min(kBlock, row - k0);
        float acc[kBlock] = {};
        for (int64_t i = 0; i < kh; ++i)
          for (int64_t j = 0; j < kw; ++j) {
            const float* __restrict src = p.span(r, i * rhs_dilation, j * rhs_dilation) + k0;
            const float* __restrict wt = s.tiled.data() + (i * kw + j) * row + k0;
            if (len == kBlock) {
              for (int64_t k = 0; k < kBlock; ++k) acc[k] += src[k] * wt[k];
            } else {
              for (int64_t k = 0; k < len; ++k) acc[k] += src[k] * wt[k];
            }
          }
        std::memcpy(yr + k0, acc, len * sizeof(float));
      }
    }
  });
  return ffi::Error::Success();
}

// dw [*B, kh, kw, C] from x [*Bx, N, H, W, C] and the output cotangent g [*B, N, Ho, Wo, C].
// Each sample's products are summed on their own first (over Ho and Wo), then the
// samples' sums in order: short float32 summation chains, and the same result however
// the samples were spread over threads.
ffi::Error WeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gy,
                      ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t lhs_dilation,
                      int64_t rhs_dilation, int64_t pad_h_lo, int64_t pad_h_hi,
                      int64_t pad_w_lo, int64_t pad_w_hi, int64_t relu) {
  const Geometry g{stride, lhs_dilation, rhs_dilation, pad_h_lo, pad_h_hi, pad_w_lo, pad_w_hi};
  const Dims d = SplitDims(x.dimensions());
  const auto kd = dw->dimensions();
  const int64_t kh = kd[kd.size() - 3], kw = kd[kd.size() - 2], taps = kh * kw;
  const int64_t hp = g.padded(d.h, pad_h_lo, pad_h_hi), wp = g.padded(d.w, pad_w_lo, pad_w_hi);
  const int64_t ho = g.out(hp, kh), wo = g.out(wp, kw);
  const auto gd = gy.dimensions();
  if (ho != gd[gd.size() - 3] || wo != gd[gd.size() - 2])
    return ffi::Error::InvalidArgument("jaxnas depthwise weight grad: cotangent shape mismatch");
  const int64_t filters = LeadingSize(gd, 4);
  if (filters % d.e)
    return ffi::Error::InvalidArgument(
        "jaxnas depthwise weight grad: x's leading axes must end g's");
  // Per-sample sums, [taps, Wo * C]: reduced over Wo at the end.
  const int64_t row = wo * d.c;
  const float* xs = x.typed_data();
  const float* gs = gy.typed_data();
  const int workers = MaxWorkers(pool);
  std::vector<Scratch> scratch(workers);
  std::vector<float> sums(filters * d.n * taps * d.c);  // Per sample: [E * N, taps, C].
  ParallelFor(pool, filters * d.n, workers, [&](int64_t item, int worker) {
    Scratch& s = scratch[worker];
    const int64_t sample = (item / d.n % d.e) * d.n + item % d.n;
    const Planes p = PadSample(xs + sample * d.h * d.w * d.c, d, g, hp, wp, relu != 0,
                               s.padded);
    const float* gi = gs + item * ho * row;
    s.acc.assign(taps * row, 0.0f);
    for (int64_t r = 0; r < ho; ++r) {
      const float* __restrict gr = gi + r * row;
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j) {
          const float* __restrict src = p.span(r, i * rhs_dilation, j * rhs_dilation);
          float* __restrict acc = s.acc.data() + (i * kw + j) * row;
          for (int64_t k = 0; k < row; ++k) acc[k] += src[k] * gr[k];
        }
    }
    float* sum = sums.data() + item * taps * d.c;
    std::fill(sum, sum + taps * d.c, 0.0f);
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t k = 0; k < row; ++k) sum[t * d.c + k % d.c] += s.acc[t * row + k];
  });
  float* out = dw->typed_data();
  std::fill(out, out + filters * taps * d.c, 0.0f);
  for (int64_t item = 0; item < filters * d.n; ++item) {
    float* __restrict total = out + (item / d.n) * taps * d.c;
    const float* __restrict sum = sums.data() + item * taps * d.c;
    for (int64_t k = 0; k < taps * d.c; ++k) total[k] += sum[k];
  }
  return ffi::Error::Success();
}

}  // namespace

// A handler of the intra-op thread pool and buffers of the given element types.
#define JAXNAS_BIND_1_TO_1(In, Out) \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<In>>().Ret<ffi::Buffer<Out>>()
#define JAXNAS_BIND_2_TO_1(In0, In1, Out)                                   \
  ffi::Ffi::Bind()                                                          \
      .Ctx<ffi::ThreadPool>()                                               \
      .Arg<ffi::Buffer<In0>>()                                              \
      .Arg<ffi::Buffer<In1>>()                                              \
      .Ret<ffi::Buffer<Out>>()

#define JAXNAS_BIND_GEOMETRY(binding)                                             \
  binding.Attr<int64_t>("stride")                                                 \
      .Attr<int64_t>("lhs_dilation")                                              \
      .Attr<int64_t>("rhs_dilation")                                              \
      .Attr<int64_t>("pad_h_lo")                                                  \
      .Attr<int64_t>("pad_h_hi")                                                  \
      .Attr<int64_t>("pad_w_lo")                                                  \
      .Attr<int64_t>("pad_w_hi")

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxnasDepthwiseConv, Conv,
    JAXNAS_BIND_GEOMETRY(JAXNAS_BIND_2_TO_1(ffi::F32, ffi::F32, ffi::F32))
        .Attr<int64_t>("flip")
        .Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxnasDepthwiseWeightGrad, WeightGrad,
    JAXNAS_BIND_GEOMETRY(JAXNAS_BIND_2_TO_1(ffi::F32, ffi::F32, ffi::F32))
        .Attr<int64_t>("relu"));

// ---------------------------------------------------------------------------------
// Max pooling through the index of each window's first maximum (jaxnas/ops/primitives.py):
// index [*B, N, Ho, Wo, C] int8 is the row-major tap of the window's first maximum
// (the input padded with -inf; NaN wins over numbers), gather reads a tensor at those
// taps (padding reads 0) and scatter is gather's transpose, adding each output's
// cotangent at the position its index points to.
// ---------------------------------------------------------------------------------

namespace {

struct PoolGeometry {
  int64_t window, stride, pad_h_lo, pad_w_lo, ho, wo;
};

// The geometry of a pool whose index (an output-shaped array) has dimensions `od`.
PoolGeometry MakePoolGeometry(ffi::Span<const int64_t> od, int64_t window, int64_t stride,
                              int64_t pad_h_lo, int64_t pad_w_lo) {
  return {window, stride, pad_h_lo, pad_w_lo, od[od.size() - 3], od[od.size() - 2]};
}

template <typename Body>
ffi::Error ForEachPoolSample(ffi::ThreadPool& pool, const Dims& d, Body body) {
  ParallelFor(pool, d.e * d.n, 1 << 30, [&](int64_t item, int) { body(item); });
  return ffi::Error::Success();
}

// Calls pick(o, i) for every output element o of one sample (offsets within the
// sample), with i the offset of the input element its index points to, or -1 where that
// is padding.
template <typename Pick>
void ForEachPick(const int8_t* index, const Dims& d, const PoolGeometry& g, Pick pick) {
  for (int64_t r = 0; r < g.ho; ++r)
    for (int64_t q = 0; q < g.wo; ++q)
      for (int64_t c = 0; c < d.c; ++c) {
        const int64_t o = (r * g.wo + q) * d.c + c;
        const int64_t h = r * g.stride + index[o] / g.window - g.pad_h_lo;
        const int64_t w = q * g.stride + index[o] % g.window - g.pad_w_lo;
        pick(o, (h < 0 || h >= d.h || w < 0 || w >= d.w) ? -1 : (h * d.w + w) * d.c + c);
      }
}

ffi::Error MaxPoolIndex(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::ResultBuffer<ffi::S8> index, int64_t window, int64_t stride,
                        int64_t pad_h_lo, int64_t pad_w_lo) {
  const Dims d = SplitDims(x.dimensions());
  const PoolGeometry g = MakePoolGeometry(index->dimensions(), window, stride, pad_h_lo, pad_w_lo);
  const float* xs = x.typed_data();
  int8_t* is = index->typed_data();
  return ForEachPoolSample(pool, d, [&](int64_t item) {
    const float* xi = xs + item * d.h * d.w * d.c;
    int8_t* ii = is + item * g.ho * g.wo * d.c;
    std::vector<float> best(d.c);
    for (int64_t r = 0; r < g.ho; ++r)
      for (int64_t q = 0; q < g.wo; ++q) {
        int8_t* io = ii + (r * g.wo + q) * d.c;
        std::fill(best.begin(), best.end(), -std::numeric_limits<float>::infinity());
        std::fill(io, io + d.c, 0);
        for (int64_t t = 0; t < window * window; ++t) {
          const int64_t h = r * stride + t / window - pad_h_lo;
          const int64_t w = q * stride + t % window - pad_w_lo;
          if (h < 0 || h >= d.h || w < 0 || w >= d.w) continue;  // -inf never wins.
          const float* v = xi + (h * d.w + w) * d.c;
          for (int64_t c = 0; c < d.c; ++c) {
            if (v[c] > best[c] || (std::isnan(v[c]) && !std::isnan(best[c]))) {
              best[c] = v[c];
              io[c] = static_cast<int8_t>(t);
            }
          }
        }
      }
  });
}

ffi::Error PoolGather(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> index,
                      ffi::Buffer<ffi::F32> t, ffi::ResultBuffer<ffi::F32> out,
                      int64_t window, int64_t stride, int64_t pad_h_lo, int64_t pad_w_lo) {
  const Dims d = SplitDims(t.dimensions());
  const PoolGeometry g = MakePoolGeometry(index.dimensions(), window, stride, pad_h_lo, pad_w_lo);
  const int8_t* is = index.typed_data();
  const float* ts = t.typed_data();
  float* os = out->typed_data();
  return ForEachPoolSample(pool, d, [&](int64_t item) {
    const float* ti = ts + item * d.h * d.w * d.c;
    const int8_t* ii = is + item * g.ho * g.wo * d.c;
    float* oi = os + item * g.ho * g.wo * d.c;
    ForEachPick(ii, d, g, [&](int64_t o, int64_t i) { oi[o] = i < 0 ? 0.0f : ti[i]; });
  });
}

ffi::Error PoolScatter(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> index,
                       ffi::Buffer<ffi::F32> g_out, ffi::ResultBuffer<ffi::F32> dx,
                       int64_t window, int64_t stride, int64_t pad_h_lo, int64_t pad_w_lo) {
  const Dims d = SplitDims(dx->dimensions());
  const PoolGeometry g = MakePoolGeometry(index.dimensions(), window, stride, pad_h_lo, pad_w_lo);
  const int8_t* is = index.typed_data();
  const float* gs = g_out.typed_data();
  float* xs = dx->typed_data();
  return ForEachPoolSample(pool, d, [&](int64_t item) {
    const int8_t* ii = is + item * g.ho * g.wo * d.c;
    const float* gi = gs + item * g.ho * g.wo * d.c;
    float* xi = xs + item * d.h * d.w * d.c;
    std::fill(xi, xi + d.h * d.w * d.c, 0.0f);
    ForEachPick(ii, d, g, [&](int64_t o, int64_t i) {
      if (i >= 0) xi[i] += gi[o];
    });
  });
}

}  // namespace

#define JAXNAS_BIND_POOL(binding)                                                 \
  binding.Attr<int64_t>("window")                                                 \
      .Attr<int64_t>("stride")                                                    \
      .Attr<int64_t>("pad_h_lo")                                                  \
      .Attr<int64_t>("pad_w_lo")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnasMaxPoolIndex, MaxPoolIndex,
                              JAXNAS_BIND_POOL(JAXNAS_BIND_1_TO_1(ffi::F32, ffi::S8)));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxnasPoolGather, PoolGather,
    JAXNAS_BIND_POOL(JAXNAS_BIND_2_TO_1(ffi::S8, ffi::F32, ffi::F32)));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxnasPoolScatter, PoolScatter,
    JAXNAS_BIND_POOL(JAXNAS_BIND_2_TO_1(ffi::S8, ffi::F32, ffi::F32)));
