// Fused kernel-space NTK reduction: the CUDA kernel, torch-free.
//
// For one Linear layer with factors
//   A1 (N1, d)        layer inputs, side 1                      (row-major, contiguous)
//   A2 (N2, d)        layer inputs, side 2                      (row-major, contiguous)
//   W  (N2, o*k)      W[j] = sum_c' G2[j,c',:] (x) V[j,c',:], flattened over (o, r)
// the kernel computes
//   Y[i, q] = sum_j (A1[i] . A2[j]) W[j, q]                     Y (N1, o*k)
// i.e. Y = S W with S = A1 A2^T, without ever writing S (N1 x N2) to global memory -- the
// FlashAttention pattern without softmax. The torch glue (ntk_reduce_cuda.cu) then adds the
// cheap batched contraction out[i, c, r] += sum_q G1[i, c, q] Y[i, q, r] (one bmm per layer).
// Summing over j before contracting with G1 costs 2 (d + o k) FLOPs per (i, j) pair (per
// column tile for the d part), C times less than contracting with G1 inside the j loop.
//
// Tiling (a block of kThreads = 256 threads laid out as a 16 x 16 grid (ty, tx)):
//   * the grid covers (tiles of BI rows i) x (tiles of BOK flattened columns q);
//   * each block loops over tiles of BJ rows j:
//       1. for each chunk of BD entries of d, A1[i-tile, chunk] and A2[j-tile, chunk] are staged
//          (transposed, padded) in shared memory and the s tile s(i, j) = A1[i] . A2[j]
//          (BI x BJ) is accumulated in registers, (BI/16) x (BJ/16) per thread; it is then
//          stored to shared memory;
//       2. the W tile W[j-tile, q-tile] (BJ x BOK) is staged in shared memory (in the space of
//          the A tiles, which are dead by then) and Y_tile += s_tile W_tile is accumulated in
//          registers, a (BI/16) x (BOK/16) micro-tile per thread (rows ty + 16 m, columns
//          tx + 16 n: conflict-free shared reads, coalesced writes);
//   * Y is written once at the end (stored, not accumulated).
// The s tile is recomputed for every column tile (d FMAs per pair per column tile).
// Out-of-range rows/columns/entries are staged as zeros, so ragged edges need no branches in
// the inner loops; only the final store is bounds-checked. Every barrier is reached by all
// threads of the block (the loop bounds are uniform across the block).
//
// Two tile shapes; the host picks by the number of columns o*k:
//   TileWide   BI=64,  BJ=32, BOK=64, BD=32  (o*k > 16)   4 x 4 Y micro-tile per thread
//   TileNarrow BI=128, BJ=16, BOK=16, BD=16  (o*k <= 16)  8 x 1 Y micro-tile per thread
// Shared memory is static and at most 48 KiB for float64 (checked by static_assert).
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
#define NTK_DECLARE_SMEM(name, bytes) __shared__ __align__(16) unsigned char name[bytes]
#else
#error "ntk_reduce_kernel.cuh needs nvcc (__CUDACC__) or NTK_EMULATION with its hooks"
#endif

namespace ntk {

constexpr int kThreads = 256;  // threads per block (matches __launch_bounds__ above)
constexpr int kSide = 16;      // the block is a kSide x kSide grid of threads (ty, tx)
constexpr size_t kStaticSmemLimit = 48 * 1024;

static_assert(kThreads == 256 && kSide * kSide == kThreads,
              "NTK_KERNEL's __launch_bounds__ hard-codes 256 = 16 x 16");

// Tile shape: BI rows i, BJ rows j, BOK columns q per block; d staged in chunks of BD.
template <int BI_, int BJ_, int BOK_, int BD_>
struct Tile {
  static constexpr int BI = BI_, BJ = BJ_, BOK = BOK_, BD = BD_;
  static constexpr int TM = BI / kSide;   // Y and s rows per thread
  static constexpr int TJ = BJ / kSide;   // s columns per thread
  static constexpr int TN = BOK / kSide;  // Y columns per thread
  static constexpr int LDA1 = BI + 1;     // padded strides of the transposed A tiles / s tile
  static constexpr int LDA2 = BJ + 1;
  static constexpr int kS = BJ * LDA1;                    // sS  [BJ][LDA1]
  static constexpr int kA = BD * LDA1 + BD * LDA2;        // sA1 [BD][LDA1], sA2 [BD][LDA2]
  static constexpr int kW = BJ * BOK;                     // sW  [BJ][BOK] (aliases sA1/sA2)
  static constexpr int kStage = kA > kW ? kA : kW;
  static constexpr int kElems = kS + kStage;
  template <typename T>
  static constexpr size_t smem_bytes() { return size_t(kElems) * sizeof(T); }
  static_assert(BI % kSide == 0 && BJ % kSide == 0 && BOK % kSide == 0, "tiles of 16");
  static_assert(size_t(kElems) * sizeof(double) <= kStaticSmemLimit, "static smem > 48 KiB");
};

using TileWide = Tile<64, 32, 64, 32>;
using TileNarrow = Tile<128, 16, 16, 16>;

// Arguments of one launch (one layer).
template <typename T>
struct Args {
  const T* A1;  // (N1, d) contiguous
  const T* A2;  // (N2, d) contiguous
  const T* W;   // (N2, ok): element [j, q] at j * w_sj + q
  T* Y;         // (N1, ok): element [i, q] at i * y_si + q   (written, not accumulated)
  int64_t N1, N2, d, ok;
  int64_t w_sj, y_si;
};

template <typename T, typename TL>
NTK_KERNEL void ntk_reduce_kernel(Args<T> a) {
  constexpr int BI = TL::BI, BJ = TL::BJ, BOK = TL::BOK, BD = TL::BD;
  constexpr int TM = TL::TM, TJ = TL::TJ, TN = TL::TN;
  constexpr int LDA1 = TL::LDA1, LDA2 = TL::LDA2;

  NTK_DECLARE_SMEM(ntk_smem_raw, size_t(TL::kElems) * sizeof(T));
  T* const smem = reinterpret_cast<T*>(ntk_smem_raw);
  T* const sS = smem;                 // [BJ][LDA1]: s(i0 + ii, j0 + jj) at jj * LDA1 + ii
  T* const sA1 = smem + TL::kS;       // [BD][LDA1]: A1[i0 + ii, d0 + kk] at kk * LDA1 + ii
  T* const sA2 = sA1 + BD * LDA1;     // [BD][LDA2]: A2[j0 + jj, d0 + kk] at kk * LDA2 + jj
  T* const sW = smem + TL::kS;        // [BJ][BOK]:  W[j0 + jj, q0 + qq]  (aliases sA1/sA2)

  const T* NTK_RESTRICT A1 = a.A1;
  const T* NTK_RESTRICT A2 = a.A2;
  const T* NTK_RESTRICT W = a.W;

  const int tid = NTK_TID();
  const int tx = tid % kSide;
  const int ty = tid / kSide;
  const int64_t ncol = (a.ok + BOK - 1) / BOK;
  const int64_t bid = NTK_BID();
  const int64_t i0 = (bid / ncol) * BI;  // blocks of one row tile are adjacent (A1 reuse in L2)
  const int64_t q0 = (bid % ncol) * BOK;

  T acc[TM][TN];
#pragma unroll
  for (int m = 0; m < TM; ++m) {
#pragma unroll
    for (int n = 0; n < TN; ++n) acc[m][n] = T(0);
  }

  for (int64_t j0 = 0; j0 < a.N2; j0 += BJ) {
    // ---- 1. s tile: s(ii, jj) = A1[i0 + ii] . A2[j0 + jj], rows ty + 16 m, cols tx + 16 n ---
    T sacc[TM][TJ];
#pragma unroll
    for (int m = 0; m < TM; ++m) {
#pragma unroll
      for (int n = 0; n < TJ; ++n) sacc[m][n] = T(0);
    }
    for (int64_t d0 = 0; d0 < a.d; d0 += BD) {
      // coalesced global reads along d; transposed, padded stores (conflict-free)
      for (int idx = tid; idx < BI * BD; idx += kThreads) {
        const int ii = idx / BD, kk = idx % BD;
        const int64_t gi = i0 + ii, gk = d0 + kk;
        sA1[kk * LDA1 + ii] = (gi < a.N1 && gk < a.d) ? A1[gi * a.d + gk] : T(0);
      }
      for (int idx = tid; idx < BJ * BD; idx += kThreads) {
        const int jj = idx / BD, kk = idx % BD;
        const int64_t gj = j0 + jj, gk = d0 + kk;
        sA2[kk * LDA2 + jj] = (gj < a.N2 && gk < a.d) ? A2[gj * a.d + gk] : T(0);
      }
      NTK_SYNC();
#pragma unroll 4
      for (int kk = 0; kk < BD; ++kk) {
        T x[TM], y[TJ];
#pragma unroll
        for (int m = 0; m < TM; ++m) x[m] = sA1[kk * LDA1 + ty + kSide * m];
#pragma unroll
        for (int n = 0; n < TJ; ++n) y[n] = sA2[kk * LDA2 + tx + kSide * n];
#pragma unroll
        for (int m = 0; m < TM; ++m) {
#pragma unroll
          for (int n = 0; n < TJ; ++n) sacc[m][n] += x[m] * y[n];
        }
      }
      NTK_SYNC();  // sA1/sA2 are rewritten by the next chunk (or by sW below)
    }
#pragma unroll
    for (int m = 0; m < TM; ++m) {
#pragma unroll
      for (int n = 0; n < TJ; ++n) sS[(tx + kSide * n) * LDA1 + ty + kSide * m] = sacc[m][n];
    }

    // ---- 2. Y_tile += s_tile W_tile ---------------------------------------------------------
    // sW aliases sA1/sA2: every read of those ended at the last barrier of the d loop (or, when
    // d == 0, at the closing barrier of the previous j tile).
    for (int idx = tid; idx < BJ * BOK; idx += kThreads) {
      const int jj = idx / BOK, qq = idx % BOK;
      const int64_t gj = j0 + jj, gq = q0 + qq;
      sW[idx] = (gj < a.N2 && gq < a.ok) ? W[gj * a.w_sj + gq] : T(0);
    }
    NTK_SYNC();  // sS and sW complete
#pragma unroll 4
    for (int jj = 0; jj < BJ; ++jj) {
      T s[TM], w[TN];
#pragma unroll
      for (int m = 0; m < TM; ++m) s[m] = sS[jj * LDA1 + ty + kSide * m];
#pragma unroll
      for (int n = 0; n < TN; ++n) w[n] = sW[jj * BOK + tx + kSide * n];
#pragma unroll
      for (int m = 0; m < TM; ++m) {
#pragma unroll
        for (int n = 0; n < TN; ++n) acc[m][n] += s[m] * w[n];
      }
    }
    NTK_SYNC();  // sS and sW (= sA1/sA2) are rewritten by the next j tile
  }

  // ---- write Y once ------------------------------------------------------------------------
#pragma unroll
  for (int m = 0; m < TM; ++m) {
    const int64_t gi = i0 + ty + kSide * m;
    if (gi < a.N1) {
#pragma unroll
      for (int n = 0; n < TN; ++n) {
        const int64_t gq = q0 + tx + kSide * n;
        if (gq < a.ok) a.Y[gi * a.y_si + gq] = acc[m][n];
      }
    }
  }
}

// ---- host-side planning (plain C++, shared by the CUDA launcher and the emulator) -----------

enum class TileKind { Wide, Narrow };

// Narrow tiles (16 columns, 128 rows) when o*k fits in one of them, else wide ones.
inline TileKind pick_tile(int64_t ok) { return ok <= TileNarrow::BOK ? TileKind::Narrow
                                                                     : TileKind::Wide; }

// Number of blocks of the 1-D grid for tile TL: ceil(N1 / BI) * ceil(ok / BOK).
template <typename TL>
inline int64_t grid_size(int64_t N1, int64_t ok) {
  return ((N1 + TL::BI - 1) / TL::BI) * ((ok + TL::BOK - 1) / TL::BOK);
}

#if defined(__CUDACC__) && !defined(NTK_EMULATION)
template <typename T, typename TL>
cudaError_t launch_tile(const Args<T>& a, cudaStream_t stream) {
  const int64_t grid = grid_size<TL>(a.N1, a.ok);
  if (grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  ntk_reduce_kernel<T, TL><<<dim3(static_cast<unsigned int>(grid)), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

// Launch Y = (A1 A2^T) W for one layer on `stream` (Y is written; with N2 == 0 it is zeroed).
// Returns the launch's CUDA error; nothing is launched when N1 == 0 or ok == 0.
template <typename T>
cudaError_t launch_ntk_reduce(const Args<T>& a, cudaStream_t stream) {
  if (a.N1 == 0 || a.ok == 0) return cudaSuccess;
  return pick_tile(a.ok) == TileKind::Narrow ? launch_tile<T, TileNarrow>(a, stream)
                                             : launch_tile<T, TileWide>(a, stream);
}
#endif

}  // namespace ntk
