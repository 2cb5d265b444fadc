// Shared by the host emulations of the CUDA kernels (tests/*_emulation.cpp): the Block policy that runs a block
// phase for every thread id in a fresh random order (so no result may depend on the order of the shared-memory
// atomics; the device's DeviceBlock is in csrc/kernels/cuda/host_device.h), and reading the inputs from stdin.
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

struct HostBlock {
  std::mt19937* rng;
  int threads;
  std::vector<int> order = std::vector<int>(threads);
  template <class F>
  void each(F&& f) {
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), *rng);
    for (int t : order) f(t);
  }
  template <class F>
  bool each_or(F&& f) {
    bool any = false;
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), *rng);
    for (int t : order) any = f(t) || any;  // every thread runs its phase
    return any;
  }
  template <class T>
  T atomic_add(T* p, T v) {
    const T old = *p;
    *p += v;
    return old;
  }
  template <class T>
  T load(const T* p) {
    return *p;
  }
  unsigned int arrive(unsigned int* p) { return (*p)++; }
};

// n values of T from stdin; exits with status 3 when the input is short.
template <class T>
std::vector<T> read_input(size_t n) {
  std::vector<T> v(n);
  if (n > 0 && std::fread(v.data(), sizeof(T), n, stdin) != n) {
    std::fprintf(stderr, "short input\n");
    std::exit(3);
  }
  return v;
}
