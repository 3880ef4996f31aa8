// Launches Triton kernels compiled ahead of time (cbir_engine/kernels/aot.py writes the cubins
// and a manifest) through the CUDA driver API, so the C++ executor runs them like its own
// kernels, on its streams and inside its CUDA graphs.
//
// The driver library (libcuda.so.1) is opened at run time with dlopen: a build with this file
// still loads and runs its CPU parts on a machine with no NVIDIA driver, where every call here
// returns CBIR_TRITON_ENODRIVER.
#pragma once

#include <cstddef>

#ifdef __cplusplus
extern "C" {
#endif

#define CBIR_TRITON_OK 0
#define CBIR_TRITON_EINVAL (-1)      // a null pointer, an empty cubin, a bad count or size
#define CBIR_TRITON_ENODRIVER (-2)   // libcuda.so.1 could not be opened or lacks an entry point
#define CBIR_TRITON_ESCRATCH (-3)    // the kernel needs Triton global scratch memory (not supported)
#define CBIR_TRITON_MAX_PARAMS 64
#define CBIR_TRITON_MAX_SCRATCH_PARAMS 4

typedef struct cbir_triton_kernel cbir_triton_kernel;

// 0 when the driver library loads and cuInit succeeds; else CBIR_TRITON_ENODRIVER or a CUresult.
int cbir_triton_driver_status(void);

// Loads `name` from a cubin image into the current context (the caller's, e.g. torch's primary
// context). num_warps, shared_bytes, global_scratch_bytes and scratch_params (how many scratch
// pointers this Triton version appends to the kernel's parameters) come from the manifest; shared
// memory over 48 KiB is opted into here. On success *out owns the module.
int cbir_triton_kernel_load(const void* cubin, size_t cubin_bytes, const char* name, int num_warps,
                            int shared_bytes, size_t global_scratch_bytes, int scratch_params,
                            cbir_triton_kernel** out);

// Launches on `stream` (a CUstream / cudaStream_t; null: the default stream). `args` holds
// `nargs` pointers to the kernel's own parameter values in manifest order (cuLaunchKernel's
// convention); the scratch pointers Triton appends are passed as null here.
int cbir_triton_kernel_launch(const cbir_triton_kernel* kernel, unsigned grid_x, unsigned grid_y, unsigned grid_z,
                              void** args, int nargs, void* stream);

void cbir_triton_kernel_free(cbir_triton_kernel* kernel);

// A readable message for a code returned above (driver codes are described by the driver).
const char* cbir_triton_error_string(int code);

#ifdef __cplusplus
}
#endif
