// ISA macros of the AVX2 level (AVX, AVX2, FMA, F16C, BMI, BMI2, LZCNT, POPCNT), for the
// capability translation units that switch the ISA with `#pragma GCC target`.
//
// g++ lexes the whole file before it applies the pragma, so unlike gcc it does not turn on the
// ISA macros that sleef.h and the at::vec headers test; define them to match the pragma.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __BMI__
#define __BMI__ 1
#endif
#ifndef __BMI2__
#define __BMI2__ 1
#endif
#ifndef __LZCNT__
#define __LZCNT__ 1
#endif
#ifndef __POPCNT__
#define __POPCNT__ 1
#endif
