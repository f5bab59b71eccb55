// Runs the CUDA kernel of csrc/ntk_reduce_kernel.cuh on the CPU under an emulation of the CUDA
// execution model -- one std::thread per CUDA thread, std::barrier for __syncthreads(), blocks
// one after another -- and checks it against a plain float64 loop. Used by
// tests/test_kernel_space.py so that the kernel's indexing, tiling, chunking and barriers are
// tested on machines without a GPU. Build: g++ -std=c++20 -O1 -pthread -I csrc THIS -o emu
// Exit status 0 when every case passes; one line per case on stdout.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

static thread_local int emu_tid = 0;
static int64_t emu_bid = 0;
static std::barrier<>* emu_barrier = nullptr;
static std::vector<unsigned char> emu_smem;

#define NTK_EMULATION 1
#define NTK_TID() (emu_tid)
#define NTK_BID() (emu_bid)
#define NTK_SYNC() (emu_barrier->arrive_and_wait())
#define NTK_DECLARE_SMEM(name) unsigned char* name = emu_smem.data()
#include "ntk_reduce_kernel.cuh"

template <typename T, int NJ>
static void emu_run(const ntk::Args<T>& a, const ntk::Plan& plan, int64_t grid) {
  for (int64_t b = 0; b < grid; ++b) {
    // Garbage (0xFF bytes: NaN) in shared memory catches reads of unstaged data.
    emu_smem.assign(plan.smem_bytes, 0xFF);
    emu_bid = b;
    std::barrier<> bar(ntk::kThreads);
    emu_barrier = &bar;
    std::vector<std::thread> threads;
    threads.reserve(ntk::kThreads);
    for (int t = 0; t < ntk::kThreads; ++t) {
      threads.emplace_back([&a, &plan, t] {
        emu_tid = t;
        ntk::ntk_reduce_kernel<T, NJ>(a, plan.TI);
      });
    }
    for (auto& th : threads) th.join();
  }
}

struct Case {
  int64_t N1, N2, d, o, C, k;
  bool dbl;
  size_t smem_limit;
  int force_nj;  // 0: planner's choice
};

template <typename T>
static bool run_case(const Case& cs, std::mt19937_64& rng) {
  std::normal_distribution<double> nd(0.0, 1.0);
  auto fill = [&](std::vector<T>& v, size_t n) {
    v.resize(n);
    for (auto& x : v) x = T(nd(rng));
  };
  std::vector<T> A1, G1, A2, W, out0;
  fill(A1, cs.N1 * cs.d);
  fill(G1, cs.N1 * cs.C * cs.o);
  fill(A2, cs.N2 * cs.d);
  fill(W, cs.N2 * cs.o * cs.k);
  fill(out0, cs.N1 * cs.C * cs.k);  // the kernel accumulates: start from nonzero values
  std::vector<T> out = out0;

  ntk::Args<T> a{A1.data(), G1.data(), A2.data(), W.data(), out.data(),
                 cs.N1, cs.N2, cs.d, cs.o, cs.C, cs.k,
                 cs.C * cs.o, cs.o, cs.o * cs.k, cs.k, cs.C * cs.k, cs.k};
  int launches = 0;
  ntk::Plan used;
  const bool ok = ntk::for_each_launch(a, cs.smem_limit, [&](const ntk::Args<T>& la,
                                                              const ntk::Plan& plan, int64_t grid) {
    ntk::Plan p = plan;
    if (cs.force_nj != 0) {
      p.NJ = cs.force_nj;
      p.TI = ntk::tile_i(p.NJ, la.C, la.k, sizeof(T), cs.smem_limit);
      grid = (la.N1 + p.TI - 1) / p.TI;
      p.smem_bytes = size_t(ntk::smem_elems(p.TI, plan.c_chunk, plan.k_chunk)) * sizeof(T);
    }
    used = p;
    ++launches;
    switch (p.NJ) {
      case 1: emu_run<T, 1>(la, p, grid); break;
      case 4: emu_run<T, 4>(la, p, grid); break;
      default: emu_run<T, 16>(la, p, grid); break;
    }
  });
  if (!ok) {
    std::printf("FAIL no plan N1=%ld\n", long(cs.N1));
    return false;
  }
  double max_err = 0.0, max_ref = 0.0;
  for (int64_t i = 0; i < cs.N1; ++i) {
    for (int64_t c = 0; c < cs.C; ++c) {
      for (int64_t r = 0; r < cs.k; ++r) {
        double ref = double(out0[(i * cs.C + c) * cs.k + r]);
        for (int64_t j = 0; j < cs.N2; ++j) {
          double s = 0.0, p = 0.0;
          for (int64_t q = 0; q < cs.d; ++q) s += double(A1[i * cs.d + q]) * double(A2[j * cs.d + q]);
          for (int64_t q = 0; q < cs.o; ++q)
            p += double(G1[(i * cs.C + c) * cs.o + q]) * double(W[(j * cs.o + q) * cs.k + r]);
          ref += s * p;
        }
        const double got = double(out[(i * cs.C + c) * cs.k + r]);
        const double err = std::fabs(got - ref);
        if (!(err <= max_err)) max_err = err;  // NaN propagates
        if (std::fabs(ref) > max_ref) max_ref = std::fabs(ref);
      }
    }
  }
  const double rel = max_err / (max_ref > 0 ? max_ref : 1.0);
  const double tol = cs.dbl ? 1e-12 : 2e-5;
  const bool pass = rel <= tol;  // false for NaN
  std::printf("%s %s N1=%ld N2=%ld d=%ld o=%ld C=%ld k=%ld NJ=%d TI=%d chunks(c=%ld,k=%ld) "
              "launches=%d rel_err=%.3e\n",
              pass ? "OK  " : "FAIL", cs.dbl ? "f64" : "f32", long(cs.N1), long(cs.N2),
              long(cs.d), long(cs.o), long(cs.C), long(cs.k), used.NJ, used.TI,
              long(used.c_chunk), long(used.k_chunk), launches, rel);
  return pass;
}

int main() {
  std::mt19937_64 rng(1234);
  const size_t L = ntk::kDefaultSmemLimit;
  const Case cases[] = {
      // N1, N2, d, o, C, k, double, smem, force NJ
      {37, 45, 7, 70, 1, 1, false, L, 0},    // several i-blocks? (TI=32), 3 j-tiles, o > chunk
      {37, 45, 70, 5, 3, 4, true, L, 0},     // d > chunk, ragged everything
      {33, 17, 40, 33, 10, 1, false, L, 0},  // MLP-like C
      {9, 20, 5, 6, 3, 4, true, L, 1},       // every NJ variant
      {9, 20, 5, 6, 3, 4, true, L, 4},
      {9, 20, 5, 6, 3, 4, false, L, 16},
      {5, 19, 3, 4, 40, 40, false, L, 0},    // C*k > element budget: chunked over r (and c)
      {6, 18, 3, 35, 7, 9, true, 16384, 0},  // small smem limit: forces chunking over r
      {1, 1, 1, 1, 1, 1, true, L, 0},
      {4, 5, 2, 3, 300, 1, false, 24 * 1024, 0},  // C alone too large: chunked over c
      {3, 0, 4, 4, 2, 2, true, L, 0},        // N2 = 0: out unchanged
  };
  bool all = true;
  for (const Case& cs : cases) {
    all = (cs.dbl ? run_case<double>(cs, rng) : run_case<float>(cs, rng)) && all;
  }
  std::printf(all ? "ALL OK\n" : "SOME FAILED\n");
  return all ? 0 : 1;
}
