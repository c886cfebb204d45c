// Involution CUDA kernels (compiled at run time by CuPy/NVRTC; see cupy_backend.py).
//
//   x       (B, C, H, W)              contiguous
//   kernel  (B, G, K, K, Ho, Wo)      contiguous; channel c uses group c / (C / G)
//   y       (B, C, Ho, Wo)            y[b,c,h,w] = sum_ij kernel[b,g,i,j,h,w] * x[b,c,h*S-P+i*D, w*S-P+j*D]
//
// One thread per output element of each kernel (grid-stride loops), all indices 64-bit. The static shape
// parameters (K, S, D, P) are template arguments so the tap loops unroll; B, C, H, W, G, Ho, Wo are run-time.
// Scalar types: float, double, and the 16-bit cv_half / cv_bf16 (plain bit containers, so the source needs
// no CUDA headers); half types are loaded into float and accumulated in float.
//
// The file is self-contained and also compiles as host C++ (the tests emulate the launch grid with a thread
// loop to check the index arithmetic on machines without a GPU): only __CUDA_ARCH__ code uses PTX.

struct cv_half { unsigned short bits; };
struct cv_bf16 { unsigned short bits; };

template <typename T> struct cv_acc { typedef float type; };
template <> struct cv_acc<double> { typedef double type; };

union cv_f32_bits { float f; unsigned int u; };

__device__ __forceinline__ float cv_load(float v) { return v; }
__device__ __forceinline__ double cv_load(double v) { return v; }
__device__ __forceinline__ float cv_load(cv_bf16 v) {
    cv_f32_bits r;
    r.u = ((unsigned int)v.bits) << 16;
    return r.f;
}
__device__ __forceinline__ float cv_load(cv_half v) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
#else
    union { _Float16 h; unsigned short u; } r;
    r.u = v.bits;
    return (float)r.h;
#endif
}

template <typename T> __device__ __forceinline__ T cv_store(typename cv_acc<T>::type v);
template <> __device__ __forceinline__ float cv_store<float>(float v) { return v; }
template <> __device__ __forceinline__ double cv_store<double>(double v) { return v; }
template <> __device__ __forceinline__ cv_bf16 cv_store<cv_bf16>(float v) {
    cv_f32_bits r;
    r.f = v;
    cv_bf16 out;
    if ((r.u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
        out.bits = (unsigned short)((r.u >> 16) | 0x0040u);
        return out;
    }
    r.u += 0x7fffu + ((r.u >> 16) & 1u);  // round to nearest, ties to even
    out.bits = (unsigned short)(r.u >> 16);
    return out;
}
template <> __device__ __forceinline__ cv_half cv_store<cv_half>(float v) {
    cv_half out;
#ifdef __CUDA_ARCH__
    unsigned short b;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(v));
    out.bits = b;
#else
    union { _Float16 h; unsigned short u; } r;
    r.h = (_Float16)v;
    out.bits = r.u;
#endif
    return out;
}

#define CV_GRID_STRIDE_LOOP(idx, n)                                                               \
    for (long long idx = (long long)blockIdx.x * (long long)blockDim.x + (long long)threadIdx.x; \
         idx < (n); idx += (long long)blockDim.x * (long long)gridDim.x)

// y = involution(x, kernel): one thread per output element (b, c, ho, wo).
template <typename T, int K, int S, int D, int P>
__global__ void involution_forward(const T* __restrict__ x, const T* __restrict__ kernel, T* __restrict__ y,
                                   long long B, long long C, long long H, long long W, long long G,
                                   long long Ho, long long Wo) {
    typedef typename cv_acc<T>::type acc_t;
    const long long n = B * C * Ho * Wo;
    const long long cpg = C / G;
    const long long plane = Ho * Wo;
    CV_GRID_STRIDE_LOOP(idx, n) {
        const long long wo = idx % Wo;
        long long t = idx / Wo;
        const long long ho = t % Ho;
        t /= Ho;
        const long long c = t % C;
        const long long b = t / C;
        const long long g = c / cpg;
        const T* xc = x + (b * C + c) * H * W;
        const T* kc = kernel + (b * G + g) * (long long)(K * K) * plane + ho * Wo + wo;
        acc_t acc = 0;
#pragma unroll
        for (int i = 0; i < K; ++i) {
            const long long hi = ho * S - P + (long long)i * D;
            if (hi < 0 || hi >= H) continue;
#pragma unroll
            for (int j = 0; j < K; ++j) {
                const long long wi = wo * S - P + (long long)j * D;
                if (wi < 0 || wi >= W) continue;
                acc += (acc_t)cv_load(xc[hi * W + wi]) * (acc_t)cv_load(kc[(long long)(i * K + j) * plane]);
            }
        }
        y[idx] = cv_store<T>(acc);
    }
}

// grad_x: one thread per input element (b, c, hi, wi) gathers every (tap, output pixel) that read it,
// so no atomics are needed: ho = (hi + P - i*D) / S when that division is exact and in range.
template <typename T, int K, int S, int D, int P>
__global__ void involution_grad_input(const T* __restrict__ grad_y, const T* __restrict__ kernel,
                                      T* __restrict__ grad_x, long long B, long long C, long long H, long long W,
                                      long long G, long long Ho, long long Wo) {
    typedef typename cv_acc<T>::type acc_t;
    const long long n = B * C * H * W;
    const long long cpg = C / G;
    const long long plane = Ho * Wo;
    CV_GRID_STRIDE_LOOP(idx, n) {
        const long long wi = idx % W;
        long long t = idx / W;
        const long long hi = t % H;
        t /= H;
        const long long c = t % C;
        const long long b = t / C;
        const long long g = c / cpg;
        const T* gyc = grad_y + (b * C + c) * plane;
        const T* kg = kernel + (b * G + g) * (long long)(K * K) * plane;
        acc_t acc = 0;
#pragma unroll
        for (int i = 0; i < K; ++i) {
            const long long hn = hi + P - (long long)i * D;
            if (hn < 0 || hn % S != 0) continue;
            const long long ho = hn / S;
            if (ho >= Ho) continue;
#pragma unroll
            for (int j = 0; j < K; ++j) {
                const long long wn = wi + P - (long long)j * D;
                if (wn < 0 || wn % S != 0) continue;
                const long long wo = wn / S;
                if (wo >= Wo) continue;
                const long long o = ho * Wo + wo;
                acc += (acc_t)cv_load(gyc[o]) * (acc_t)cv_load(kg[(long long)(i * K + j) * plane + o]);
            }
        }
        grad_x[idx] = cv_store<T>(acc);
    }
}

// grad_kernel: one thread per kernel element (b, g, i, j, ho, wo) reduces over the C/G channels of group g.
template <typename T, int K, int S, int D, int P>
__global__ void involution_grad_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                                       T* __restrict__ grad_kernel, long long B, long long C, long long H,
                                       long long W, long long G, long long Ho, long long Wo) {
    typedef typename cv_acc<T>::type acc_t;
    const long long n = B * G * K * K * Ho * Wo;
    const long long cpg = C / G;
    const long long plane = Ho * Wo;
    CV_GRID_STRIDE_LOOP(idx, n) {
        const long long wo = idx % Wo;
        long long t = idx / Wo;
        const long long ho = t % Ho;
        t /= Ho;
        const int j = (int)(t % K);
        t /= K;
        const int i = (int)(t % K);
        t /= K;
        const long long g = t % G;
        const long long b = t / G;
        const long long hi = ho * S - P + (long long)i * D;
        const long long wi = wo * S - P + (long long)j * D;
        acc_t acc = 0;
        if (hi >= 0 && hi < H && wi >= 0 && wi < W) {
            const long long c0 = b * C + g * cpg;
            const T* gyp = grad_y + c0 * plane + ho * Wo + wo;
            const T* xp = x + c0 * H * W + hi * W + wi;
            for (long long cc = 0; cc < cpg; ++cc) {
                acc += (acc_t)cv_load(gyp[cc * plane]) * (acc_t)cv_load(xp[cc * H * W]);
            }
        }
        grad_kernel[idx] = cv_store<T>(acc);
    }
}

// Tiny kernel used once per process to check that CuPy can compile and run code on this device.
extern "C" __global__ void involution_probe(float* out) { out[threadIdx.x] = 2.0f * threadIdx.x; }
