// The CPU kernels compiled for the avx2 instruction set (flags set in CMakeLists.txt).
#define MTLGRAD_ISA avx2
#include "kernels_impl.h"

MTLGRAD_DEFINE_KERNELS(avx2)
