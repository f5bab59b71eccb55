// Kernel-space NTK reduction, CPU twin and Python module.
//
// For Linear-layer factors A1[l] (N1, d_l), G1[l] (N1, C, o_l), A2[l] (N2, d_l) and
// W[l] (N2, o_l, k) (W[l][j] = sum_c' G2[l][j,c',:] (x) V[j,c',:], precomputed in torch),
//   ntk_reduce(A1, G1, A2, W)[i, c, r] = sum_l sum_j (A1[l][i].A2[l][j]) (G1[l][i,c,:].W[l][j,:,r])
// without an N1 x N2 buffer. CUDA tensors go to the fused kernel (ntk_reduce_cuda.cu, only when
// built WITH_CUDA); CPU tensors to the blocked twin below.
//
// CPU twin: at::parallel_for over blocks of rows i (by default one block per thread, capped at
// ~32 MiB of tiles per thread); for each block and layer, loop over blocks of rows j
// (default 2048), form the (bi x bj) tile S = A1[i-block] A2[j-block]^T and accumulate
// Z += S W[j-block] (Z: (bi, o*k)), then out[i-block] += G1[i-block] @ Z (batched over i).
// Summing over j before contracting with G1 costs 2 N1 N2 (d + o k) + 2 N1 C o k FLOPs (the GPU
// kernel does the same), and all inner work is BLAS.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <string>
#include <vector>

#ifdef WITH_CUDA
at::Tensor ntk_reduce_cuda(const std::vector<at::Tensor>& A1, const std::vector<at::Tensor>& G1,
                           const std::vector<at::Tensor>& A2, const std::vector<at::Tensor>& W);
#endif

namespace {

std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t q = 0; q < t.dim(); ++q) {
    if (q) s += ", ";
    s += std::to_string(t.size(q));
  }
  return s + (t.dim() == 1 ? ",)" : ")");
}

// Defensive re-check of what the Python wrapper validates, so that a direct call fails with a
// message instead of reading out of bounds.
void check_inputs(const std::vector<at::Tensor>& A1, const std::vector<at::Tensor>& G1,
                  const std::vector<at::Tensor>& A2, const std::vector<at::Tensor>& W) {
  const size_t L = A1.size();
  TORCH_CHECK(L >= 1, "ntk_reduce: need at least one layer, got 0");
  TORCH_CHECK(G1.size() == L && A2.size() == L && W.size() == L,
              "ntk_reduce: A1, G1, A2, W must have one entry per layer; got lengths ", L, ", ",
              G1.size(), ", ", A2.size(), ", ", W.size());
  const auto& ref = A1[0];
  TORCH_CHECK(ref.dim() == 2, "ntk_reduce: A1[0] must be 2-D (N1, d), got ", shape_str(ref));
  TORCH_CHECK(G1[0].dim() == 3, "ntk_reduce: G1[0] must be 3-D (N1, C, o), got ",
              shape_str(G1[0]));
  TORCH_CHECK(W[0].dim() == 3, "ntk_reduce: W[0] must be 3-D (N2, o, k), got ", shape_str(W[0]));
  TORCH_CHECK(A2[0].dim() == 2, "ntk_reduce: A2[0] must be 2-D (N2, d), got ", shape_str(A2[0]));
  const int64_t N1 = ref.size(0), N2 = A2[0].size(0), C = G1[0].size(1), k = W[0].size(2);
  TORCH_CHECK(ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble,
              "ntk_reduce: dtype must be float32 or float64, got ", ref.scalar_type());
  auto check = [&](const at::Tensor& t, const char* name, size_t l,
                   std::initializer_list<int64_t> shape, const char* dims) {
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "ntk_reduce: ", name, "[", l,
                "] has dtype ", t.scalar_type(), ", expected ", ref.scalar_type());
    TORCH_CHECK(t.device() == ref.device(), "ntk_reduce: ", name, "[", l, "] is on ", t.device(),
                ", expected ", ref.device());
    TORCH_CHECK(t.is_contiguous(), "ntk_reduce: ", name, "[", l,
                "] must be contiguous (call .contiguous())");
    TORCH_CHECK(t.dim() == int64_t(shape.size()), "ntk_reduce: ", name, "[", l, "] has shape ",
                shape_str(t), ", expected ", dims);
    int64_t q = 0;
    for (int64_t s : shape) {
      TORCH_CHECK(s < 0 || t.size(q) == s, "ntk_reduce: ", name, "[", l, "] has shape ",
                  shape_str(t), ", expected ", dims);
      ++q;
    }
  };
  for (size_t l = 0; l < L; ++l) {
    const int64_t d = A1[l].dim() == 2 ? A1[l].size(1) : -1;
    const int64_t o = G1[l].dim() == 3 ? G1[l].size(2) : -1;
    check(A1[l], "A1", l, {N1, -1}, "(N1, d)");
    check(G1[l], "G1", l, {N1, C, -1}, "(N1, C, o)");
    check(A2[l], "A2", l, {N2, d}, "(N2, d) with d of A1");
    check(W[l], "W", l, {N2, o, k}, "(N2, o, k) with o of G1");
  }
}

at::Tensor ntk_reduce_cpu(const std::vector<at::Tensor>& A1, const std::vector<at::Tensor>& G1,
                          const std::vector<at::Tensor>& A2, const std::vector<at::Tensor>& W,
                          int64_t block_i, int64_t block_j) {
  const int64_t N1 = A1[0].size(0), N2 = A2[0].size(0);
  const int64_t C = G1[0].size(1), k = W[0].size(2);
  at::Tensor out = at::zeros({N1, C, k}, A1[0].options());
  if (N1 == 0 || N2 == 0 || C == 0 || k == 0) return out;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  if (block_j <= 0) block_j = 2048;
  if (block_i <= 0) {
    // One block per thread (large GEMMs), capped so that a thread's tiles S (bi x bj) and
    // Z (bi x o k) stay within about 32 MiB.
    int64_t max_ok = 1;
    for (const auto& w : W) max_ok = std::max<int64_t>(max_ok, w.size(1) * k);
    const int64_t per_row = (std::min(block_j, N2) + max_ok) * int64_t(out.element_size());
    const int64_t cap = std::max<int64_t>(1, (int64_t(32) << 20) / per_row);
    block_i = std::clamp<int64_t>((N1 + nthreads - 1) / nthreads, 1, cap);
  }
  const int64_t nblocks = (N1 + block_i - 1) / block_i;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    const at::NoGradGuard no_grad;  // grad mode is thread-local: set it in every worker
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * block_i;
      const int64_t bi = std::min(block_i, N1 - i0);
      at::Tensor out_blk = out.narrow(0, i0, bi);  // (bi, C, k), rows disjoint across threads
      for (size_t l = 0; l < A1.size(); ++l) {
        const int64_t o = G1[l].size(2);
        const at::Tensor a1 = A1[l].narrow(0, i0, bi);  // (bi, d)
        const at::Tensor w = W[l].view({N2, o * k});     // (N2, o*k)
        at::Tensor Z = at::zeros({bi, o * k}, out.options());
        for (int64_t j0 = 0; j0 < N2; j0 += block_j) {
          const int64_t bj = std::min(block_j, N2 - j0);
          const at::Tensor S = at::mm(a1, A2[l].narrow(0, j0, bj).t());  // (bi, bj)
          Z.addmm_(S, w.narrow(0, j0, bj));                                // (bi, o*k)
        }
        // out_blk += G1 Z as (Z^T G1^T)^T: G1 is then read row by row (the fast order on CPUs)
        out_blk.add_(at::bmm(Z.view({bi, o, k}).transpose(1, 2).contiguous(),
                             G1[l].narrow(0, i0, bi).transpose(1, 2))
                         .transpose(1, 2));  // (bi, C, k)
      }
    }
  });
  return out;
}

}  // namespace

at::Tensor ntk_reduce(const std::vector<at::Tensor>& A1, const std::vector<at::Tensor>& G1,
                      const std::vector<at::Tensor>& A2, const std::vector<at::Tensor>& W,
                      int64_t block_i, int64_t block_j) {
  check_inputs(A1, G1, A2, W);
  const at::NoGradGuard no_grad;  // differentiation is the Python wrapper's job
  if (A1[0].is_cuda()) {
#ifdef WITH_CUDA
    return ntk_reduce_cuda(A1, G1, A2, W);
#else
    TORCH_CHECK(false, "ntk_reduce: got CUDA tensors but this build of the extension has no "
                       "CUDA (torch.cuda.is_available() was False when it was compiled); "
                       "run ntkscale.backends._ext.clear_cache() on a CUDA machine");
#endif
  }
  TORCH_CHECK(A1[0].device().is_cpu(), "ntk_reduce: tensors must be on CPU or CUDA, got ",
              A1[0].device());
  return ntk_reduce_cpu(A1, G1, A2, W, block_i, block_j);
}

bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ntkscale fused kernel-space NTK reduction (CPU twin + CUDA kernel)";
  m.def("ntk_reduce", &ntk_reduce,
        "out[i,c,r] = sum_l sum_j (A1[l][i].A2[l][j]) (G1[l][i,c,:].W[l][j,:,r]); "
        "lists over layers of A1 (N1,d), G1 (N1,C,o), A2 (N2,d), W (N2,o,k) -> (N1,C,k). "
        "block_i/block_j <= 0 pick defaults (CPU only).",
        py::arg("A1"), py::arg("G1"), py::arg("A2"), py::arg("W"), py::arg("block_i") = 0,
        py::arg("block_j") = 0);
  m.def("with_cuda", &with_cuda, "whether this build includes the CUDA kernel");
}
