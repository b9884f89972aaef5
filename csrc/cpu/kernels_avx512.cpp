// The CPU kernels compiled for the avx512 instruction set (flags set in CMakeLists.txt).
#define MTLGRAD_ISA avx512
#include "kernels_impl.h"

MTLGRAD_DEFINE_KERNELS(avx512)
