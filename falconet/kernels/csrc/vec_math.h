// Small math shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace falconet {

// exp(x) over float32's normal range (arguments clamped to [-87, 88]). Cody-Waite range
// reduction and a degree-6 polynomial, about 2 ulp; written so the compiler vectorises it,
// which it does not do for std::exp here.
inline float exp_clamped(float x) {
  const float y = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::nearbyint(y * 1.44269504088896341f);
  float r = y - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.3981999507e-03f;
  p = p * r + 8.3334519073e-03f;
  p = p * r + 4.1665795894e-02f;
  p = p * r + 1.6666665459e-01f;
  p = p * r + 5.0000001201e-01f;
  p = p * r * r + r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(float));
  return p * scale;
}

// exp(x) for x <= 0 (scores minus their running max), and exactly 0 below -87 so masked (-inf)
// scores drop out.
inline float exp_nonpositive(float x) { return x < -87.0f ? 0.0f : exp_clamped(x); }

}  // namespace falconet
