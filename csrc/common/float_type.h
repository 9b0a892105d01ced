// The floating-point element types a torch-free launcher can be handed (the glue maps at::ScalarType to these).
#pragma once

namespace electra_ext {

enum class FloatType { kFloat32, kFloat16, kBFloat16 };

}  // namespace electra_ext
