// Compiles the shared NVFP4 numerics as device code (CMake -DWAN_CMAKE_CUDA=ON): proves that every
// function of nvfp4_numerics.h is valid __device__ code for the requested archs without torch.
#include "nvfp4/nvfp4_numerics.h"

__global__ void wan_nvfp4_numerics_device(const float* x, float gs, uint8_t* packed, uint8_t* scale, float* back) {
  using namespace wan::nvfp4;
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  scale[swizzled_offset(b, 0, 4)] = quantize_block(x + b * kBlock, gs, packed + b * (kBlock / 2));
  back[b] = e2m1_decode(packed[b * (kBlock / 2)] & 0xF) * e4m3_decode(scale[b]);
}
