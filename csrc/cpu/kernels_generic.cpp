// The CPU kernels compiled for the generic instruction set (flags set in CMakeLists.txt).
#define MTLGRAD_ISA generic
#include "kernels_impl.h"

MTLGRAD_DEFINE_KERNELS(generic)
