// bf16 flash attention for x86 CPUs with AVX512-BF16 (vdpbf16ps): the C++ CPU kernel of wan::attention for
// bfloat16 inputs where the CPU has the instructions (decided once per process; see attention_cpu.cpp).
#pragma once

#include <torch/types.h>

#include <optional>
#include <string>

namespace wan {

// The C++ CPU kernel of wan::attention for bfloat16 inputs, by WAN_CPU_ATTENTION (default "auto"):
//   "aten_amx"     ATen's bf16 flash kernel, which runs on AMX tiles, for one key set (attention without an
//                  image set); the kernel below for two (I2V). auto's pick where ATen can pack
//                  bf16 for AMX (at::native::cpublas::could_pack) and the CPU has AVX512-BF16.
//   "avx512_bf16"  the kernel below for every call it takes; auto's pick on AVX512-BF16 CPUs without AMX.
//   "aten"         ATen's flash kernel on fp32 copies (exact inputs, fp32 speed); auto's pick elsewhere.
// Forcing a kernel the CPU cannot run is an error. Read once: the environment variable and the CPU cannot
// change under a running process.
const std::string& cpu_attention_bf16_kernel();

// Whether the kernel handles these shapes (even head dim, value dim a multiple of 64).
bool attention_bf16_avx512_supports(int64_t head_dim, int64_t value_dim);

// softmax(q k^T scale) v [+ softmax(q k_img^T scale) v_img] for bf16 [B, S, H, D] inputs (any strides):
// bf16 x bf16 products accumulated in fp32, fp32 online softmax (exp2), probabilities rounded to bf16 for
// P V (as every flash-attention kernel feeding a bf16 matrix unit does, ATen's CPU kernel included), the
// branches summed in fp32 and the result rounded to bf16 once. Returns a contiguous [B, S, H, Dv] tensor.
torch::Tensor attention_bf16_avx512(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                    const std::optional<torch::Tensor>& k_img,
                                    const std::optional<torch::Tensor>& v_img, double scale);

}  // namespace wan
