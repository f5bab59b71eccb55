// Runs the CUDA kernel of csrc/ntk_reduce_kernel.cuh on the CPU under an emulation of the CUDA
// execution model -- one std::thread per CUDA thread, std::barrier for __syncthreads(), blocks
// one after another -- and checks it against a plain float64 loop. Used by
// tests/test_kernel_space.py so that the kernel's indexing, tiling, ragged edges and barriers
// are tested on machines without a GPU. Build: g++ -std=c++20 -O1 -pthread -I csrc THIS -o emu
// Exit status 0 when every case passes; one line per case on stdout.
//
// Each case has several layers; per layer the kernel computes Y_l = (A1_l A2_l^T) W_l, and the
// harness emulates the glue of ntk_reduce_cuda.cu (out += G1_l @ Y_l, a plain loop), then
// compares out with the per-pair reference
//   out[i,c,r] = sum_l sum_j (A1_l[i].A2_l[j]) (G1_l[i,c,:].W_l[j,:,r]).
// Every case runs with both tile shapes (wide and narrow), whatever the planner would pick.
// Y lives in a buffer with guard columns (row stride > o*k) and guard rows, filled with a
// sentinel, to check that the kernel writes every entry of Y and nothing else; shared memory
// is filled with 0xFF bytes (NaN) per block to catch reads of unstaged data.
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
#define NTK_DECLARE_SMEM(name, bytes) unsigned char* name = emu_smem.data()
#include "ntk_reduce_kernel.cuh"

template <typename T, typename TL>
static void emu_run(const ntk::Args<T>& a) {
  if (a.N1 == 0 || a.ok == 0) return;  // as launch_ntk_reduce
  const int64_t grid = ntk::grid_size<TL>(a.N1, a.ok);
  for (int64_t b = 0; b < grid; ++b) {
    emu_smem.assign(TL::template smem_bytes<T>(), 0xFF);
    emu_bid = b;
    std::barrier<> bar(ntk::kThreads);
    emu_barrier = &bar;
    std::vector<std::thread> threads;
    threads.reserve(ntk::kThreads);
    for (int t = 0; t < ntk::kThreads; ++t) {
      threads.emplace_back([&a, t] {
        emu_tid = t;
        ntk::ntk_reduce_kernel<T, TL>(a);
      });
    }
    for (auto& th : threads) th.join();
  }
}

struct Layer {
  int64_t d, o;
};

struct Case {
  int64_t N1, N2, C, k;
  std::vector<Layer> layers;
  bool dbl;
};

constexpr int64_t kGuardCols = 3, kGuardRows = 2;
constexpr double kSentinel = 12345.0;

template <typename T, typename TL>
static bool run_case(const Case& cs, const char* tile_name, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  auto fill = [&](std::vector<T>& v, size_t n) {
    v.resize(n);
    for (auto& x : v) x = T(nd(rng));
  };
  const int64_t N1 = cs.N1, N2 = cs.N2, C = cs.C, k = cs.k;
  std::vector<double> out(N1 * C * k, 0.0), ref(N1 * C * k, 0.0);
  bool guards_ok = true;
  for (const Layer& ly : cs.layers) {
    const int64_t d = ly.d, o = ly.o, ok = o * k;
    std::vector<T> A1, G1, A2, W;
    fill(A1, N1 * d);
    fill(G1, N1 * C * o);
    fill(A2, N2 * d);
    fill(W, N2 * ok);
    // Y with guard columns and rows, all sentinel
    const int64_t y_si = ok + kGuardCols;
    std::vector<T> Y((N1 + kGuardRows) * y_si, T(kSentinel));
    ntk::Args<T> a{A1.data(), A2.data(), W.data(), Y.data(), N1, N2, d, ok, ok, y_si};
    emu_run<T, TL>(a);
    for (int64_t i = 0; i < N1 + kGuardRows; ++i) {
      for (int64_t q = 0; q < y_si; ++q) {
        const bool inside = i < N1 && q < ok;
        const bool sentinel = Y[i * y_si + q] == T(kSentinel);
        if (inside == sentinel) guards_ok = false;  // unwritten inside, or written outside
      }
    }
    // the glue: out[i, c, r] += sum_q G1[i, c, q] Y[i, q, r]
    for (int64_t i = 0; i < N1; ++i)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t r = 0; r < k; ++r) {
          double v = 0.0;
          for (int64_t q = 0; q < o; ++q)
            v += double(G1[(i * C + c) * o + q]) * double(Y[i * y_si + q * k + r]);
          out[(i * C + c) * k + r] += v;
        }
    // the per-pair reference
    for (int64_t i = 0; i < N1; ++i)
      for (int64_t j = 0; j < N2; ++j) {
        double s = 0.0;
        for (int64_t q = 0; q < d; ++q) s += double(A1[i * d + q]) * double(A2[j * d + q]);
        for (int64_t c = 0; c < C; ++c)
          for (int64_t r = 0; r < k; ++r) {
            double p = 0.0;
            for (int64_t q = 0; q < o; ++q)
              p += double(G1[(i * C + c) * o + q]) * double(W[(j * o + q) * k + r]);
            ref[(i * C + c) * k + r] += s * p;
          }
      }
  }
  double max_err = 0.0, max_ref = 0.0;
  for (size_t e = 0; e < out.size(); ++e) {
    const double err = std::fabs(out[e] - ref[e]);
    if (!(err <= max_err)) max_err = err;  // NaN propagates
    if (std::fabs(ref[e]) > max_ref) max_ref = std::fabs(ref[e]);
  }
  const double rel = max_err / (max_ref > 0 ? max_ref : 1.0);
  const double tol = cs.dbl ? 1e-12 : 2e-5;
  const bool pass = guards_ok && rel <= tol;  // false for NaN
  char layers[128] = "";
  size_t pos = 0;
  for (const Layer& ly : cs.layers)
    pos += std::snprintf(layers + pos, sizeof(layers) - pos, "%s(d=%ld,o=%ld)", pos ? "," : "",
                         long(ly.d), long(ly.o));
  std::printf("%s %s %-6s N1=%ld N2=%ld C=%ld k=%ld layers=%s guards=%s rel_err=%.3e\n",
              pass ? "OK  " : "FAIL", cs.dbl ? "f64" : "f32", tile_name, long(N1), long(N2),
              long(C), long(k), layers, guards_ok ? "ok" : "BAD", rel);
  return pass;
}

template <typename T>
static bool run_both(const Case& cs, uint64_t seed) {
  const bool w = run_case<T, ntk::TileWide>(cs, "wide", seed);
  const bool n = run_case<T, ntk::TileNarrow>(cs, "narrow", seed);
  return w && n;
}

int main() {
  // Tiles: wide BI=64 BJ=32 BOK=64 BD=32; narrow BI=128 BJ=16 BOK=16 BD=16.
  const Case cases[] = {
      // N1, N2, C, k, layers {d, o}, double
      // ragged everything, several row / column / j tiles and d chunks, 3 layers
      {150, 70, 3, 4, {{45, 23}, {7, 5}, {33, 1}}, true},
      {150, 70, 3, 4, {{45, 23}, {7, 5}, {33, 1}}, false},
      {131, 37, 1, 1, {{70, 67}, {3, 10}}, false},   // C = 1, k = 1, o*k = 67 (> 64)
      {131, 37, 1, 1, {{70, 67}, {3, 10}}, true},
      {65, 33, 3, 1, {{17, 17}, {64, 16}}, true},    // one past a tile edge; o*k = 16 exactly
      {64, 32, 1, 4, {{32, 16}, {16, 4}}, false},    // exact multiples of the wide tile
      {5, 49, 10, 1, {{1, 3}, {2, 20}}, false},      // MLP-like C, tiny N1 and d
      {1, 1, 1, 1, {{1, 1}}, true},
      {3, 0, 2, 2, {{4, 4}, {2, 3}}, true},          // N2 = 0: Y zeroed, out 0
      {4, 6, 2, 2, {{0, 3}}, true},                  // d = 0: s = 0
      {4, 6, 2, 1, {{3, 0}, {2, 2}}, false},         // o = 0 layer: nothing launched for it
  };
  bool all = true;
  uint64_t seed = 1234;
  for (const Case& cs : cases) {
    all = (cs.dbl ? run_both<double>(cs, seed) : run_both<float>(cs, seed)) && all;
    ++seed;
  }
  std::printf(all ? "ALL OK\n" : "SOME FAILED\n");
  return all ? 0 : 1;
}
