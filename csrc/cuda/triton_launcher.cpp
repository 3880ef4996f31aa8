// Driver-API launcher for ahead-of-time Triton cubins; see triton_launcher.h.
#include "cuda/triton_launcher.h"

#include <cuda.h>
#include <dlfcn.h>

#include <mutex>

namespace {

// The driver entry points this file uses, resolved once from libcuda.so.1.
struct Driver {
  CUresult (*init)(unsigned);
  CUresult (*module_load_data)(CUmodule*, const void*);
  CUresult (*module_get_function)(CUfunction*, CUmodule, const char*);
  CUresult (*module_unload)(CUmodule);
  CUresult (*func_set_attribute)(CUfunction, CUfunction_attribute, int);
  CUresult (*launch_kernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                            CUstream, void**, void**);
  CUresult (*get_error_string)(CUresult, const char**);
  int status = CBIR_TRITON_ENODRIVER;
};

template <typename F>
bool resolve(void* lib, const char* name, F* fn) {
  *fn = reinterpret_cast<F>(dlsym(lib, name));
  return *fn != nullptr;
}

const Driver& driver() {
  static Driver d;
  static std::once_flag once;
  std::call_once(once, [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) return;
    // None of these has a _v2 successor: the plain names are the current ABI.
    const bool ok = resolve(lib, "cuInit", &d.init) && resolve(lib, "cuModuleLoadData", &d.module_load_data) &&
                    resolve(lib, "cuModuleGetFunction", &d.module_get_function) &&
                    resolve(lib, "cuModuleUnload", &d.module_unload) &&
                    resolve(lib, "cuFuncSetAttribute", &d.func_set_attribute) &&
                    resolve(lib, "cuLaunchKernel", &d.launch_kernel) &&
                    resolve(lib, "cuGetErrorString", &d.get_error_string);
    if (!ok) return;
    const CUresult r = d.init(0);
    d.status = r == CUDA_SUCCESS ? CBIR_TRITON_OK : int(r);
  });
  return d;
}

}  // namespace

struct cbir_triton_kernel {
  CUmodule module;
  CUfunction function;
  unsigned block_x;
  unsigned shared_bytes;
  int scratch_params;
};

extern "C" int cbir_triton_driver_status(void) { return driver().status; }

extern "C" int cbir_triton_kernel_load(const void* cubin, size_t cubin_bytes, const char* name, int num_warps,
                                       int shared_bytes, size_t global_scratch_bytes, int scratch_params,
                                       cbir_triton_kernel** out) {
  if (!cubin || cubin_bytes < 4 || !name || !*name || !out || num_warps < 1 || num_warps > 32 || shared_bytes < 0 ||
      scratch_params < 0 || scratch_params > CBIR_TRITON_MAX_SCRATCH_PARAMS)
    return CBIR_TRITON_EINVAL;
  *out = nullptr;
  if (global_scratch_bytes != 0) return CBIR_TRITON_ESCRATCH;
  const Driver& d = driver();
  if (d.status != CBIR_TRITON_OK) return d.status;
  CUmodule module = nullptr;
  CUresult r = d.module_load_data(&module, cubin);
  if (r != CUDA_SUCCESS) return int(r);
  CUfunction fn = nullptr;
  r = d.module_get_function(&fn, module, name);
  if (r == CUDA_SUCCESS && shared_bytes > 48 * 1024)
    r = d.func_set_attribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_bytes);
  if (r != CUDA_SUCCESS) {
    d.module_unload(module);
    return int(r);
  }
  *out = new cbir_triton_kernel{module, fn, unsigned(num_warps) * 32u, unsigned(shared_bytes), scratch_params};
  return CBIR_TRITON_OK;
}

extern "C" int cbir_triton_kernel_launch(const cbir_triton_kernel* k, unsigned grid_x, unsigned grid_y,
                                         unsigned grid_z, void** args, int nargs, void* stream) {
  if (!k || (nargs > 0 && !args) || nargs < 0 || nargs > CBIR_TRITON_MAX_PARAMS || grid_x == 0 || grid_y == 0 ||
      grid_z == 0)
    return CBIR_TRITON_EINVAL;
  const Driver& d = driver();
  if (d.status != CBIR_TRITON_OK) return d.status;
  void* params[CBIR_TRITON_MAX_PARAMS + CBIR_TRITON_MAX_SCRATCH_PARAMS];
  for (int i = 0; i < nargs; ++i) params[i] = args[i];
  CUdeviceptr scratch[CBIR_TRITON_MAX_SCRATCH_PARAMS] = {};
  for (int i = 0; i < k->scratch_params; ++i) params[nargs + i] = &scratch[i];
  const CUresult r = d.launch_kernel(k->function, grid_x, grid_y, grid_z, k->block_x, 1, 1, k->shared_bytes,
                                     static_cast<CUstream>(stream), params, nullptr);
  return int(r);
}

extern "C" void cbir_triton_kernel_free(cbir_triton_kernel* k) {
  if (!k) return;
  const Driver& d = driver();
  if (d.status == CBIR_TRITON_OK) d.module_unload(k->module);
  delete k;
}

extern "C" const char* cbir_triton_error_string(int code) {
  switch (code) {
    case CBIR_TRITON_OK: return "no error";
    case CBIR_TRITON_EINVAL: return "invalid argument";
    case CBIR_TRITON_ENODRIVER: return "the CUDA driver (libcuda.so.1) is not available";
    case CBIR_TRITON_ESCRATCH:
      return "the kernel needs Triton global scratch memory, which this launcher does not provide";
    default: break;
  }
  const Driver& d = driver();
  const char* msg = nullptr;
  if (d.get_error_string && d.get_error_string(CUresult(code), &msg) == CUDA_SUCCESS && msg) return msg;
  return "unknown CUDA driver error";
}
