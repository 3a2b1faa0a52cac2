// The compiled module: the DDP comm hook (_ddp_hook.cpp) and the accumulation
// hook (_accumulate.cpp). Built by _native.py.

#include <torch/extension.h>

namespace largebatch {
void bind_ddp_hook(py::module& m);
void bind_accumulation(py::module& m);
}  // namespace largebatch

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  largebatch::bind_ddp_hook(m);
  largebatch::bind_accumulation(m);
}
