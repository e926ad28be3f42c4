"""CTest fixture torch.build_extension: compiles the operators once into $TORCH_EXTENSIONS_DIR
(the build tree's cache) with torch.utils.cpp_extension.load, as docs/torch.md does; the other
torch tests load them from that cache without compiling."""

import time

import torch_test_support

started = time.time()
ops = torch_test_support.ops()
print(f"torch.ops.dilated_attention ready in {time.time() - started:.1f} s: {ops.forward}, {ops.backward}")
