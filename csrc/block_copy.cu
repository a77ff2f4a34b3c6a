// Gather/scatter of paged KV-cache blocks for all layers of a chunk in one launch.
//
// Plain CUDA C++ (no torch headers) so `nvcc -c` can check it on machines without a GPU.
// Interface and address rules: block_copy.h.

#include <cuda_runtime.h>
#include <stdint.h>

#include "block_copy.h"

namespace {

constexpr int kThreads = 256;
// Each thread keeps kUnroll loads in flight before storing: copies to or from pinned host
// memory cross PCIe/NVLink-C2C, where one outstanding access per thread leaves the link idle.
constexpr int kUnroll = 4;
constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr int64_t kMaxGridY = 65535;

struct alignas(2) Vec2 {
  uint8_t b[2];
};

// One CTA copies one tile (kThreads * kUnroll vectors) of one block of one plane; the grid
// strides cover any number of blocks and planes.
template <typename V>
__global__ void __launch_bounds__(kThreads)
    block_copy_kernel(const uint64_t* __restrict__ plane_ptrs,
                      const int64_t* __restrict__ block_ids, int64_t num_planes,
                      int64_t num_blocks, int64_t vecs_per_block, int64_t tiles_per_block,
                      int64_t block_bytes, int64_t block_stride_bytes, char* chunk,
                      bool scatter) {
  const int64_t work_items = num_blocks * tiles_per_block;
  for (int64_t q = blockIdx.y; q < num_planes; q += gridDim.y) {
    char* const plane = reinterpret_cast<char*>(plane_ptrs[q]);
    for (int64_t w = blockIdx.x; w < work_items; w += gridDim.x) {
      const int64_t i = w / tiles_per_block;
      const int64_t tile = w - i * tiles_per_block;
      char* const cache_block = plane + block_ids[i] * block_stride_bytes;
      char* const chunk_block = chunk + (q * num_blocks + i) * block_bytes;
      const V* __restrict__ src = reinterpret_cast<const V*>(scatter ? chunk_block : cache_block);
      V* __restrict__ dst = reinterpret_cast<V*>(scatter ? cache_block : chunk_block);
      const int64_t first = tile * (kThreads * kUnroll) + threadIdx.x;
      V regs[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t v = first + k * kThreads;
        if (v < vecs_per_block) regs[k] = src[v];
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t v = first + k * kThreads;
        if (v < vecs_per_block) dst[v] = regs[k];
      }
    }
  }
}

template <typename V>
cudaError_t launch(const uint64_t* plane_ptrs, const int64_t* block_ids, int64_t num_planes,
                   int64_t num_blocks, int64_t block_bytes, int64_t block_stride_bytes,
                   char* chunk, bool scatter, cudaStream_t stream) {
  const int64_t vecs_per_block = block_bytes / static_cast<int64_t>(sizeof(V));
  const int64_t per_tile = static_cast<int64_t>(kThreads) * kUnroll;
  const int64_t tiles_per_block = (vecs_per_block + per_tile - 1) / per_tile;
  const int64_t work_items = num_blocks * tiles_per_block;
  const dim3 grid(static_cast<unsigned>(work_items < kMaxGridX ? work_items : kMaxGridX),
                  static_cast<unsigned>(num_planes < kMaxGridY ? num_planes : kMaxGridY));
  block_copy_kernel<V><<<grid, kThreads, 0, stream>>>(plane_ptrs, block_ids, num_planes,
                                                      num_blocks, vecs_per_block,
                                                      tiles_per_block, block_bytes,
                                                      block_stride_bytes, chunk, scatter);
  return cudaGetLastError();
}

bool is_multiple(int64_t value, int64_t of) { return value % of == 0; }

}  // namespace

extern "C" int flexkv_block_copy_launch(const uint64_t* plane_ptrs, const int64_t* block_ids,
                                        int64_t num_planes, int64_t num_blocks,
                                        int64_t block_bytes, int64_t block_stride_bytes,
                                        uint64_t chunk_ptr, int direction, int vec_bytes,
                                        void* stream) {
  if (plane_ptrs == nullptr || block_ids == nullptr || chunk_ptr == 0 || num_planes <= 0 ||
      num_blocks <= 0 || block_bytes <= 0 || block_stride_bytes < block_bytes ||
      (direction != FLEXKV_BLOCK_COPY_GATHER && direction != FLEXKV_BLOCK_COPY_SCATTER)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (vec_bytes != 16 && vec_bytes != 8 && vec_bytes != 4 && vec_bytes != 2 && vec_bytes != 1) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  // A misaligned vector access faults the whole context, so refuse what can be checked here.
  if (!is_multiple(block_bytes, vec_bytes) || !is_multiple(block_stride_bytes, vec_bytes) ||
      !is_multiple(static_cast<int64_t>(chunk_ptr % 16), vec_bytes)) {
    return static_cast<int>(cudaErrorMisalignedAddress);
  }
  char* const chunk = reinterpret_cast<char*>(chunk_ptr);
  const bool scatter = direction == FLEXKV_BLOCK_COPY_SCATTER;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (vec_bytes) {
    case 16:
      err = launch<uint4>(plane_ptrs, block_ids, num_planes, num_blocks, block_bytes,
                          block_stride_bytes, chunk, scatter, s);
      break;
    case 8:
      err = launch<uint2>(plane_ptrs, block_ids, num_planes, num_blocks, block_bytes,
                          block_stride_bytes, chunk, scatter, s);
      break;
    case 4:
      err = launch<uint32_t>(plane_ptrs, block_ids, num_planes, num_blocks, block_bytes,
                             block_stride_bytes, chunk, scatter, s);
      break;
    case 2:
      err = launch<Vec2>(plane_ptrs, block_ids, num_planes, num_blocks, block_bytes,
                         block_stride_bytes, chunk, scatter, s);
      break;
    default:
      err = launch<uint8_t>(plane_ptrs, block_ids, num_planes, num_blocks, block_bytes,
                            block_stride_bytes, chunk, scatter, s);
      break;
  }
  return static_cast<int>(err);
}

extern "C" int flexkv_block_copy_device_pointer(uint64_t ptr, uint64_t* device_ptr) {
  *device_ptr = 0;
  cudaPointerAttributes attr;
  const cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr));
  if (err != cudaSuccess) {
    // Older runtimes report pageable memory as an error; clear it so it does not surface
    // from the next unrelated CUDA call.
    (void)cudaGetLastError();
    return err == cudaErrorInvalidValue ? 0 : static_cast<int>(err);
  }
  switch (attr.type) {
    case cudaMemoryTypeDevice:
    case cudaMemoryTypeManaged:
      *device_ptr = ptr;
      break;
    case cudaMemoryTypeHost:
      *device_ptr = reinterpret_cast<uint64_t>(attr.devicePointer);
      break;
    default:
      break;
  }
  return 0;
}

extern "C" const char* flexkv_block_copy_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
