// AVX-512 (F/BW/VL/DQ) copy of the CPU row loops (16 fp32 lanes). See vec_prelude.h for why the
// ISA is switched with a pragma after the common headers, and ce_kernel.h for the kernel.
#include "cpu/kernels.h"
#if defined(SFTCTL_CPU_X86_VARIANTS)
#include "cpu/vec_prelude.h"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq")
#include "cpu/isa_avx2_macros.h"
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#include "cpu/ce_kernel.h"
#pragma GCC pop_options
#endif
