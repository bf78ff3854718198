// ATE_FAST_VECTOR_CLONES: GCC's target_clones on x86-64 Linux, so that one build holds an
// AVX-512, an AVX2 and a baseline copy of a loop and the CPU picks at load time (every
// machine one wheel serves); nothing elsewhere.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define ATE_FAST_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ATE_FAST_VECTOR_CLONES
#endif
