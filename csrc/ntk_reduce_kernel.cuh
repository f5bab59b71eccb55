// Fused kernel-space NTK reduction: the CUDA kernel, torch-free.
//
// For one Linear layer with factors
//   A1 (N1, d)      layer inputs, side 1            (row-major, contiguous)
//   G1 (N1, C, o)   output gradients, side 1        (o contiguous; i and c strided)
//   A2 (N2, d)      layer inputs, side 2            (row-major, contiguous)
//   W  (N2, o, k)   W[j] = sum_c' G2[j,c',:] (x) V[j,c',:], precomputed by the caller
// the kernel accumulates
//   out[i,c,r] += sum_j (A1[i] . A2[j]) * (G1[i,c,:] . W[j,:,r])          out (N1, C, k)
// without ever writing an N1 x N2 tile to global memory (the FlashAttention pattern):
//
//   * a thread block owns a tile of TI rows i and all (c, r) for them;
//   * it loops over tiles of kTileJ rows j; for each tile it
//       1. stages A1[i-tile, d-chunk] and A2[j-tile, d-chunk] in shared memory and forms the
//          TI x kTileJ inner products s(i, j) (two values per thread, in registers, then smem);
//       2. stages G1[i-tile, :, o-chunk] and W[j-tile, o-chunk, :] in shared memory and forms the
//          products p(i,c,j,r) = G1[i,c,:] . W[j,:,r] in registers;
//       3. multiplies s * p and accumulates over j in registers;
//   * at the end, the partial sums of the NJ thread groups that split the j-columns of a tile
//     are added through shared memory and written (added) to out.
//
// FLOPs per (i, j) pair: 2 (d + C o k); plain FMA in the input dtype (float32 or float64).
//
// This header holds no torch and no CUDA-runtime dependency in its device code, so that
//   * nvcc can compile it on a machine whose torch wheel has no CUDA headers (see the tests);
//   * the test suite can run the very same kernel body on the CPU under an emulation of the
//     CUDA execution model (one std::thread per CUDA thread, std::barrier for __syncthreads):
//     the includer defines NTK_EMULATION and the NTK_TID / NTK_BID / NTK_SYNC /
//     NTK_DECLARE_SMEM hooks before including this file.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(NTK_EMULATION)
#define NTK_KERNEL inline
#define NTK_HD inline
#ifndef NTK_RESTRICT
#define NTK_RESTRICT
#endif
#elif defined(__CUDACC__)
#include <cuda_runtime.h>
#define NTK_KERNEL __global__ __launch_bounds__(256)
#define NTK_HD __host__ __device__ __forceinline__
#define NTK_RESTRICT __restrict__
#define NTK_TID() (static_cast<int>(threadIdx.x))
#define NTK_BID() (static_cast<int64_t>(blockIdx.x))
#define NTK_SYNC() __syncthreads()
#define NTK_DECLARE_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#else
#error "ntk_reduce_kernel.cuh needs nvcc (__CUDACC__) or NTK_EMULATION with its hooks"
#endif

namespace ntk {

constexpr int kThreads = 256;  // threads per block (matches __launch_bounds__ above)
constexpr int kTileJ = 16;     // rows j per tile
constexpr int kChunk = 32;     // chunk of the d and o axes staged in shared memory
constexpr int kPad = kChunk + 1;  // padded row stride of staged A / G tiles (no bank conflicts)
constexpr int kEPT = 4;        // output elements (i, c, r) per thread, at most
constexpr int kMaxTileI = 32;  // rows i per block, at most
constexpr int kSPT = (kMaxTileI * kTileJ + kThreads - 1) / kThreads;  // s(i,j) per thread
constexpr size_t kDefaultSmemLimit = 48 * 1024;  // dynamic smem without an opt-in

static_assert(kThreads == 256, "NTK_KERNEL's __launch_bounds__ hard-codes 256");

// Arguments of one launch. Chunks over c and r are expressed through the pointers and strides
// (the r axis of W and out and the o axis of G1 always have stride 1).
template <typename T>
struct Args {
  const T* A1;  // (N1, d) contiguous
  const T* G1;  // (N1, C, o): element [i, c, q] at i * g_si + c * g_sc + q
  const T* A2;  // (N2, d) contiguous
  const T* W;   // (N2, o, k): element [j, q, r] at j * w_sj + q * w_so + r
  T* out;       // (N1, C, k): element [i, c, r] at i * out_si + c * out_sc + r  (accumulated)
  int64_t N1, N2, d, o;
  int64_t C, k;  // number of outputs c and columns r handled by this launch
  int64_t g_si, g_sc;
  int64_t w_sj, w_so;
  int64_t out_si, out_sc;
};

// Shared memory (in elements of T) of a block with tile TI, C outputs and k columns.
NTK_HD int64_t smem_elems(int64_t TI, int64_t C, int64_t k) {
  const int64_t tiles = TI * kTileJ                    // sS  [TI][kTileJ]
                        + TI * kPad                    // sA1 [TI][kPad]
                        + int64_t(kTileJ) * kPad       // sA2 [kTileJ][kPad]
                        + TI * C * kPad                // sG  [TI*C][kPad]
                        + int64_t(kTileJ) * kChunk * k;  // sW  [kTileJ][kChunk][k]
  const int64_t reduction = int64_t(kThreads) * kEPT;  // final cross-group reduction buffer
  return tiles > reduction ? tiles : reduction;
}

template <typename T, int NJ>
NTK_KERNEL void ntk_reduce_kernel(Args<T> a, int TI) {
  static_assert(kThreads % NJ == 0 && kTileJ % NJ == 0, "NJ must divide the block and the tile");
  constexpr int NE = kThreads / NJ;  // threads along the output elements
  constexpr int QJ = kTileJ / NJ;    // columns j of a tile handled by one thread

  NTK_DECLARE_SMEM(ntk_smem_raw);
  T* const smem = reinterpret_cast<T*>(ntk_smem_raw);
  const int C = static_cast<int>(a.C);
  const int K = static_cast<int>(a.k);
  const int rows = TI * C;  // staged G1 rows (ii, c)
  const int E = rows * K;   // output elements (ii, c, r) of this block; E <= NE * kEPT
  T* const sS = smem;                  // [TI][kTileJ]
  T* const sA1 = sS + TI * kTileJ;     // [TI][kPad]
  T* const sA2 = sA1 + TI * kPad;      // [kTileJ][kPad]
  T* const sG = sA2 + kTileJ * kPad;   // [rows][kPad]
  T* const sW = sG + rows * kPad;      // [kTileJ][kChunk][K]

  const T* NTK_RESTRICT A1 = a.A1;
  const T* NTK_RESTRICT A2 = a.A2;
  const T* NTK_RESTRICT G1 = a.G1;
  const T* NTK_RESTRICT W = a.W;

  const int tid = NTK_TID();
  const int te = tid % NE;  // element group
  const int tj = tid / NE;  // column group: columns tj, tj + NJ, ...
  const int64_t i0 = NTK_BID() * TI;

  T acc[kEPT];
#pragma unroll
  for (int m = 0; m < kEPT; ++m) acc[m] = T(0);

  for (int64_t j0 = 0; j0 < a.N2; j0 += kTileJ) {
    // ---- 1. s(i, j) = A1[i] . A2[j] on the TI x kTileJ tile -----------------------------
    T sacc[kSPT];
#pragma unroll
    for (int s = 0; s < kSPT; ++s) sacc[s] = T(0);
    for (int64_t d0 = 0; d0 < a.d; d0 += kChunk) {
      for (int idx = tid; idx < TI * kChunk; idx += kThreads) {
        const int ii = idx / kChunk, kk = idx % kChunk;
        const int64_t gi = i0 + ii, gk = d0 + kk;
        sA1[ii * kPad + kk] = (gi < a.N1 && gk < a.d) ? A1[gi * a.d + gk] : T(0);
      }
      for (int idx = tid; idx < kTileJ * kChunk; idx += kThreads) {
        const int jj = idx / kChunk, kk = idx % kChunk;
        const int64_t gj = j0 + jj, gk = d0 + kk;
        sA2[jj * kPad + kk] = (gj < a.N2 && gk < a.d) ? A2[gj * a.d + gk] : T(0);
      }
      NTK_SYNC();
#pragma unroll
      for (int s = 0; s < kSPT; ++s) {
        const int e = tid + s * kThreads;
        if (e < TI * kTileJ) {
          const T* x = sA1 + (e / kTileJ) * kPad;
          const T* y = sA2 + (e % kTileJ) * kPad;
          T v = sacc[s];
#pragma unroll 8
          for (int kk = 0; kk < kChunk; ++kk) v += x[kk] * y[kk];
          sacc[s] = v;
        }
      }
      NTK_SYNC();
    }
#pragma unroll
    for (int s = 0; s < kSPT; ++s) {
      const int e = tid + s * kThreads;
      if (e < TI * kTileJ) sS[e] = sacc[s];
    }
    // (sS is read only after the first barrier of the o-loop below; o >= 1.)

    // ---- 2. p(i, c, j, r) = G1[i, c, :] . W[j, :, r] -------------------------------------
    T p[kEPT][QJ];
#pragma unroll
    for (int m = 0; m < kEPT; ++m) {
#pragma unroll
      for (int q = 0; q < QJ; ++q) p[m][q] = T(0);
    }
    for (int64_t o0 = 0; o0 < a.o; o0 += kChunk) {
      for (int idx = tid; idx < rows * kChunk; idx += kThreads) {
        const int row = idx / kChunk, kk = idx % kChunk;
        const int ii = row / C, c = row % C;
        const int64_t gi = i0 + ii, gq = o0 + kk;
        sG[row * kPad + kk] = (gi < a.N1 && gq < a.o) ? G1[gi * a.g_si + c * a.g_sc + gq] : T(0);
      }
      for (int idx = tid; idx < kTileJ * kChunk * K; idx += kThreads) {
        const int jj = idx / (kChunk * K);
        const int rem = idx % (kChunk * K);
        const int kk = rem / K, r = rem % K;
        const int64_t gj = j0 + jj, gq = o0 + kk;
        sW[idx] = (gj < a.N2 && gq < a.o) ? W[gj * a.w_sj + gq * a.w_so + r] : T(0);
      }
      NTK_SYNC();
#pragma unroll
      for (int m = 0; m < kEPT; ++m) {
        const int e = te + m * NE;
        if (e < E) {
          const int row = e / K, r = e % K;
          const T* g = sG + row * kPad;
          for (int kk = 0; kk < kChunk; ++kk) {
            const T gv = g[kk];
#pragma unroll
            for (int q = 0; q < QJ; ++q) {
              const int jj = tj + q * NJ;
              p[m][q] += gv * sW[(jj * kChunk + kk) * K + r];
            }
          }
        }
      }
      NTK_SYNC();
    }

    // ---- 3. acc(i, c, r) += sum_j s(i, j) p(i, c, j, r) -----------------------------------
#pragma unroll
    for (int m = 0; m < kEPT; ++m) {
      const int e = te + m * NE;
      if (e < E) {
        const int ii = (e / K) / C;
#pragma unroll
        for (int q = 0; q < QJ; ++q) acc[m] += sS[ii * kTileJ + tj + q * NJ] * p[m][q];
      }
    }
    NTK_SYNC();  // sS and the staging buffers are rewritten by the next tile
  }

  // ---- reduce the NJ column groups and write ---------------------------------------------
  T* const red = smem;  // [NJ][NE * kEPT]
#pragma unroll
  for (int m = 0; m < kEPT; ++m) red[tj * (NE * kEPT) + te + m * NE] = acc[m];
  NTK_SYNC();
  for (int e = tid; e < E; e += kThreads) {
    T v = T(0);
#pragma unroll
    for (int t = 0; t < NJ; ++t) v += red[t * (NE * kEPT) + e];
    const int row = e / K, r = e % K;
    const int ii = row / C, c = row % C;
    const int64_t gi = i0 + ii;
    if (gi < a.N1) a.out[gi * a.out_si + c * a.out_sc + r] += v;
  }
}

// ---- host-side planning (plain C++, shared by the CUDA launcher and the emulator) -----------

struct Plan {
  int NJ = 0;             // column groups (template parameter of the kernel): 1, 4 or 16
  int TI = 0;             // rows i per block
  int64_t c_chunk = 0;    // outputs c per launch
  int64_t k_chunk = 0;    // columns r per launch
  size_t smem_bytes = 0;  // dynamic shared memory per block
};

// Largest TI that fits the element budget of NJ and the shared-memory limit; 0 if none.
inline int tile_i(int NJ, int64_t C, int64_t k, size_t elem_size, size_t smem_limit) {
  const int64_t budget = int64_t(kThreads / NJ) * kEPT;
  int64_t TI = budget / (C * k);
  if (TI > kMaxTileI) TI = kMaxTileI;
  while (TI >= 1 && size_t(smem_elems(TI, C, k)) * elem_size > smem_limit) --TI;
  return TI >= 1 ? static_cast<int>(TI) : 0;
}

// Choose NJ, TI and the (c, r) chunking. The score is rows i processed per unit of the longest
// per-thread work in phase 2: TI / (ceil(E / NE) * kTileJ / NJ).
inline Plan make_plan(int64_t C, int64_t k, size_t elem_size, size_t smem_limit) {
  int64_t cc = C, kc = k;
  for (;;) {
    Plan best;
    double best_score = -1.0;
    const int candidates[3] = {1, 4, 16};
    for (int NJ : candidates) {
      const int TI = tile_i(NJ, cc, kc, elem_size, smem_limit);
      if (TI == 0) continue;
      const int64_t NE = kThreads / NJ;
      const int64_t E = int64_t(TI) * cc * kc;
      const double work = double((E + NE - 1) / NE) * double(kTileJ / NJ);
      const double score = double(TI) / work;
      if (score > best_score * (1.0 + 1e-9)) {
        best_score = score;
        best.NJ = NJ;
        best.TI = TI;
      }
    }
    if (best.NJ != 0) {
      best.c_chunk = cc;
      best.k_chunk = kc;
      best.smem_bytes = size_t(smem_elems(best.TI, cc, kc)) * elem_size;
      return best;
    }
    if (kc > 1) {
      kc = (kc + 1) / 2;
    } else if (cc > 1) {
      cc = (cc + 1) / 2;
    } else {
      return Plan{};  // NJ == 0: shared-memory limit too small even for one (i, c, r)
    }
  }
}

// Walk the (c, r) chunks of a full problem and hand each launch to `launch(args, plan, grid)`.
// Returns false when no plan fits (smem_limit too small).
template <typename T, typename Launch>
bool for_each_launch(const Args<T>& full, size_t smem_limit, Launch&& launch) {
  if (full.N1 == 0 || full.C == 0 || full.k == 0) return true;  // nothing to write
  const Plan plan = make_plan(full.C, full.k, sizeof(T), smem_limit);
  if (plan.NJ == 0) return false;
  const int64_t grid = (full.N1 + plan.TI - 1) / plan.TI;
  for (int64_t c0 = 0; c0 < full.C; c0 += plan.c_chunk) {
    for (int64_t r0 = 0; r0 < full.k; r0 += plan.k_chunk) {
      Args<T> a = full;
      a.C = (full.C - c0 < plan.c_chunk) ? full.C - c0 : plan.c_chunk;
      a.k = (full.k - r0 < plan.k_chunk) ? full.k - r0 : plan.k_chunk;
      a.G1 = full.G1 + c0 * full.g_sc;
      a.W = full.W + r0;
      a.out = full.out + c0 * full.out_sc + r0;
      launch(a, plan, grid);
    }
  }
  return true;
}

#if defined(__CUDACC__) && !defined(NTK_EMULATION)
// Launch the reduction for one layer on `stream` (out is accumulated into). Returns the first
// CUDA error, or cudaErrorInvalidConfiguration when no plan fits the shared-memory limit.
template <typename T>
cudaError_t launch_ntk_reduce(const Args<T>& full, cudaStream_t stream,
                              size_t smem_limit = kDefaultSmemLimit) {
  cudaError_t err = cudaSuccess;
  const bool ok = for_each_launch(full, smem_limit, [&](const Args<T>& a, const Plan& plan,
                                                        int64_t grid) {
    if (err != cudaSuccess) return;
    const dim3 blocks(static_cast<unsigned int>(grid));
    switch (plan.NJ) {
      case 1:
        ntk_reduce_kernel<T, 1><<<blocks, kThreads, plan.smem_bytes, stream>>>(a, plan.TI);
        break;
      case 4:
        ntk_reduce_kernel<T, 4><<<blocks, kThreads, plan.smem_bytes, stream>>>(a, plan.TI);
        break;
      default:
        ntk_reduce_kernel<T, 16><<<blocks, kThreads, plan.smem_bytes, stream>>>(a, plan.TI);
        break;
    }
    err = cudaGetLastError();
  });
  if (!ok) return cudaErrorInvalidConfiguration;
  return err;
}
#endif

}  // namespace ntk
