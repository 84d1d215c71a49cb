// Headers every capability translation unit includes *before* it switches the target ISA.
//
// Why: ce_avx2.cpp / ce_avx512.cpp enable AVX2 / AVX-512 with `#pragma GCC target` instead of
// per-file compiler flags (setuptools gives all sources one flag set). Every inline function that
// is defined after the pragma is compiled for that ISA. Functions outside at::vec's per-capability
// namespace (std::, c10::, at::native math helpers) would then exist as AVX-512 copies in one TU
// and baseline copies in another, and the linker keeps one of them at random -- an illegal
// instruction on an older CPU. Including those headers here, under the baseline ISA, makes their
// later inclusion a no-op, so only the at::vec code (namespaced by CPU_CAPABILITY) and our own
// kernels are compiled for the wider ISA. sleef.h is deliberately not here: it only declares the
// AVX variants when the ISA macros are on.
// Include this before defining CPU_CAPABILITY: c10::Half's conversions pick an AVX path when a
// CPU_CAPABILITY_* macro is set, and that path must not become the library-wide c10::Half (it
// would also fail to compile under the baseline ISA). Without the macros these headers are
// exactly what every ordinary extension translation unit sees.
#pragma once

#include <algorithm>
#include <array>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <ostream>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>

#include "kernels/params.h"
