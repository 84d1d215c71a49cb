// Baseline-ISA copy of the CPU row loops (generic at::vec, 8 fp32 lanes). See ce_kernel.h.
#include "cpu/vec_prelude.h"
#include "cpu/kernels.h"
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "cpu/ce_kernel.h"
