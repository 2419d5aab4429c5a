// The attention softmax on CUDA, causal mask and score scale folded in: one pass that
// reads the raw scores and writes the probabilities, instead of Candle's composed form
// (scale, mask add, max, subtract, exp, sum, divide: each a [B, H, Sq, Skv] tensor that the
// graph keeps until the backward pass; now the scores and the probabilities alone). One
// block per row; f32 arithmetic whatever the storage type.
#include <stdint.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ float load(float v) { return v; }
__device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float load(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T store(float v);
template <> __device__ __forceinline__ float store<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <> __device__ __forceinline__ __half store<__half>(float v) { return __float2half(v); }

// Block-wide reduction (blockDim.x a multiple of 32, at most 1024).
template <bool MAX>
__device__ float block_reduce(float v) {
  __shared__ float part[32];
  for (int o = 16; o > 0; o >>= 1) {
    float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = MAX ? fmaxf(v, w) : v + w;
  }
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  // Warp 0 alone reads the partials: it overwrites part[0] below.
  if (warp == 0) {
    v = lane < warps ? part[lane] : (MAX ? -INFINITY : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
      float w = __shfl_xor_sync(0xffffffffu, v, o);
      v = MAX ? fmaxf(v, w) : v + w;
    }
    if (lane == 0) part[0] = v;
  }
  __syncthreads();
  v = part[0];
  __syncthreads();
  return v;
}

// y[r, j] = softmax_j(scale · x[r, j]) over the keys j ≤ offset + (r mod sq); 0 beyond.
template <typename T>
__device__ void causal_softmax(const T* x, T* y, uint32_t sq, uint32_t skv, uint32_t offset,
                               float scale) {
  uint64_t row = blockIdx.x;
  const T* xr = x + row * skv;
  T* yr = y + row * skv;
  uint32_t seen = min(offset + (uint32_t)(row % sq) + 1, skv);
  float m = -INFINITY;
  for (uint32_t j = threadIdx.x; j < seen; j += blockDim.x) m = fmaxf(m, scale * load(xr[j]));
  m = block_reduce<true>(m);
  float s = 0.0f;
  for (uint32_t j = threadIdx.x; j < seen; j += blockDim.x) s += expf(scale * load(xr[j]) - m);
  s = block_reduce<false>(s);
  for (uint32_t j = threadIdx.x; j < skv; j += blockDim.x)
    yr[j] = store<T>(j < seen ? expf(scale * load(xr[j]) - m) / s : 0.0f);
}

// dx = scale · y ⊙ (g − Σ_j g y): the softmax backward through the scale (masked keys have
// y = 0 and get 0).
template <typename T>
__device__ void causal_softmax_bwd(const T* y, const T* g, T* dx, uint32_t skv, float scale) {
  uint64_t row = blockIdx.x;
  const T* yr = y + row * skv;
  const T* gr = g + row * skv;
  T* dr = dx + row * skv;
  float d = 0.0f;
  for (uint32_t j = threadIdx.x; j < skv; j += blockDim.x) d += load(gr[j]) * load(yr[j]);
  d = block_reduce<false>(d);
  for (uint32_t j = threadIdx.x; j < skv; j += blockDim.x)
    dr[j] = store<T>(scale * load(yr[j]) * (load(gr[j]) - d));
}

#define SOFTMAX(SUFFIX, T)                                                                   \
  extern "C" __global__ void causal_softmax_##SUFFIX(const T* x, T* y, uint32_t sq,         \
                                                     uint32_t skv, uint32_t offset,         \
                                                     float scale) {                         \
    causal_softmax<T>(x, y, sq, skv, offset, scale);                                         \
  }                                                                                          \
  extern "C" __global__ void causal_softmax_bwd_##SUFFIX(const T* y, const T* g, T* dx,     \
                                                         uint32_t skv, float scale) {        \
    causal_softmax_bwd<T>(y, g, dx, skv, scale);                                             \
  }

SOFTMAX(f32, float)
SOFTMAX(bf16, __nv_bfloat16)
SOFTMAX(f16, __half)
