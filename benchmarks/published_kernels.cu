// Baseline involution kernels in the design of the published CUDA implementation, written anew:
//   forward      one thread per output element, plain K x K loop;
//   grad-input   one thread per input element, gathering every (tap, output) pair that read it;
//   grad-kernel  one thread per kernel element, looping over the channels of its group.
// The launcher (benchmarks/published_kernels.py) uses 1024-thread blocks and ceil(n / 1024) blocks.
// No shared memory, no atomics, no __syncthreads: every thread owns exactly the elements it writes.
//
// Shapes (all contiguous, row-major):
//   x (B, C, H, W); w (B, G, K, K, Ho, Wo); y (B, C, Ho, Wo); channel c uses group c / (C / G).
//   y[b,c,ho,wo] = sum_{i,j} w[b,g,i,j,ho,wo] * x[b,c, ho*stride - pad + i*dil, wo*stride - pad + j*dil]
//   (out-of-range input positions read as zero).
//
// The same file compiles three ways:
//   * NVRTC (cupy.RawModule, name_expressions) and nvcc: __CUDACC__ is defined; float, double, __half and
//     __nv_bfloat16 are instantiated (halves accumulate in float).
//   * NVRTC/nvcc with -DINV_NO_FP_HEADERS: the 16-bit types are small local structs converted with PTX
//     instructions, for toolchains whose cuda_fp16.h / cuda_bf16.h cannot be included.
//   * plain C++ (g++) with the CPU shim from published_kernels.py: float and double only; the shim runs every
//     (block, thread) pair in sequence, which is exact for these kernels.

#ifdef __CUDACC__
#ifndef INV_NO_FP_HEADERS
#include <cuda_fp16.h>
#include <cuda_bf16.h>
typedef __half inv_half;
typedef __nv_bfloat16 inv_bfloat16;
#else
struct __align__(2) inv_half { unsigned short bits; };
struct __align__(2) inv_bfloat16 { unsigned short bits; };
#endif
#endif

// Grid-stride loop over n elements, with 64-bit indices (B*C*H*W can exceed 2^31).
#define INV_KERNEL_LOOP(idx, n)                                                            \
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < (n);     \
       idx += (long long)blockDim.x * gridDim.x)

// Num<T>: accumulation type and the load/store conversions.
template <typename T> struct Num;

template <> struct Num<float> {
  typedef float acc;
  static __device__ __forceinline__ acc load(float v) { return v; }
  static __device__ __forceinline__ float store(acc v) { return v; }
};

template <> struct Num<double> {
  typedef double acc;
  static __device__ __forceinline__ acc load(double v) { return v; }
  static __device__ __forceinline__ double store(acc v) { return v; }
};

#ifdef __CUDACC__
#ifndef INV_NO_FP_HEADERS
template <> struct Num<inv_half> {
  typedef float acc;
  static __device__ __forceinline__ acc load(inv_half v) { return __half2float(v); }
  static __device__ __forceinline__ inv_half store(acc v) { return __float2half_rn(v); }
};

template <> struct Num<inv_bfloat16> {
  typedef float acc;
  static __device__ __forceinline__ acc load(inv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ inv_bfloat16 store(acc v) { return __float2bfloat16_rn(v); }
};
#else
template <> struct Num<inv_half> {
  typedef float acc;
  static __device__ __forceinline__ acc load(inv_half v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
  }
  static __device__ __forceinline__ inv_half store(acc v) {
    inv_half r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
    return r;
  }
};

template <> struct Num<inv_bfloat16> {
  typedef float acc;
  static __device__ __forceinline__ acc load(inv_bfloat16 v) {
    return __uint_as_float(((unsigned int)v.bits) << 16);
  }
  static __device__ __forceinline__ inv_bfloat16 store(acc v) {
    // Round to nearest even; NaN stays a (quiet) NaN.
    unsigned int u = __float_as_uint(v);
    inv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      r.bits = 0x7fc0;
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      r.bits = (unsigned short)(u >> 16);
    }
    return r;
  }
};
#endif
#endif

template <typename T>
__global__ void involution_forward(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                   int B, int C, int H, int W, int G, int K, int Ho, int Wo,
                                   int stride, int pad, int dil) {
  typedef typename Num<T>::acc acc_t;
  const long long n = (long long)B * C * Ho * Wo;
  const int cpg = C / G;  // channels per group
  const long long plane = (long long)Ho * Wo;
  INV_KERNEL_LOOP(idx, n) {
    const int wo = (int)(idx % Wo);
    const int ho = (int)((idx / Wo) % Ho);
    const int c = (int)((idx / plane) % C);
    const int b = (int)(idx / (plane * C));
    const int g = c / cpg;
    const T* xp = x + ((long long)b * C + c) * H * W;
    const T* wp = w + ((long long)b * G + g) * K * K * plane + (long long)ho * Wo + wo;
    acc_t sum = 0;
    for (int i = 0; i < K; ++i) {
      const int h = ho * stride - pad + i * dil;
      if (h < 0 || h >= H) continue;
      for (int j = 0; j < K; ++j) {
        const int ww = wo * stride - pad + j * dil;
        if (ww < 0 || ww >= W) continue;
        sum += Num<T>::load(wp[(long long)(i * K + j) * plane]) * Num<T>::load(xp[(long long)h * W + ww]);
      }
    }
    y[idx] = Num<T>::store(sum);
  }
}

template <typename T>
__global__ void involution_grad_input(const T* __restrict__ gy, const T* __restrict__ w, T* __restrict__ gx,
                                      int B, int C, int H, int W, int G, int K, int Ho, int Wo,
                                      int stride, int pad, int dil) {
  typedef typename Num<T>::acc acc_t;
  const long long n = (long long)B * C * H * W;
  const int cpg = C / G;
  const long long plane = (long long)Ho * Wo;
  INV_KERNEL_LOOP(idx, n) {
    const int iw = (int)(idx % W);
    const int ih = (int)((idx / W) % H);
    const int c = (int)((idx / ((long long)H * W)) % C);
    const int b = (int)(idx / ((long long)H * W * C));
    const int g = c / cpg;
    const T* gyp = gy + ((long long)b * C + c) * plane;
    const T* wp = w + ((long long)b * G + g) * K * K * plane;
    acc_t sum = 0;
    for (int i = 0; i < K; ++i) {
      // Output row ho reads input row ih through tap i when ho*stride - pad + i*dil == ih.
      const int hs = ih + pad - i * dil;
      if (hs < 0 || hs % stride != 0) continue;
      const int ho = hs / stride;
      if (ho >= Ho) continue;
      for (int j = 0; j < K; ++j) {
        const int ws = iw + pad - j * dil;
        if (ws < 0 || ws % stride != 0) continue;
        const int wo = ws / stride;
        if (wo >= Wo) continue;
        const long long o = (long long)ho * Wo + wo;
        sum += Num<T>::load(gyp[o]) * Num<T>::load(wp[(long long)(i * K + j) * plane + o]);
      }
    }
    gx[idx] = Num<T>::store(sum);
  }
}

template <typename T>
__global__ void involution_grad_kernel(const T* __restrict__ gy, const T* __restrict__ x, T* __restrict__ gw,
                                       int B, int C, int H, int W, int G, int K, int Ho, int Wo,
                                       int stride, int pad, int dil) {
  typedef typename Num<T>::acc acc_t;
  const long long n = (long long)B * G * K * K * Ho * Wo;
  const int cpg = C / G;
  const long long plane = (long long)Ho * Wo;
  INV_KERNEL_LOOP(idx, n) {
    const int wo = (int)(idx % Wo);
    const int ho = (int)((idx / Wo) % Ho);
    const int j = (int)((idx / plane) % K);
    const int i = (int)((idx / (plane * K)) % K);
    const int g = (int)((idx / (plane * K * K)) % G);
    const int b = (int)(idx / (plane * K * K * G));
    const int h = ho * stride - pad + i * dil;
    const int ww = wo * stride - pad + j * dil;
    acc_t sum = 0;
    if (h >= 0 && h < H && ww >= 0 && ww < W) {
      const long long c0 = (long long)b * C + (long long)g * cpg;
      for (int c = 0; c < cpg; ++c) {
        sum += Num<T>::load(gy[(c0 + c) * plane + (long long)ho * Wo + wo]) *
               Num<T>::load(x[((c0 + c) * H + h) * W + ww]);
      }
    }
    gw[idx] = Num<T>::store(sum);
  }
}
