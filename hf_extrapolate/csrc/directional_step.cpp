// The directional step (`hf_extrapolate.fast_step`) fused into a few passes per row, for float32 CPU tensors.
//
// Built on first use by `hf_extrapolate.cpu_kernel.enable()` (torch.utils.cpp_extension, cached). One call computes,
// per row of the RL scores `r` and the base scores `b` (both (B, V), contiguous, never modified):
//
//   rl = log_softmax(r), base = log_softmax(b masked where r is -inf), log p = log_softmax(proposal / T),
//   f = [s (rl - base) < tau] (NaN -> 0), ext = ((1 + gamma) rl - gamma max(base, log tiny)) / T, r = softmax(ext),
//   sampling: M = sum p f, q = p (1 - f) + M r, returns log q (and r, M);
//   greedy:   y0 = argmax log p, fire = f[y0] (or the given random draw), returns log r on fired rows, log p on the
//             others (and M = fire as 0 / 1).
//
// The same formulas as fast_step.py (which documents them); the passes are what is fused: a max pass, a sum-of-exp
// pass, one pass forming the criterion, the kept mass and Eq. 7's logits, one sum-of-exp pass for the redraw (skipped
// when it equals the RL distribution), and the log of the mixture. q is formed in probability space; a vector where
// some q falls below 1e-30 (or 0: underflow) is recomputed in log space, logaddexp(log p or -inf, log M + log r),
// which is exact everywhere. The hot passes' exp / log are inlined under AVX-512 (within 1 ulp, below); elsewhere ATen's SLEEF ones.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kW = Vec::size();

struct Config {
  float temperature;  // > 0
  float gamma;        // > -1
  float one_plus_gamma;  // formed in double: 1 + gamma for gamma just above -1 is not 0
  float tau;          // threshold (token criteria) or the replacement probability (random)
  bool rl_minus_base;  // the criterion compares rl - base (else base - rl)
  bool rl_proposes;
  bool random;
  float log_tiny;
  float safe;  // below this a probability is formed in log space
};

inline float hmax(const Vec& v) {
  alignas(64) float tmp[kW];
  v.store(tmp);
  float m = tmp[0];
  for (int64_t k = 1; k < kW; ++k) m = (tmp[k] > m || std::isnan(tmp[k])) ? tmp[k] : m;
  return m;
}

inline float hsum(const Vec& v) {
  alignas(64) float tmp[kW];
  v.store(tmp);
  float s = 0.f;
  for (int64_t k = 0; k < kW; ++k) s += tmp[k];
  return s;
}

inline float lane0(const Vec& v) {
  alignas(64) float tmp[kW];
  v.store(tmp);
  return tmp[0];
}

inline float smax(float a, float b) { return (std::isnan(a) || a > b) ? a : b; }

// exp and log of the hot passes. With AVX-512 they are inlined here (ATen's SLEEF functions are calls that cost 1.5x
// (exp) and 3x (log) as much at one thread): within 1 ulp of the correctly rounded result for every float32 input,
// denormals, 0, +-inf and NaN included (tests/test_cpu_kernel.py checks every exponent range against float64). Other
// instruction sets use ATen's vectorised (SLEEF) ones.
#if defined(CPU_CAPABILITY_AVX512)
inline Vec vexp(const Vec& v) {
  // exp(x) = 2^q e^s, q = round(x / ln 2), |s| <= ln 2 / 2 (Cody-Waite, ln 2 in two parts); e^s by its Taylor
  // polynomial of degree 7 (truncation 5e-9 relative, 0.06 ulp); 2^q applied by scalef, which rounds overflow to inf
  // and underflow to the nearest denormal / 0. The clamp keeps q finite (and NaN: max / min return their second
  // operand when one is NaN).
  __m512 x = _mm512_min_ps(_mm512_set1_ps(89.f), _mm512_max_ps(_mm512_set1_ps(-104.f), __m512(v)));
  __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 s = _mm512_fnmadd_ps(q, _mm512_set1_ps(0.693145751953125f), x);
  s = _mm512_fnmadd_ps(q, _mm512_set1_ps(1.428606765330187045e-06f), s);
  __m512 u = _mm512_set1_ps(1.f / 5040.f);
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(1.f / 720.f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(1.f / 120.f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(1.f / 24.f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(1.f / 6.f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.5f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(1.f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(1.f));
  return Vec(_mm512_scalef_ps(u, q));
}

inline Vec vlog(const Vec& v) {
  // log(x) = e ln 2 + log1p(f), m = 1 + f in [0.75, 1.5) and e from getmant / getexp (denormals included);
  // log1p(f) = f + f^2 g(f) with g a degree-8 polynomial (Chebyshev fit on [-0.25, 0.5], 5e-9 absolute). Negative
  // inputs give NaN (getmant's sign control), 0 gives -inf, +inf gives +inf.
  __m512 x = __m512(v);
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_nan);
  __m512 e = _mm512_getexp_ps(x);
  e = _mm512_mask_add_ps(e, _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.f), _CMP_LT_OQ), e, _mm512_set1_ps(1.f));
  __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.f));
  __m512 g = _mm512_set1_ps(-0.04857634752988815f);
  g = _mm512_fmadd_ps(g, f, _mm512_set1_ps(0.10748569667339325f));
  g = _mm512_fmadd_ps(g, f, _mm512_set1_ps(-0.1314474195241928f));
  g = _mm512_fmadd_ps(g, f, _mm512_set1_ps(0.14426705241203308f));
  g = _mm512_fmadd_ps(g, f, _mm512_set1_ps(-0.16644467413425446f));
  g = _mm512_fmadd_ps(g, f, _mm512_set1_ps(0.1999390870332718f));
  g = _mm512_fmadd_ps(g, f, _mm512_set1_ps(-0.2500024437904358f));
  g = _mm512_fmadd_ps(g, f, _mm512_set1_ps(0.33333393931388855f));
  g = _mm512_fmadd_ps(g, f, _mm512_set1_ps(-0.5f));
  __m512 l = _mm512_fmadd_ps(_mm512_mul_ps(f, f), g, f);
  return Vec(_mm512_fmadd_ps(e, _mm512_set1_ps(0.693147180559945309f), l));
}
#else
inline Vec vexp(const Vec& v) { return v.exp(); }
inline Vec vlog(const Vec& v) { return v.log(); }
#endif

// The per-row constants every later pass needs.
struct Row {
  float max_r, max_b, log_sum_r, log_sum_b;  // rl = (r - max_r) - log_sum_r, base = (b' - max_b) - log_sum_b
  float max_x, log_sum_x;                    // the warped proposal (T != 1): log p = (x / T - max_x) - log_sum_x
  float sum_x;                                // sum of exp of the proposal's log-softmax argument (p = e / sum_x)
  float sum_r;                                // sum of exp(r - max_r)
};

// One element's quantities, in the vector form (used by the passes and the log-space repair).
struct Elem {
  Vec rl, base, lp, f, ext;
};

// b + (-inf) where r is -inf, as fast_step's additive mask: a NaN / +inf base logit there still poisons the row
// (and is flagged) instead of being hidden by the mask
#if defined(CPU_CAPABILITY_AVX512)
inline Vec masked_base(const Vec& x, const Vec& y) {  // a compare into a mask register and a masked add
  const __m512 inf = _mm512_set1_ps(kNegInf);
  return Vec(_mm512_mask_add_ps(__m512(y), _mm512_cmp_ps_mask(__m512(x), inf, _CMP_EQ_OQ), __m512(y), inf));
}
#else
inline Vec masked_base(const Vec& x, const Vec& y) {
  return Vec::blendv(y, y + Vec(kNegInf), x == Vec(kNegInf));
}
#endif

// The running maximum of the max passes, NaN in `x` ignored (one instruction under AVX-512, where at::vec's
// NaN-propagating maximum takes four). A NaN still reaches every result: the sum of exp(x - max) over the row is
// NaN, so are the log-normaliser, every log-probability of the row and its check value (flagged).
#if defined(CPU_CAPABILITY_AVX512)
inline Vec running_max(const Vec& acc, const Vec& x) { return Vec(_mm512_max_ps(__m512(x), __m512(acc))); }
#else
inline Vec running_max(const Vec& acc, const Vec& x) { return at::vec::maximum(acc, x); }
#endif

inline Elem element(const Config& c, const Row& w, const Vec& x, const Vec& ym) {
  Elem e;
  e.rl = (x - Vec(w.max_r)) - Vec(w.log_sum_r);
  e.base = (ym - Vec(w.max_b)) - Vec(w.log_sum_b);
  if (c.temperature == 1.f) {
    e.lp = c.rl_proposes ? e.rl : e.base;
  } else {
    e.lp = ((c.rl_proposes ? x : ym) / Vec(c.temperature) - Vec(w.max_x)) - Vec(w.log_sum_x);
  }
  if (c.random) {
    e.f = Vec(c.tau);  // every token is replaced with probability tau: M = tau, kept = p (1 - tau)
  } else {
    Vec diff = c.rl_minus_base ? e.rl - e.base : e.base - e.rl;
    e.f = diff.lt(Vec(c.tau));  // 1.0 / 0.0; NaN compares false
  }
  if (c.gamma == 0.f) {
    e.ext = e.rl;
  } else {
    Vec floored = at::vec::maximum(e.base, Vec(c.log_tiny));
    if (c.gamma > 0.f) {
      e.ext = floored + Vec(c.one_plus_gamma) * (e.rl - floored);  // lerp: -inf where rl is -inf
    } else {
      e.ext = e.rl * Vec(c.one_plus_gamma) + floored * Vec(-c.gamma);
    }
  }
  if (c.temperature != 1.f) e.ext = e.ext / Vec(c.temperature);
  return e;
}

inline float scalar_masked_base(float x, float y) { return x == kNegInf ? y + kNegInf : y; }

// Passes 1 and 2: maxima and log sums of exp of both models (and of the warped proposal). When `store_x` is given the
// proposal's exp(arg - max) is stored there (so that p needs no exp later); `store_r` gets exp(r - max_r).
Row row_constants(const Config& c, const float* r, const float* b, int64_t V, float* store_x, float* store_r) {
  Row w{};
  Vec vr(kNegInf), vb(kNegInf);
  int64_t i = 0;
  for (; i + kW <= V; i += kW) {
    Vec x = Vec::loadu(r + i);
    vr = running_max(vr, x);
    vb = running_max(vb, masked_base(x, Vec::loadu(b + i)));
  }
  w.max_r = hmax(vr);
  w.max_b = hmax(vb);
  for (; i < V; ++i) {
    w.max_r = smax(r[i], w.max_r);
    w.max_b = smax(scalar_masked_base(r[i], b[i]), w.max_b);
  }
  const bool warped = c.temperature != 1.f;
  const float T = c.temperature;
  w.max_x = warped ? (c.rl_proposes ? w.max_r : w.max_b) / T : 0.f;
  Vec sr(0.f), sb(0.f), sx(0.f);
  i = 0;
  for (; i + kW <= V; i += kW) {
    Vec x = Vec::loadu(r + i);
    Vec ym = masked_base(x, Vec::loadu(b + i));
    Vec er = vexp(x - Vec(w.max_r));
    Vec eb = vexp(ym - Vec(w.max_b));
    sr = sr + er;
    sb = sb + eb;
    if (store_r) er.store(store_r + i);
    if (warped) {
      Vec ex = vexp((c.rl_proposes ? x : ym) / Vec(T) - Vec(w.max_x));
      sx = sx + ex;
      if (store_x) ex.store(store_x + i);
    } else if (store_x) {
      (c.rl_proposes ? er : eb).store(store_x + i);
    }
  }
  float sum_r = hsum(sr), sum_b = hsum(sb), sum_x = hsum(sx);
  for (; i < V; ++i) {
    float ym = scalar_masked_base(r[i], b[i]);
    float er = std::exp(r[i] - w.max_r), eb = std::exp(ym - w.max_b);
    sum_r += er;
    sum_b += eb;
    if (store_r) store_r[i] = er;
    if (warped) {
      float ex = std::exp((c.rl_proposes ? r[i] : ym) / T - w.max_x);
      sum_x += ex;
      if (store_x) store_x[i] = ex;
    } else if (store_x) {
      store_x[i] = c.rl_proposes ? er : eb;
    }
  }
  w.sum_r = sum_r;
  w.log_sum_r = std::log(sum_r);
  w.log_sum_b = std::log(sum_b);
  w.sum_x = warped ? sum_x : (c.rl_proposes ? sum_r : sum_b);
  w.log_sum_x = std::log(w.sum_x);
  return w;
}

// One vector of the first-argmax scan: where `v` is strictly greater than the lane's best so far, take its value and
// index (NaN compares false: NaN rows are handled by the caller).
#if defined(CPU_CAPABILITY_AVX512)
inline void argmax_update(Vec& best, Vec& index, const Vec& v, const Vec& here) {
  const __mmask16 greater = _mm512_cmp_ps_mask(__m512(v), __m512(best), _CMP_GT_OQ);
  best = Vec(_mm512_mask_mov_ps(__m512(best), greater, __m512(v)));
  index = Vec(_mm512_mask_mov_ps(__m512(index), greater, __m512(here)));
}
#else
inline void argmax_update(Vec& best, Vec& index, const Vec& v, const Vec& here) {
  const Vec greater = v > best;
  best = Vec::blendv(best, v, greater);
  index = Vec::blendv(index, here, greater);
}
#endif

// Scalar tail of `element` (the last V % kW entries).
inline void element_tail(const Config& c, const Row& w, float x, float y, float* rl, float* base, float* lp, float* f,
                         float* ext) {
  Vec e_x(x), e_y(scalar_masked_base(x, y));
  Elem e = element(c, w, e_x, e_y);
  *rl = lane0(e.rl);
  *base = lane0(e.base);
  *lp = lane0(e.lp);
  *f = lane0(e.f);
  *ext = lane0(e.ext);
}

// ---------------------------------------------------------------------------------------------------------- sampling
void sample_row(const Config& c, const float* r, const float* b, int64_t V, float* out, float* redraw, float* mass_out,
                float* check_out) {
  // out first holds exp(proposal arg - max), then the kept mass p (1 - f), then log q; redraw holds ext, then r
  const bool redraw_is_rl = c.gamma == 0.f && c.temperature == 1.f;
  Row w = row_constants(c, r, b, V, out, redraw_is_rl ? redraw : nullptr);
  const Vec inv_sum_x(1.f / w.sum_x);
  // pass 3: the criterion, the kept mass and the replaced mass M, Eq. 7's logits and their max
  Vec vm(0.f), vmax_e(kNegInf);
  float mass = 0.f, max_e = kNegInf;
  int64_t i = 0;
  for (; i + kW <= V; i += kW) {
    Vec x = Vec::loadu(r + i);
    Elem e = element(c, w, x, masked_base(x, Vec::loadu(b + i)));
    Vec p = Vec::loadu(out + i) * inv_sum_x;
    Vec fired = p * e.f;
    vm = vm + fired;
    (p - fired).store(out + i);
    if (!redraw_is_rl) {
      e.ext.store(redraw + i);
      vmax_e = at::vec::maximum(vmax_e, e.ext);
    }
  }
  mass = hsum(vm);
  max_e = hmax(vmax_e);
  for (; i < V; ++i) {
    float rl, base, lp, f, ext;
    element_tail(c, w, r[i], b[i], &rl, &base, &lp, &f, &ext);
    float p = out[i] * (1.f / w.sum_x);
    mass += p * f;
    out[i] = p - p * f;
    if (!redraw_is_rl) {
      redraw[i] = ext;
      max_e = smax(ext, max_e);
    }
  }
  if (c.random) mass = c.tau;  // exactly tau (the sum above is tau up to rounding)
  // pass 4: the redraw's normaliser (exp(ext - max) stored in place); for gamma = 0, T = 1 it is the RL's own
  float sum_e, log_sum_e = 0.f;  // log r = (ext - max_e) - log_sum_e
  if (redraw_is_rl) {
    sum_e = w.sum_r;  // ext = rl: log r = rl = (r - max_r) - log_sum_r
  } else {
    Vec se(0.f);
    i = 0;
    for (; i + kW <= V; i += kW) {
      Vec ee = vexp(Vec::loadu(redraw + i) - Vec(max_e));
      se = se + ee;
      ee.store(redraw + i);
    }
    sum_e = hsum(se);
    for (; i < V; ++i) {
      redraw[i] = std::exp(redraw[i] - max_e);
      sum_e += redraw[i];
    }
    log_sum_e = std::log(sum_e);
  }
  // pass 5: r, q = kept + M r and log q; a vector with some q < safe is redone in log space
  const float keep = c.random ? 1.f - c.tau : 1.f;  // random: log of the kept mass is log p + log(1 - tau)
  const Vec inv_sum_e(1.f / sum_e), vmass(mass), vsafe(c.safe);
  const float log_mass = std::log(mass), log_keep = std::log(keep);
  i = 0;
  auto repair = [&](const Vec& x, const Vec& y) -> Vec {
    Elem e = element(c, w, x, masked_base(x, y));
    Vec log_r = redraw_is_rl ? e.rl : (e.ext - Vec(max_e)) - Vec(log_sum_e);  // ATen's order
    Vec a = c.random ? e.lp + Vec(log_keep) : Vec::blendv(e.lp, Vec(kNegInf), e.f == Vec(1.f));  // log kept
    Vec cc = log_r + Vec(log_mass);
    Vec m = at::vec::maximum(a, cc);
    Vec d = at::vec::minimum(a, cc) - m;
    Vec res = m + d.exp().log1p();
    return Vec::blendv(res, Vec(kNegInf), m == Vec(kNegInf));
  };
  for (; i + kW <= V; i += kW) {
    Vec rr = Vec::loadu(redraw + i) * inv_sum_e;
    Vec q = Vec::loadu(out + i) + vmass * rr;
    rr.store(redraw + i);
    Vec lq = vlog(q);
    Vec small = q < vsafe;
    if (small.zero_mask() != (1 << kW) - 1) {  // some lane below safe (or NaN-free underflow): log space
      lq = Vec::blendv(lq, repair(Vec::loadu(r + i), Vec::loadu(b + i)), small);
    }
    lq.store(out + i);
  }
  for (; i < V; ++i) {
    float rr = redraw[i] / sum_e;
    float q = out[i] + mass * rr;
    redraw[i] = rr;
    out[i] = q < c.safe ? lane0(repair(Vec(r[i]), Vec(b[i]))) : std::log(q);
  }
  *mass_out = mass;
  *check_out = (w.max_r + w.log_sum_r) + (w.max_b + w.log_sum_b) + mass;
}

// ------------------------------------------------------------------------------------------------------------ greedy
void greedy_row(const Config& c, const float* r, const float* b, int64_t V, float* out, float given_fire,
                float* mass_out, float* check_out) {
  Row w = row_constants(c, r, b, V, nullptr, nullptr);
  // pass 3: log p, and its first argmax (the token generate's argmax picks from the returned scores): per lane the
  // first strictly greatest value and its index (exact in float below 2^24 tokens), merged at the end. A NaN log p
  // (which torch's argmax takes as the maximum) exists iff the proposal's normaliser is NaN, and then every log p of
  // the row is NaN (its sum of exp includes the NaN): the row's first NaN is found by a scan.
  const bool warped = c.temperature != 1.f;
  const float offset = warped ? w.max_x + w.log_sum_x : (c.rl_proposes ? w.max_r + w.log_sum_r : w.max_b + w.log_sum_b);
  Vec vbest(kNegInf), vindex(0.f), lanes(0.f);
  {
    alignas(64) float offsets[kW];
    for (int64_t k = 0; k < kW; ++k) offsets[k] = static_cast<float>(k);
    lanes = Vec::loadu(offsets);
    vindex = lanes;
  }
  Vec here = lanes;  // the indices of the current vector
  const Vec step(static_cast<float>(kW));
  int64_t i = 0;
  for (; i + kW <= V; i += kW) {
    Vec x = Vec::loadu(r + i);
    Elem e = element(c, w, x, masked_base(x, Vec::loadu(b + i)));
    e.lp.store(out + i);
    argmax_update(vbest, vindex, e.lp, here);
    here = here + step;
  }
  int64_t y0 = -1;
  if (i > 0) {
    alignas(64) float values[kW], indices[kW];
    vbest.store(values);
    vindex.store(indices);
    float top = values[0];
    for (int64_t k = 1; k < kW; ++k) top = values[k] > top ? values[k] : top;
    for (int64_t k = 0; k < kW; ++k) {
      const int64_t index = static_cast<int64_t>(indices[k]);
      if (values[k] == top && (y0 < 0 || index < y0)) y0 = index;
    }
  }
  float tail_best = kNegInf;
  int64_t tail_y0 = -1;
  bool nan_seen = std::isnan(offset);
  for (; i < V; ++i) {
    float rl, base, lp, f, ext;
    element_tail(c, w, r[i], b[i], &rl, &base, &lp, &f, &ext);
    out[i] = lp;
    nan_seen = nan_seen || std::isnan(lp);
    if (lp > tail_best || (tail_y0 < 0 && lp == tail_best)) {
      tail_best = lp;
      tail_y0 = i;
    }
  }
  if (nan_seen) {
    for (y0 = 0; y0 < V && !std::isnan(out[y0]); ++y0) {
    }
    if (y0 == V) y0 = 0;
  } else if (y0 < 0 || (tail_y0 >= 0 && tail_best > out[y0])) {
    y0 = tail_y0 >= 0 ? tail_y0 : 0;
  }
  float rl0, base0, lp0, f0, ext0;
  element_tail(c, w, r[y0], b[y0], &rl0, &base0, &lp0, &f0, &ext0);
  float fire = c.random ? given_fire : f0;
  if (fire != 0.f) {  // the replaced row: log r = log_softmax(ext)
    Vec ve(kNegInf);
    i = 0;
    for (; i + kW <= V; i += kW) {
      Vec x = Vec::loadu(r + i);
      Elem e = element(c, w, x, masked_base(x, Vec::loadu(b + i)));
      e.ext.store(out + i);
      ve = at::vec::maximum(ve, e.ext);
    }
    float max_e = hmax(ve);
    for (; i < V; ++i) {
      float rl, base, lp, f, ext;
      element_tail(c, w, r[i], b[i], &rl, &base, &lp, &f, &ext);
      out[i] = ext;
      max_e = smax(ext, max_e);
    }
    Vec se(0.f);
    i = 0;
    for (; i + kW <= V; i += kW) se = se + vexp(Vec::loadu(out + i) - Vec(max_e));
    float sum_e = hsum(se);
    for (; i < V; ++i) sum_e += std::exp(out[i] - max_e);
    const float log_sum_e = std::log(sum_e);
    i = 0;
    for (; i + kW <= V; i += kW) ((Vec::loadu(out + i) - Vec(max_e)) - Vec(log_sum_e)).store(out + i);
    for (; i < V; ++i) out[i] = (out[i] - max_e) - log_sum_e;
  }
  *mass_out = fire != 0.f ? 1.f : 0.f;
  *check_out = rl0 + std::max(base0, c.log_tiny);
}

Config make_config(double temperature, double gamma, double tau, bool rl_minus_base, bool rl_proposes, bool random,
                   double log_tiny, double safe) {
  TORCH_CHECK(temperature > 0.0, "temperature must be > 0, got ", temperature);
  TORCH_CHECK(gamma > -1.0, "gamma must be > -1, got ", gamma);
  return Config{static_cast<float>(temperature), static_cast<float>(gamma), static_cast<float>(1.0 + gamma),
                static_cast<float>(tau), rl_minus_base, rl_proposes, random, static_cast<float>(log_tiny),
                static_cast<float>(safe)};
}

void check_inputs(const torch::Tensor& rl, const torch::Tensor& base) {
  TORCH_CHECK(rl.device().is_cpu() && base.device().is_cpu(), "the fused CPU step takes CPU tensors");
  TORCH_CHECK(rl.scalar_type() == torch::kFloat && base.scalar_type() == torch::kFloat,
              "the fused CPU step takes float32 scores");
  TORCH_CHECK(rl.dim() == 2 && rl.sizes() == base.sizes(), "scores must both be (batch, vocab) of one shape");
  TORCH_CHECK(rl.is_contiguous() && base.is_contiguous(), "scores must be contiguous");
  TORCH_CHECK(rl.size(1) > 0, "scores must have a non-empty vocabulary");
}

// Whether every row's check value is finite: read by the caller instead of a torch reduction over `check` (each
// torch call after the forward costs tens of microseconds with cold caches, more than this loop)
bool all_finite(const float* check, int64_t B) {
  for (int64_t row = 0; row < B; ++row) {
    if (!std::isfinite(check[row])) return false;
  }
  return true;
}

// (log q, r, M, check, finite): log q and r (B, V), M and check (B,), finite = check is finite in every row
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, bool> sample_step(const torch::Tensor& rl, const torch::Tensor& base, const torch::Tensor& redraw,
                                       double temperature, double gamma, double tau, bool rl_minus_base,
                                       bool rl_proposes, bool random, double log_tiny, double safe) {
  check_inputs(rl, base);
  TORCH_CHECK(redraw.sizes() == rl.sizes() && redraw.is_contiguous() && redraw.scalar_type() == torch::kFloat,
              "redraw buffer must be a contiguous float32 tensor of the scores' shape");
  const Config c = make_config(temperature, gamma, tau, rl_minus_base, rl_proposes, random, log_tiny, safe);
  const int64_t B = rl.size(0), V = rl.size(1);
  auto out = torch::empty_like(rl);
  auto mass = torch::empty({B}, rl.options());
  auto check = torch::empty({B}, rl.options());
  const float *pr = rl.data_ptr<float>(), *pb = base.data_ptr<float>();
  float *po = out.data_ptr<float>(), *pe = redraw.data_ptr<float>(), *pm = mass.data_ptr<float>(),
        *pc = check.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      sample_row(c, pr + row * V, pb + row * V, V, po + row * V, pe + row * V, pm + row, pc + row);
    }
  });
  return {out, mass, check, all_finite(pc, B)};
}

// (scores, M, check, finite): scores (B, V) = log r on fired rows, log p elsewhere; M (B,) 0 / 1
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, bool> greedy_step(const torch::Tensor& rl, const torch::Tensor& base, const torch::Tensor& fire,
                                       double temperature, double gamma, double tau, bool rl_minus_base,
                                       bool rl_proposes, bool random, double log_tiny) {
  check_inputs(rl, base);
  const Config c = make_config(temperature, gamma, tau, rl_minus_base, rl_proposes, random, log_tiny, 0.0);
  const int64_t B = rl.size(0), V = rl.size(1);
  TORCH_CHECK(V < (int64_t(1) << 24), "the fused greedy step indexes the vocabulary in float32: at most 2^24 tokens");
  TORCH_CHECK(!random || (fire.numel() == B && fire.scalar_type() == torch::kFloat && fire.is_contiguous()),
              "random greedy steps take a (batch,) float32 draw");
  auto out = torch::empty_like(rl);
  auto mass = torch::empty({B}, rl.options());
  auto check = torch::empty({B}, rl.options());
  const float *pr = rl.data_ptr<float>(), *pb = base.data_ptr<float>();
  const float* pf = random ? fire.data_ptr<float>() : nullptr;
  float *po = out.data_ptr<float>(), *pm = mass.data_ptr<float>(), *pc = check.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      greedy_row(c, pr + row * V, pb + row * V, V, po + row * V, pf ? pf[row] : 0.f, pm + row, pc + row);
    }
  });
  return {out, mass, check, all_finite(pc, B)};
}

// The posterior's factors of the token each row drew at `position`: (B, 2) = (log q(y), r(y)) read from the step's
// outputs, y = tokens[:, position] clamped to the last column (a token of a padded vocabulary tail). One call in
// place of two gathers and a slice (each a torch call with cold caches after the forward).
torch::Tensor chosen_factors(const torch::Tensor& log_q, const torch::Tensor& redraw, const torch::Tensor& tokens,
                             int64_t position) {
  TORCH_CHECK(log_q.device().is_cpu() && log_q.scalar_type() == torch::kFloat && log_q.dim() == 2 &&
                  log_q.is_contiguous() && redraw.sizes() == log_q.sizes() && redraw.is_contiguous() &&
                  redraw.scalar_type() == torch::kFloat,
              "log q and r must be contiguous (batch, vocab) float32 CPU tensors of one shape");
  TORCH_CHECK(tokens.device().is_cpu() && tokens.scalar_type() == torch::kLong && tokens.dim() == 2 &&
                  tokens.size(0) == log_q.size(0) && position >= 0 && position < tokens.size(1),
              "tokens must be a (batch, length) int64 CPU tensor with a column at `position`");
  const int64_t B = log_q.size(0), V = log_q.size(1);
  auto out = torch::empty({B, 2}, log_q.options());
  const float *pq = log_q.data_ptr<float>(), *pr = redraw.data_ptr<float>();
  float* po = out.data_ptr<float>();
  auto ids = tokens.accessor<int64_t, 2>();
  for (int64_t row = 0; row < B; ++row) {
    const int64_t y = ids[row][position];
    TORCH_CHECK(y >= 0, "token id ", y, " in row ", row, " is negative");
    const int64_t column = y < V ? y : V - 1;
    po[2 * row] = pq[row * V + column];
    po[2 * row + 1] = pr[row * V + column];
  }
  return out;
}

// The hot passes' exp and log applied elementwise (for tests/test_cpu_kernel.py's accuracy check).
torch::Tensor map_unary(const torch::Tensor& x, bool log) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 1,
              "a contiguous 1-d float32 CPU tensor");
  auto out = torch::empty_like(x);
  const float* p = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t n = x.numel();
  int64_t i = 0;
  for (; i + kW <= n; i += kW) (log ? vlog(Vec::loadu(p + i)) : vexp(Vec::loadu(p + i))).store(o + i);
  for (; i < n; ++i) o[i] = lane0(log ? vlog(Vec(p[i])) : vexp(Vec(p[i])));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sample_step", &sample_step, "the directional sampling step (log q, r, M, check, finite)");
  m.def("chosen_factors", &chosen_factors, "(log q(y), r(y)) of the tokens drawn at a position, (batch, 2)");
  m.def("map_unary", &map_unary, "the hot passes' exp (log=False) or log, elementwise");
  m.def("greedy_step", &greedy_step, "the directional greedy step (scores, M, check, finite)");
}
