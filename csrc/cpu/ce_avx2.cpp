// AVX2 + FMA copy of the CPU row loops (8 fp32 lanes). See vec_prelude.h for why the ISA is
// switched with a pragma after the common headers, and ce_kernel.h for the kernel.
#include "cpu/kernels.h"
#if defined(SFTCTL_CPU_X86_VARIANTS)
#include "cpu/vec_prelude.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "cpu/isa_avx2_macros.h"
#include "cpu/ce_kernel.h"
#pragma GCC pop_options
#endif
