// Helpers shared by the torch-free tests of the emulated kernels (tests/native/test_*_emulated.cpp).
#pragma once

#include <cmath>
#include <cstddef>
#include <vector>

#include "simt/simt.cuh"

namespace native_testing {

// ||actual - expected|| / ||expected|| in float64 (the absolute difference when expected is zero); `actual` is
// anything indexable by position (a vector, a pointer into device memory).
template <typename Actual>
double relative_error(const Actual& actual, const std::vector<double>& expected) {
  double difference = 0, norm = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    difference += (double(actual[i]) - expected[i]) * (double(actual[i]) - expected[i]);
    norm += expected[i] * expected[i];
  }
  return norm > 0 ? std::sqrt(difference / norm) : std::sqrt(difference);
}

// `count` elements of the emulated device's memory (0xFF-filled, like memory nobody wrote), freed on scope exit.
template <typename T>
struct DeviceBuffer {
  T* data;
  explicit DeviceBuffer(size_t count) : data(electra_ext::emulated::device_alloc<T>(count > 0 ? count : 1)) {}
  ~DeviceBuffer() { electra_ext::emulated::device_free(data); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

}  // namespace native_testing
