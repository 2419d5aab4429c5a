// Counter-based dropout on CUDA: the same hash of (key, row, column) as
// `DropoutKey::row(..).at(..)` in src/dropout.rs, so a CUDA run draws the CPU's masks bit
// for bit and the backward pass recomputes the mask instead of storing it.
#include <stdint.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__device__ __forceinline__ uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

// The multiplier (0 or `scale`) of element i of a [rows, cols] tensor whose first row is
// row `row0` of the key's numbering.
__device__ __forceinline__ float multiplier(uint64_t i, uint32_t cols, uint64_t key,
                                            uint64_t row0, uint32_t threshold, float scale) {
  uint64_t row = row0 + i / cols;
  uint32_t col = (uint32_t)(i % cols);
  uint64_t k = splitmix64(key ^ (row * 0xD1290A5B3C314F6Bull));
  uint32_t h = lowbias32(lowbias32(col ^ (uint32_t)k) + (uint32_t)(k >> 32));
  return h >= threshold ? scale : 0.0f;
}

// out = x ⊙ mask. `scale` arrives rounded to T, as the composed path's mask would be, and
// the product is formed in f32 and rounded once (exact for bf16/f16 operands).
#define DROPOUT(NAME, T, LOAD, STORE)                                                      \
  extern "C" __global__ void NAME(const T* x, T* out, uint64_t n, uint32_t cols,          \
                                  uint64_t key, uint64_t row0, uint32_t threshold,        \
                                  float scale) {                                           \
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;              \
         i += (uint64_t)blockDim.x * gridDim.x) {                                          \
      out[i] = STORE(LOAD(x[i]) * multiplier(i, cols, key, row0, threshold, scale));       \
    }                                                                                      \
  }

#define ID(v) (v)
DROPOUT(dropout_f32, float, ID, ID)
DROPOUT(dropout_bf16, __nv_bfloat16, __bfloat162float, __float2bfloat16)
DROPOUT(dropout_f16, __half, __half2float, __float2half)
