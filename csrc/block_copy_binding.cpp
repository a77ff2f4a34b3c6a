// Python binding of the block-copy kernel (block_copy.cu), built by
// flexkv_store.transfer with torch.utils.cpp_extension. Arguments are plain integers
// (addresses, sizes, the cudaStream_t as an integer): the Python side owns the tensors and
// their lifetimes. Only pybind11 (shipped in torch's include directory) is needed, so the
// first-use build takes seconds rather than the minute that <torch/extension.h> costs.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "block_copy.h"

namespace {

void block_copy(int64_t plane_ptrs, int64_t block_ids, int64_t num_planes, int64_t num_blocks,
                int64_t block_bytes, int64_t block_stride_bytes, int64_t chunk_ptr,
                bool scatter, int64_t vec_bytes, int64_t stream) {
  const int rc = flexkv_block_copy_launch(
      reinterpret_cast<const uint64_t*>(plane_ptrs), reinterpret_cast<const int64_t*>(block_ids),
      num_planes, num_blocks, block_bytes, block_stride_bytes, static_cast<uint64_t>(chunk_ptr),
      scatter ? FLEXKV_BLOCK_COPY_SCATTER : FLEXKV_BLOCK_COPY_GATHER,
      static_cast<int>(vec_bytes), reinterpret_cast<void*>(stream));
  if (rc != 0) {
    throw std::runtime_error(std::string("flexkv block copy kernel launch failed: ") +
                             flexkv_block_copy_error_string(rc));
  }
}

int64_t device_pointer(int64_t ptr) {
  uint64_t device_ptr = 0;
  const int rc = flexkv_block_copy_device_pointer(static_cast<uint64_t>(ptr), &device_ptr);
  if (rc != 0) {
    throw std::runtime_error(std::string("cudaPointerGetAttributes failed: ") +
                             flexkv_block_copy_error_string(rc));
  }
  return static_cast<int64_t>(device_ptr);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flexkv-store paged KV block copies (CUDA)";
  m.def("block_copy", &block_copy, "Enqueue a gather or scatter of KV blocks for all planes.");
  m.def("device_pointer", &device_pointer,
        "Device address of a host or device pointer (0 when the GPU cannot access it).");
}
