// CUDA side of the kernel-space NTK reduction: torch glue around the torch-free kernel in
// ntk_reduce_kernel.cuh. Compiled only when the extension is built with CUDA (WITH_CUDA);
// the entry point is ntk_reduce_cuda(), called by the dispatcher in ntk_reduce.cpp.
//
// Per layer l: the fused kernel forms Y_l = (A1_l A2_l^T) W_l  (N1, o_l * k) without an N1 x N2
// buffer, then out (N1, C, k) += G1_l (N1, C, o_l) @ Y_l (N1, o_l, k) by one batched GEMM.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "ntk_reduce_kernel.cuh"

// A1[l] (N1, d_l), G1[l] (N1, C, o_l), A2[l] (N2, d_l), W[l] (N2, o_l, k), all contiguous CUDA
// tensors of one dtype (float32 or float64) on one device; shapes were checked by the caller.
// Returns out (N1, C, k) = sum_l sum_j (A1[l][i].A2[l][j]) (G1[l][i,c,:].W[l][j,:,r]).
at::Tensor ntk_reduce_cuda(const std::vector<at::Tensor>& A1, const std::vector<at::Tensor>& G1,
                           const std::vector<at::Tensor>& A2, const std::vector<at::Tensor>& W) {
  const c10::cuda::CUDAGuard guard(A1[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t N1 = A1[0].size(0), N2 = A2[0].size(0);
  const int64_t C = G1[0].size(1), k = W[0].size(2);
  at::Tensor out = at::zeros({N1, C, k}, A1[0].options());
  if (N1 == 0 || N2 == 0 || C == 0 || k == 0) return out;
  for (size_t l = 0; l < A1.size(); ++l) {
    const int64_t d = A1[l].size(1), o = G1[l].size(2);
    if (o == 0) continue;
    at::Tensor Y = at::empty({N1, o, k}, A1[0].options());  // every entry written by the kernel
    AT_DISPATCH_FLOATING_TYPES(A1[0].scalar_type(), "ntk_reduce_cuda", [&] {
      ntk::Args<scalar_t> a{A1[l].data_ptr<scalar_t>(), A2[l].data_ptr<scalar_t>(),
                            W[l].data_ptr<scalar_t>(), Y.data_ptr<scalar_t>(),
                            N1, N2, d, o * k,
                            o * k,    // W stride (j)
                            o * k};   // Y stride (i)
      const cudaError_t err = ntk::launch_ntk_reduce<scalar_t>(a, stream);
      TORCH_CHECK(err == cudaSuccess, "ntk_reduce_cuda: kernel launch failed for layer ", l,
                  ": ", cudaGetErrorString(err));
    });
    out.baddbmm_(G1[l], Y);  // (N1, C, o) @ (N1, o, k), on the current stream
  }
  return out;
}
