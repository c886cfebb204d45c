// Involution CUDA kernels, compiled at run time by NVRTC through cupy.RawModule (see cupy_backend.py).
//
//   x       (B, C, H, W)              contiguous
//   kernel  (B, G, K, K, Ho, Wo)      contiguous; channel c uses group g = c / (C / G)
//   gate    (B, C) in acc_t, optional (C-volution): y = gate[b,c] * involution(x, kernel)
//   y       (B, C, Ho, Wo)            y[b,c,h,w] = gate[b,c] * sum_ij kernel[b,g,i,j,h,w] * x[b,c,h*S-P+i*D, w*S-P+j*D]
//
// Design (one block = one (b, g) pair and one spatial tile; a grid-stride loop over blocks):
//   cv_forward         one thread per (b, g, V adjacent output pixels); the K*K taps of those pixels are loaded once
//                      into registers and reused for every channel of the group; the input tile with its halo is
//                      staged in shared memory, CB channels at a time, zero-filled outside the image.
//   cv_grad_kernel     the same tiles; per-thread K*K tap accumulators reduced over the group's channels.
//   cv_grad_input      one thread per (b, g, input pixel); the taps that reach it are gathered into registers once;
//                      the grad_y tile with its halo is staged in shared memory. With a gate it also reduces
//                      d loss / d gate[b,c] = sum_p x[b,c,p] * (d loss / d (x*gate))[b,c,p] per block (shared-memory
//                      tree) and adds it atomically into gate_grad (acc_t, zeroed by the caller; null: not wanted).
//   cv_backward_fused  stride 1 only: grad_input and grad_kernel from one pass over grad_y (both tiles staged).
// The gate is fused: it scales the accumulated sum (forward), the grad_y value (grad_kernel) and the result
// (grad_input); no x*gate tensor is ever written.
//
// Template arguments: T (float, double, cv_half, cv_bf16), I (int when every tensor has < 2^31 elements, else
// long long), K, S (stride), D (dilation), V (adjacent outputs per thread along W; V > 1 only when Wo % V == 0 and
// the pointers are aligned, so the tap / output accesses are single vector loads and stores).
// Run-time: shapes, padding P, tile counts, CB (channels staged per pass), and the gate / gate_grad pointers (null
// when there is no gate / no gate gradient: a branch uniform over the grid). Block shapes are powers of two;
// the launcher (cupy_backend.plan) computes the dynamic shared memory size from the same formulas as the kernels.
//
// Half types load into float and accumulate in float (double for double). Outside the image the input is zero,
// so 0 * inf = nan exactly as in the zero-padded torch path; taps that do not reach an input pixel in grad_input
// are selected away (never multiplied).
//
// The file is self-contained (no CUDA headers) and also compiles as host C++: the CPU emulator
// (benchmarks/cuda_emulator.py) defines the CUDA built-ins (threads as fibers, __syncthreads as a barrier, shared
// memory with guard zones) and includes this file. Only __CUDA_ARCH__ code uses PTX.

#ifndef CV_DYNAMIC_SMEM
#define CV_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

struct cv_half { unsigned short bits; };
struct cv_bf16 { unsigned short bits; };

template <typename T> struct cv_acc { typedef float type; };
template <> struct cv_acc<double> { typedef double type; };

union cv_f32_bits { float f; unsigned int u; };

// ---------------------------------------------------------------------------------------------------- conversions

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
#else  // IEEE binary16 -> binary32, exact
    const unsigned int sign = ((unsigned int)v.bits & 0x8000u) << 16;
    const unsigned int e = ((unsigned int)v.bits >> 10) & 0x1fu;
    const unsigned int m = (unsigned int)v.bits & 0x3ffu;
    cv_f32_bits r;
    if (e == 0x1fu) {
        r.u = sign | 0x7f800000u | (m << 13);
    } else if (e != 0) {
        r.u = sign | ((e + 112u) << 23) | (m << 13);
    } else {
        r.f = (float)m * 5.9604644775390625e-08f;  // m * 2^-24, exact
        r.u |= sign;
    }
    return r.f;
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
#else  // IEEE binary32 -> binary16, round to nearest even, like cvt.rn.f16.f32
    cv_f32_bits r;
    r.f = v;
    const unsigned int sign = (r.u >> 16) & 0x8000u;
    const unsigned int a = r.u & 0x7fffffffu;
    unsigned int h;
    if (a > 0x7f800000u) {
        h = 0x7e00u;                                  // NaN
    } else if (a >= 0x477ff000u) {
        h = 0x7c00u;                                  // >= 65520 rounds to infinity
    } else if (a >= 0x38800000u) {                    // normal half
        h = (a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13;
    } else {                                          // subnormal half or zero: round(|v| * 2^24)
        const unsigned int ef = a >> 23;
        const unsigned int shift = 126u - ef;
        if (ef == 0 || shift > 24u) {
            h = 0;
        } else {
            const unsigned int m = (a & 0x7fffffu) | 0x800000u;
            const unsigned int q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
            h = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
        }
    }
    out.bits = (unsigned short)(sign | h);
#endif
    return out;
}

// V adjacent elements as one aligned vector access (the launcher guarantees the alignment).
template <typename T, int V> struct alignas(sizeof(T) * V) cv_vec { T v[V]; };

template <typename T, int V>
__device__ __forceinline__ void cv_load_vec(const T* p, typename cv_acc<T>::type (&out)[V]) {
    const cv_vec<T, V> r = *reinterpret_cast<const cv_vec<T, V>*>(p);
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = cv_load(r.v[v]);
}

template <typename T, int V>
__device__ __forceinline__ void cv_store_vec(T* p, const typename cv_acc<T>::type (&in)[V]) {
    cv_vec<T, V> r;
#pragma unroll
    for (int v = 0; v < V; ++v) r.v[v] = cv_store<T>(in[v]);
    *reinterpret_cast<cv_vec<T, V>*>(p) = r;
}

template <typename I> __device__ __forceinline__ I cv_min(I a, I b) { return a < b ? a : b; }
template <typename I> __device__ __forceinline__ I cv_floor_div(I a, I s) { return a >= 0 ? a / s : -((-a + s - 1) / s); }

// Every kernel has the same parameter list (unused pointers are null), so one launcher serves them all.
#define CV_PARAMS                                                                                           \
    const T* __restrict__ in0, const T* __restrict__ in1, const T* __restrict__ in2,                        \
        const typename cv_acc<T>::type* __restrict__ gate, T* __restrict__ out0, T* __restrict__ out1,      \
        typename cv_acc<T>::type* __restrict__ gate_grad, I B, I C, I H, I W, I G, I Ho, I Wo, I P,         \
        I tiles_w, I tiles, I nblocks, I CB

// ---------------------------------------------------------------------------------------------------- tile staging

// Stage nc channel planes of src (each rows x cols, starting at src) into smem as acc_t, the window starting at
// (r0, c0) of size TR x TC, zero outside [0, rows) x [0, cols). Called by every thread of the block.
template <typename T, typename I>
__device__ __forceinline__ void cv_stage(typename cv_acc<T>::type* smem, const T* __restrict__ src, int nc, I rows,
                                         I cols, I r0, I c0, int TR, int TC) {
    for (int cc = 0; cc < nc; ++cc) {
        const T* plane = src + (I)cc * rows * cols;
        for (int r = threadIdx.y; r < TR; r += blockDim.y) {
            const I ri = r0 + r;
            const bool row_ok = ri >= 0 && ri < rows;
            for (int q = threadIdx.x; q < TC; q += blockDim.x) {
                const I ci = c0 + q;
                typename cv_acc<T>::type v = 0;
                if (row_ok && ci >= 0 && ci < cols) v = cv_load(plane[ri * cols + ci]);
                smem[(cc * TR + r) * TC + q] = v;
            }
        }
    }
}

// Block-wide sum of red[cc * n + tid] over tid for each cc < nc, added atomically into dst[cc].
// Every thread calls it after writing its nc partial sums; n (threads per block) is a power of two.
template <typename A>
__device__ __forceinline__ void cv_block_sum_atomic(A* red, int nc, int n, int tid, A* dst) {
    __syncthreads();
    for (int s = n >> 1; s > 0; s >>= 1) {
        if (tid < s)
            for (int cc = 0; cc < nc; ++cc) red[cc * n + tid] += red[cc * n + tid + s];
        __syncthreads();
    }
    if (tid < nc) atomicAdd(dst + tid, red[tid * n]);
}

// ---------------------------------------------------------------------------------------------------- forward

// in0 = x, in1 = kernel, gate (optional) -> out0 = y.
template <typename T, typename I, int K, int S, int D, int V>
__global__ void cv_forward(CV_PARAMS) {
    typedef typename cv_acc<T>::type acc_t;
    const int SEG = (V - 1) * S + (K - 1) * D + 1;  // input columns one tap row of V outputs reads
    CV_DYNAMIC_SMEM(cv_smem);
    acc_t* xs = reinterpret_cast<acc_t*>(cv_smem);
    const int TH = blockDim.y, TW = blockDim.x * V;
    const int IH = (TH - 1) * S + (K - 1) * D + 1, IW = (TW - 1) * S + (K - 1) * D + 1;
    const I cpg = C / G, plane = Ho * Wo;
    for (I blk = blockIdx.x; blk < nblocks; blk += gridDim.x) {
        const I tile = blk % tiles, bg = blk / tiles, b = bg / G, g = bg % G;
        const I ho0 = (tile / tiles_w) * TH, wo0 = (tile % tiles_w) * TW;
        const I ho = ho0 + (I)threadIdx.y, wo = wo0 + (I)threadIdx.x * V;
        const bool active = ho < Ho && wo < Wo;
        acc_t w[K * K][V];
#pragma unroll
        for (int t = 0; t < K * K; ++t)
#pragma unroll
            for (int v = 0; v < V; ++v) w[t][v] = 0;
        if (active) {
            const T* kp = in1 + (bg * (K * K)) * plane + ho * Wo + wo;
#pragma unroll
            for (int t = 0; t < K * K; ++t) cv_load_vec<T, V>(kp + (I)t * plane, w[t]);
        }
        for (I c0 = 0; c0 < cpg; c0 += CB) {
            const int nc = (int)cv_min(CB, cpg - c0);
            const I cbase = b * C + g * cpg + c0;
            cv_stage<T, I>(xs, in0 + cbase * H * W, nc, H, W, ho0 * S - P, wo0 * S - P, IH, IW);
            __syncthreads();
            if (active) {
                for (int cc = 0; cc < nc; ++cc) {
                    const acc_t* xr = xs + (cc * IH + (int)threadIdx.y * S) * IW + (int)threadIdx.x * V * S;
                    acc_t acc[V];
#pragma unroll
                    for (int v = 0; v < V; ++v) acc[v] = 0;
#pragma unroll
                    for (int i = 0; i < K; ++i) {
                        acc_t seg[SEG];
#pragma unroll
                        for (int e = 0; e < SEG; ++e) seg[e] = xr[i * D * IW + e];
#pragma unroll
                        for (int j = 0; j < K; ++j)
#pragma unroll
                            for (int v = 0; v < V; ++v) acc[v] += w[i * K + j][v] * seg[v * S + j * D];
                    }
                    if (gate) {
                        const acc_t gv = gate[cbase + cc];
#pragma unroll
                        for (int v = 0; v < V; ++v) acc[v] *= gv;
                    }
                    cv_store_vec<T, V>(out0 + ((cbase + cc) * Ho + ho) * Wo + wo, acc);
                }
            }
            __syncthreads();
        }
    }
}

// ---------------------------------------------------------------------------------------------------- grad kernel

// in0 = grad_y, in1 = x, gate (optional) -> out0 = grad_kernel.
template <typename T, typename I, int K, int S, int D, int V>
__global__ void cv_grad_kernel(CV_PARAMS) {
    typedef typename cv_acc<T>::type acc_t;
    const int SEG = (V - 1) * S + (K - 1) * D + 1;
    CV_DYNAMIC_SMEM(cv_smem);
    acc_t* xs = reinterpret_cast<acc_t*>(cv_smem);
    const int TH = blockDim.y, TW = blockDim.x * V;
    const int IH = (TH - 1) * S + (K - 1) * D + 1, IW = (TW - 1) * S + (K - 1) * D + 1;
    const I cpg = C / G, plane = Ho * Wo;
    for (I blk = blockIdx.x; blk < nblocks; blk += gridDim.x) {
        const I tile = blk % tiles, bg = blk / tiles, b = bg / G, g = bg % G;
        const I ho0 = (tile / tiles_w) * TH, wo0 = (tile % tiles_w) * TW;
        const I ho = ho0 + (I)threadIdx.y, wo = wo0 + (I)threadIdx.x * V;
        const bool active = ho < Ho && wo < Wo;
        acc_t gk[K * K][V];
#pragma unroll
        for (int t = 0; t < K * K; ++t)
#pragma unroll
            for (int v = 0; v < V; ++v) gk[t][v] = 0;
        for (I c0 = 0; c0 < cpg; c0 += CB) {
            const int nc = (int)cv_min(CB, cpg - c0);
            const I cbase = b * C + g * cpg + c0;
            cv_stage<T, I>(xs, in1 + cbase * H * W, nc, H, W, ho0 * S - P, wo0 * S - P, IH, IW);
            __syncthreads();
            if (active) {
                for (int cc = 0; cc < nc; ++cc) {
                    acc_t gy[V];
                    cv_load_vec<T, V>(in0 + ((cbase + cc) * Ho + ho) * Wo + wo, gy);
                    if (gate) {
                        const acc_t gv = gate[cbase + cc];
#pragma unroll
                        for (int v = 0; v < V; ++v) gy[v] *= gv;
                    }
                    const acc_t* xr = xs + (cc * IH + (int)threadIdx.y * S) * IW + (int)threadIdx.x * V * S;
#pragma unroll
                    for (int i = 0; i < K; ++i) {
                        acc_t seg[SEG];
#pragma unroll
                        for (int e = 0; e < SEG; ++e) seg[e] = xr[i * D * IW + e];
#pragma unroll
                        for (int j = 0; j < K; ++j)
#pragma unroll
                            for (int v = 0; v < V; ++v) gk[i * K + j][v] += gy[v] * seg[v * S + j * D];
                    }
                }
            }
            __syncthreads();
        }
        if (active) {
            T* kp = out0 + (bg * (K * K)) * plane + ho * Wo + wo;
#pragma unroll
            for (int t = 0; t < K * K; ++t) cv_store_vec<T, V>(kp + (I)t * plane, gk[t]);
        }
    }
}

// ---------------------------------------------------------------------------------------------------- grad input

// The taps that carry grad_y to one input pixel (hi, wi), for a block whose grad_y tile starts at (ho_lo, wo_lo):
// w[i*K+j] = kernel[.., i, j, ho, wo] at ho = (hi + P - i*D) / S, wo = (wi + P - j*D) / S when both divisions are
// exact and inside the output plane, else 0. With stride 1 a tap outside the plane reads a zero-filled tile element,
// so only the weights are kept; with a larger stride the per-row / per-column masks and tile offsets are kept and
// masked taps are selected away, never multiplied (0 * inf would be nan).
template <typename T, typename I, int K, int S, int D>
struct cv_gather {
    typedef typename cv_acc<T>::type acc_t;
    enum { M = S == 1 ? 1 : K };
    acc_t w[K * K];
    bool rv[M], cvl[M];
    int ro[M], co[M];

    __device__ __forceinline__ void load(const T* __restrict__ kg, I plane, I Ho, I Wo, I hi, I wi, I P, I ho_lo,
                                         I wo_lo, bool active) {
        bool rowv[K], colv[K];
        I rowo[K], colo[K];
#pragma unroll
        for (int i = 0; i < K; ++i) {
            const I rr = hi + P - (I)(i * D) - ho_lo * S, rc = wi + P - (I)(i * D) - wo_lo * S;  // >= 0 in a tile
            rowo[i] = ho_lo + rr / S;
            colo[i] = wo_lo + rc / S;
            rowv[i] = active && rr % S == 0 && rowo[i] >= 0 && rowo[i] < Ho;
            colv[i] = active && rc % S == 0 && colo[i] >= 0 && colo[i] < Wo;
            if (S != 1) {
                rv[i % M] = rowv[i];
                cvl[i % M] = colv[i];
                ro[i % M] = rowv[i] ? (int)(rr / S) : 0;
                co[i % M] = colv[i] ? (int)(rc / S) : 0;
            }
        }
#pragma unroll
        for (int i = 0; i < K; ++i)
#pragma unroll
            for (int j = 0; j < K; ++j)
                w[i * K + j] = (rowv[i] && colv[j]) ? cv_load(kg[(I)(i * K + j) * plane + rowo[i] * Wo + colo[j]])
                                                    : (acc_t)0;
    }

    // sum over the taps of w * grad_y, from a staged tile of width TW for the thread at (ty, tx) of the block
    __device__ __forceinline__ acc_t dot(const acc_t* tile, int TW, int ty, int tx) const {
        acc_t acc = 0;
        if (S == 1) {
            const acc_t* base = tile + ty * TW + tx;
#pragma unroll
            for (int i = 0; i < K; ++i)
#pragma unroll
                for (int j = 0; j < K; ++j) acc += w[i * K + j] * base[(K - 1 - i) * D * TW + (K - 1 - j) * D];
        } else {
#pragma unroll
            for (int i = 0; i < K; ++i)
#pragma unroll
                for (int j = 0; j < K; ++j) {
                    const acc_t gv = (rv[i % M] && cvl[j % M]) ? tile[ro[i % M] * TW + co[j % M]] : (acc_t)0;
                    acc += w[i * K + j] * gv;
                }
        }
        return acc;
    }
};

// in0 = grad_y, in1 = kernel, in2 = x (read only for gate_grad), gate -> out0 = grad_x, gate_grad += d loss / d gate.
template <typename T, typename I, int K, int S, int D, int V>
__global__ void cv_grad_input(CV_PARAMS) {
    typedef typename cv_acc<T>::type acc_t;
    CV_DYNAMIC_SMEM(cv_smem);
    acc_t* gys = reinterpret_cast<acc_t*>(cv_smem);
    const int TH = blockDim.y, TW = blockDim.x;  // V == 1: one input pixel per thread
    // grad_y rows reaching the tile: ho_lo .. floor((hi0 + TH - 1 + P) / S), at most OH of them
    const int OH = S == 1 ? TH + (K - 1) * D : (TH - 1 + (K - 1) * D) / S + 2;
    const int OW = S == 1 ? TW + (K - 1) * D : (TW - 1 + (K - 1) * D) / S + 2;
    const int n = blockDim.x * blockDim.y, tid = threadIdx.y * blockDim.x + threadIdx.x;
    acc_t* red = gys + CB * OH * OW;  // with gate_grad: CB * n partial sums
    const bool gate_sum = gate != 0 && gate_grad != 0;  // d loss / d gate wanted (uniform over the grid)
    const I cpg = C / G, plane = Ho * Wo;
    for (I blk = blockIdx.x; blk < nblocks; blk += gridDim.x) {
        const I tile = blk % tiles, bg = blk / tiles, b = bg / G, g = bg % G;
        const I hi0 = (tile / tiles_w) * TH, wi0 = (tile % tiles_w) * TW;
        const I hi = hi0 + (I)threadIdx.y, wi = wi0 + (I)threadIdx.x;
        const bool active = hi < H && wi < W;
        const I ho_lo = cv_floor_div<I>(hi0 + P - (I)((K - 1) * D), (I)S);
        const I wo_lo = cv_floor_div<I>(wi0 + P - (I)((K - 1) * D), (I)S);
        cv_gather<T, I, K, S, D> taps;
        taps.load(in1 + (bg * (K * K)) * plane, plane, Ho, Wo, hi, wi, P, ho_lo, wo_lo, active);
        for (I c0 = 0; c0 < cpg; c0 += CB) {
            const int nc = (int)cv_min(CB, cpg - c0);
            const I cbase = b * C + g * cpg + c0;
            cv_stage<T, I>(gys, in0 + cbase * plane, nc, Ho, Wo, ho_lo, wo_lo, OH, OW);
            __syncthreads();
            for (int cc = 0; cc < nc; ++cc) {
                acc_t acc = 0, part = 0;
                if (active) {
                    acc = taps.dot(gys + cc * OH * OW, OW, threadIdx.y, threadIdx.x);
                    const I at = ((cbase + cc) * H + hi) * W + wi;
                    if (gate_sum) part = acc * cv_load(in2[at]);
                    if (gate) acc *= gate[cbase + cc];
                    out0[at] = cv_store<T>(acc);
                }
                if (gate_sum) red[cc * n + tid] = part;
            }
            if (gate_sum) cv_block_sum_atomic<acc_t>(red, nc, n, tid, gate_grad + cbase);
            __syncthreads();
        }
    }
}

// ---------------------------------------------------------------------------------------------------- fused backward

// Stride 1 only. in0 = grad_y, in1 = kernel, in2 = x, gate -> out0 = grad_x, out1 = grad_kernel, gate_grad (or null).
// Tiles index both the input (grad_x) and the output (grad_kernel) plane: thread (ty, tx) owns input pixel and
// output pixel (r0 + ty, q0 + tx), over max(H, Ho) x max(W, Wo). Both halo tiles are (TH + (K-1)D) x (TW + (K-1)D).
template <typename T, typename I, int K, int S, int D, int V>
__global__ void cv_backward_fused(CV_PARAMS) {
    typedef typename cv_acc<T>::type acc_t;
    static_assert(S == 1 && V == 1, "the fused backward is for stride 1, one pixel per thread");
    const int SEG = (K - 1) * D + 1;
    CV_DYNAMIC_SMEM(cv_smem);
    const int TH = blockDim.y, TW = blockDim.x;
    const int GH = TH + (K - 1) * D, GW = TW + (K - 1) * D;
    const int n = blockDim.x * blockDim.y, tid = threadIdx.y * blockDim.x + threadIdx.x;
    acc_t* gys = reinterpret_cast<acc_t*>(cv_smem);
    acc_t* xs = gys + CB * GH * GW;
    acc_t* red = xs + CB * GH * GW;
    const bool gate_sum = gate != 0 && gate_grad != 0;
    const I cpg = C / G, plane = Ho * Wo;
    for (I blk = blockIdx.x; blk < nblocks; blk += gridDim.x) {
        const I tile = blk % tiles, bg = blk / tiles, b = bg / G, g = bg % G;
        const I r0 = (tile / tiles_w) * TH, q0 = (tile % tiles_w) * TW;
        const I r = r0 + (I)threadIdx.y, q = q0 + (I)threadIdx.x;
        const bool in_active = r < H && q < W, out_active = r < Ho && q < Wo;
        const I ho_lo = r0 + P - (I)((K - 1) * D), wo_lo = q0 + P - (I)((K - 1) * D);
        cv_gather<T, I, K, 1, D> taps;
        taps.load(in1 + (bg * (K * K)) * plane, plane, Ho, Wo, r, q, P, ho_lo, wo_lo, in_active);
        acc_t gk[K * K];
#pragma unroll
        for (int t = 0; t < K * K; ++t) gk[t] = 0;
        for (I c0 = 0; c0 < cpg; c0 += CB) {
            const int nc = (int)cv_min(CB, cpg - c0);
            const I cbase = b * C + g * cpg + c0;
            cv_stage<T, I>(gys, in0 + cbase * plane, nc, Ho, Wo, ho_lo, wo_lo, GH, GW);
            cv_stage<T, I>(xs, in2 + cbase * H * W, nc, H, W, r0 - P, q0 - P, GH, GW);
            __syncthreads();
            for (int cc = 0; cc < nc; ++cc) {
                acc_t part = 0;
                if (in_active) {
                    acc_t acc = taps.dot(gys + cc * GH * GW, GW, threadIdx.y, threadIdx.x);
                    const I at = ((cbase + cc) * H + r) * W + q;
                    if (gate_sum) part = acc * cv_load(in2[at]);
                    if (gate) acc *= gate[cbase + cc];
                    out0[at] = cv_store<T>(acc);
                }
                if (out_active) {
                    acc_t gy = cv_load(in0[((cbase + cc) * Ho + r) * Wo + q]);
                    if (gate) gy *= gate[cbase + cc];
                    const acc_t* xr = xs + (cc * GH + (int)threadIdx.y) * GW + (int)threadIdx.x;
#pragma unroll
                    for (int i = 0; i < K; ++i) {
                        acc_t seg[SEG];
#pragma unroll
                        for (int e = 0; e < SEG; ++e) seg[e] = xr[i * D * GW + e];
#pragma unroll
                        for (int j = 0; j < K; ++j) gk[i * K + j] += gy * seg[j * D];
                    }
                }
                if (gate_sum) red[cc * n + tid] = part;
            }
            if (gate_sum) cv_block_sum_atomic<acc_t>(red, nc, n, tid, gate_grad + cbase);
            __syncthreads();
        }
        if (out_active) {
            T* kp = out1 + (bg * (K * K)) * plane + r * Wo + q;
#pragma unroll
            for (int t = 0; t < K * K; ++t) kp[(I)t * plane] = cv_store<T>(gk[t]);
        }
    }
}

// Tiny kernel used once per process to check that CuPy can compile and run code on this device.
extern "C" __global__ void involution_probe(float* out) { out[threadIdx.x] = 2.0f * threadIdx.x; }
