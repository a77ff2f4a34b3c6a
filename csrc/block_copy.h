/*
 * Block copies between an engine's paged KV cache and a contiguous chunk.
 *
 * Plain C interface so that the kernel file needs no torch headers: the torch binding
 * (block_copy_binding.cpp) and any other caller only pass integers and addresses.
 *
 * A call moves `num_blocks` blocks for each of `num_planes` planes. A plane is one
 * layer's K, V, or MLA latent cache; plane q's block b starts at
 *     plane_ptrs[q] + block_ids[b'] * block_stride_bytes   (b' = the i-th requested block)
 * and occupies `block_bytes` contiguous bytes. In the chunk, plane q's i-th block lives at
 *     chunk_ptr + (q * num_blocks + i) * block_bytes,
 * so ordering the planes as (kv, layer) gives the chunk layout [2, L, T, ...].
 *
 * Every address must be usable from the device: device memory, or pinned host memory
 * through its mapped device address (see flexkv_block_copy_device_pointer).
 */
#ifndef FLEXKV_BLOCK_COPY_H_
#define FLEXKV_BLOCK_COPY_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum flexkv_block_copy_direction {
  FLEXKV_BLOCK_COPY_GATHER = 0, /* blocks -> chunk */
  FLEXKV_BLOCK_COPY_SCATTER = 1 /* chunk -> blocks */
};

/*
 * Enqueues the copy on `stream` (a cudaStream_t; NULL is the legacy default stream).
 * `plane_ptrs` and `block_ids` are device arrays of num_planes / num_blocks entries.
 * `vec_bytes` (16, 8, 4, 2 or 1) is the access width; the caller guarantees that every
 * plane pointer, the chunk pointer, block_bytes and block_stride_bytes are multiples of it.
 * Returns 0 (cudaSuccess) or a cudaError_t value.
 */
int flexkv_block_copy_launch(const uint64_t* plane_ptrs, const int64_t* block_ids,
                             int64_t num_planes, int64_t num_blocks, int64_t block_bytes,
                             int64_t block_stride_bytes, uint64_t chunk_ptr, int direction,
                             int vec_bytes, void* stream);

/*
 * Writes the device address of host or device pointer `ptr` to *device_ptr: `ptr` itself for
 * device or managed memory, the mapped address for pinned host memory, 0 for pageable memory.
 * Returns 0 or a cudaError_t value.
 */
int flexkv_block_copy_device_pointer(uint64_t ptr, uint64_t* device_ptr);

/* A readable message for a value returned by the functions above. */
const char* flexkv_block_copy_error_string(int code);

#ifdef __cplusplus
}
#endif

#endif /* FLEXKV_BLOCK_COPY_H_ */
