// Body of the CPU kernels, included by clo_cpu.cpp once per instruction set (no include guard on purpose):
// CAO2_VEC_BYTES = 16 (baseline SSE2 / NEON: 4 lanes) or 32 (AVX2: 8 lanes), inside a namespace of its own.
// Portable SIMD through the GCC/Clang vector extension: lane-wise arithmetic, compares and bit masks only.
// Semantics: clo_common.h.

constexpr int kLanes = CAO2_VEC_BYTES / 4;
typedef float vf __attribute__((vector_size(CAO2_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(CAO2_VEC_BYTES)));
typedef uint32_t vu __attribute__((vector_size(CAO2_VEC_BYTES)));
typedef uint16_t vh __attribute__((vector_size(CAO2_VEC_BYTES / 2)));

inline vi as_i(vf v) { vi r; std::memcpy(&r, &v, sizeof(r)); return r; }
inline vf as_f(vi v) { vf r; std::memcpy(&r, &v, sizeof(r)); return r; }
inline vi select(vi mask, vi a, vi b) { return (mask & a) | (~mask & b); }

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

template <typename T>
inline vf loadv(const T* p) {
  float tmp[kLanes];
  for (int l = 0; l < kLanes; ++l) tmp[l] = static_cast<float>(p[l]);
  vf v;
  std::memcpy(&v, tmp, sizeof(v));
  return v;
}
template <>
inline vf loadv<float>(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <>
inline vf loadv<c10::BFloat16>(const c10::BFloat16* p) {
  vh h;
  std::memcpy(&h, p, sizeof(h));
  const vu w = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

template <typename T>
inline void storev(T* p, vf v) {
  float tmp[kLanes];
  std::memcpy(tmp, &v, sizeof(v));
  for (int l = 0; l < kLanes; ++l) p[l] = static_cast<T>(tmp[l]);
}
template <>
inline void storev<float>(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
template <>
inline void storev<c10::BFloat16>(c10::BFloat16* p, vf v) {
  // c10::BFloat16's conversion, lane-wise: round to nearest even, NaN -> 0x7FC0
  vu u;
  std::memcpy(&u, &v, sizeof(u));
  const vu r = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
  const vu nan = (vu)(v != v);
  const vu out = (r & ~nan) | (0x7FC0u & nan);
  const vh h = __builtin_convertvector(out, vh);
  std::memcpy(p, &h, sizeof(h));
}

enum WMode { kNone = 0, kPtr = 1, kConst = 2 };

// Forward over a contiguous run [0, n) (n < 2^31) of one sample whose weights are absent, one per element
// (w[j]) or one constant wc; `base` is the flat index of p[0] in its sample. Every lane keeps its own running
// sum, max bits, tie count and first index without branches; the lanes are combined at the end.
template <typename T, int MODE>
void fwd_run(const T* p, const T* t, const float* w, float wc, int64_t n, int64_t base, CloPartial& acc) {
  vf sq = {}, ws = {};
  vi mx = vi{} - 1, cnt = {}, idx = vi{} - 1, jv;
  for (int l = 0; l < kLanes; ++l) jv[l] = l;
  const vi absmask = vi{} + 0x7fffffff;
  const vi ones = vi{} + 1;
  auto step = [&](vf e, vf wv, vi valid) {
    vi bits = as_i(e) & absmask;
    if (MODE == kPtr) {
      sq += wv * (e * e);
      ws += wv;
      valid &= (vi)(wv > 0.f);
    } else {
      sq += e * e;
    }
    bits |= ~valid;  // unselected lanes: -1, below every |e|
    const vi gt = bits > mx;
    const vi eq = (bits == mx) & valid;
    cnt = select(gt, ones, cnt - eq);
    idx = select(gt, jv, idx);
    mx = select(gt, bits, mx);
    jv += kLanes;
  };
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    step(loadv(p + j) - loadv(t + j), MODE == kPtr ? loadv(w + j) : vf{}, vi{} - 1);
  }
  if (j < n) {  // tail: zero error in unselected lanes
    T pt[kLanes], tt[kLanes];
    float wt[kLanes];
    vi valid = {};
    for (int l = 0; l < kLanes; ++l) {
      const bool in = j + l < n;
      pt[l] = in ? p[j + l] : T(0.f);
      tt[l] = in ? t[j + l] : T(0.f);
      wt[l] = (in && MODE == kPtr) ? w[j + l] : 0.f;
      valid[l] = in ? -1 : 0;
    }
    step(loadv(pt) - loadv(tt), MODE == kPtr ? loadv(wt) : vf{}, valid);
  }
  float bsq = 0.f, bws = 0.f;
  for (int l = 0; l < kLanes; ++l) { bsq += sq[l]; bws += ws[l]; }
  if (MODE == kConst) {
    acc.sq += wc * bsq;
    acc.ws += wc * static_cast<float>(n);
    if (!(wc > 0.f)) return;  // no element of this run takes part in the max
  } else {
    acc.sq += bsq;
    acc.ws += bws;
  }
  for (int l = 0; l < kLanes; ++l) {
    if (mx[l] >= 0) clo_combine_max(acc.mbits, acc.count, acc.arg, mx[l], cnt[l], base + idx[l]);
  }
}

// Backward over a run: grad = (g/den * w) * (2e) [+ lin * sign(e) on the maxima when LINF, modes 2 and 3].
template <typename T, int MODE, bool LINF>
void bwd_run(const T* p, const T* t, const float* w, float wc, int64_t n, float c, float maxv, float lin, T* out) {
  const int32_t mbits = clo_float_bits(maxv);
  const bool nan_max = maxv != maxv;
  const vf cv = vf{} + c, two = vf{} + 2.f, linv = vf{} + lin;
  const vi absmask = vi{} + 0x7fffffff;
  const vi one_bits = as_i(vf{} + 1.f), mone_bits = as_i(vf{} - 1.f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vf e = loadv(p + j) - loadv(t + j);
    vf gr;
    vi sel = vi{} - 1;
    if (MODE == kNone) {
      gr = cv * (two * e);
    } else {
      const vf wv = MODE == kPtr ? loadv(w + j) : vf{} + wc;
      gr = (cv * wv) * (two * e);
      sel = (vi)(wv > 0.f);
    }
    if (LINF) {
      const vi hit = nan_max ? sel : (sel & ((as_i(e) & absmask) == mbits));
      const vf sgn = as_f(((vi)(e > 0.f) & one_bits) | ((vi)(e < 0.f) & mone_bits));
      gr += as_f(as_i(linv * sgn) & hit);  // a NaN max: lin is NaN, and NaN * sign(e) is NaN
    }
    storev(out + j, gr);
  }
  for (; j < n; ++j) {
    const float e = to_f(p[j]) - to_f(t[j]);
    const float ww = MODE == kPtr ? w[j] : wc;
    float gr = MODE == kNone ? c * (2.f * e) : (c * ww) * (2.f * e);
    if (LINF) {
      const bool sel = MODE == kNone || ww > 0.f;
      if (sel && (nan_max || clo_float_bits(std::fabs(e)) == mbits)) gr += lin * clo_sign(e);
    }
    out[j] = static_cast<T>(gr);
  }
}

// Calls f(start, len, wptr_or_null, wconst, mode) over maximal runs of [i0, i1) with one weight mode.
template <typename F>
inline void for_each_run(int64_t i0, int64_t i1, const float* wrow, const WeightPattern& wp, F&& f) {
  if (wrow == nullptr) {
    f(i0, i1 - i0, nullptr, 1.f, kNone);
  } else if (wp.inner == 1) {
    for (int64_t i = i0; i < i1;) {
      const int64_t j = i % wp.mid;
      const int64_t len = std::min(i1 - i, wp.mid - j);
      f(i, len, wrow + j, 0.f, kPtr);
      i += len;
    }
  } else {
    for (int64_t i = i0; i < i1;) {
      const int64_t r = i / wp.inner;
      const int64_t len = std::min(i1 - i, (r + 1) * wp.inner - i);
      f(i, len, nullptr, wrow[r % wp.mid], kConst);
      i += len;
    }
  }
}

// Forward partial of elements [i0, i1) of one sample (pb, tb, wrow point at the sample's start).
template <typename T>
CloPartial fwd_task(const T* pb, const T* tb, const float* wrow, const WeightPattern& wp, int64_t i0, int64_t i1) {
  CloPartial acc = clo_partial_empty();
  for_each_run(i0, i1, wrow, wp, [&](int64_t i, int64_t len, const float* w, float wc, int mode) {
    if (mode == kNone) fwd_run<T, kNone>(pb + i, tb + i, nullptr, 1.f, len, i, acc);
    else if (mode == kPtr) fwd_run<T, kPtr>(pb + i, tb + i, w, 0.f, len, i, acc);
    else fwd_run<T, kConst>(pb + i, tb + i, nullptr, wc, len, i, acc);
  });
  return acc;
}

// Backward of elements [i0, i1) of one sample; linf_mode from clo_linf_mode.
template <typename T>
void bwd_task(const T* pb, const T* tb, const float* wrow, const WeightPattern& wp, int64_t i0, int64_t i1, float c,
              float m, float lin, int linf_mode, int64_t argmax, T* ob) {
  const bool scan = linf_mode >= 2;
  for_each_run(i0, i1, wrow, wp, [&](int64_t i, int64_t len, const float* w, float wc, int wm) {
    if (scan) {
      if (wm == kNone) bwd_run<T, kNone, true>(pb + i, tb + i, nullptr, 1.f, len, c, m, lin, ob + i);
      else if (wm == kPtr) bwd_run<T, kPtr, true>(pb + i, tb + i, w, 0.f, len, c, m, lin, ob + i);
      else bwd_run<T, kConst, true>(pb + i, tb + i, nullptr, wc, len, c, m, lin, ob + i);
    } else {
      if (wm == kNone) bwd_run<T, kNone, false>(pb + i, tb + i, nullptr, 1.f, len, c, m, lin, ob + i);
      else if (wm == kPtr) bwd_run<T, kPtr, false>(pb + i, tb + i, w, 0.f, len, c, m, lin, ob + i);
      else bwd_run<T, kConst, false>(pb + i, tb + i, nullptr, wc, len, c, m, lin, ob + i);
    }
  });
  if (linf_mode == 1 && argmax >= i0 && argmax < i1) {
    // the unique maximum: rewrite its element with the L-infinity term added (same float expression)
    const float e = to_f(pb[argmax]) - to_f(tb[argmax]);
    const float ww = wrow ? wrow[(argmax / wp.inner) % wp.mid] : 1.f;
    const float gr = wrow ? (c * ww) * (2.f * e) : c * (2.f * e);
    ob[argmax] = static_cast<T>(gr + lin * clo_sign(e));
  }
}

template <bool WD, bool SMALL_W>
void adam_loop(float* __restrict P, const float* __restrict G, float* __restrict M, float* __restrict V, int64_t lo,
               int64_t hi, const AdamScalars s) {
  for (int64_t i = lo; i < hi; ++i) {  // the compiler vectorizes this (sqrt needs -fno-math-errno)
    float p = P[i], m = M[i], v = V[i];
    adam_update_t<WD, SMALL_W>(p, G[i], m, v, s);
    P[i] = p;
    M[i] = m;
    V[i] = v;
  }
}

inline void adam_range(float* P, const float* G, float* M, float* V, int64_t lo, int64_t hi, const AdamScalars& s) {
  const bool wd = s.weight_decay != 0.f, small = s.beta1_w < 0.5f;
  if (wd && small) adam_loop<true, true>(P, G, M, V, lo, hi, s);
  else if (wd) adam_loop<true, false>(P, G, M, V, lo, hi, s);
  else if (small) adam_loop<false, true>(P, G, M, V, lo, hi, s);
  else adam_loop<false, false>(P, G, M, V, lo, hi, s);
}
