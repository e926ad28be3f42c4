"""The CMake loading path of docs/torch.md as written: its ```cmake block is
tests/packaging/consumers/torch/CMakeLists.txt; that project (with the one-line source) is
configured against this build tree as the DilatedAttention prefix plus Torch's CMake package,
built in Release, and its shared library is loaded in a fresh Python process by docs/torch.md's
```python cmake block, checked there against the plain-PyTorch statement of docs/semantics.md.

    test_cmake_consumer.py BUILD_TREE WORK_DIR GENERATOR CXX_COMPILER [MAKE_PROGRAM]"""

import os
import shutil
import subprocess
import sys
import unittest

import torch

from doc_blocks import DOC, blocks
from torch_test_support import HERE, REPO

CONSUMER = os.path.join(REPO, "tests", "packaging", "consumers", "torch")
ARGS = sys.argv[1:]
sys.argv[1:] = []

CHECK = """
import semantics_reference as ref
q = torch.randn(1, 40, 4, 8, dtype=torch.double, requires_grad=True)
out, lse = torch.ops.dilated_attention.forward(q, q, q, [16, 32], [1, 2], True, "blocked", "mean")
expected, expected_lse = ref.reference(q, q, q, [16, 32], [1, 2], True, "blocked", "mean")
torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
grad, = torch.autograd.grad(out.sum(), q)
grad_ref, = torch.autograd.grad(expected.sum(), q)
torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-10)
print("cmake-built operators match docs/semantics.md")
"""


class CMakeConsumerTest(unittest.TestCase):
    def test_docs_cmake_project_builds_and_loads(self):
        build_tree, work, generator, cxx = ARGS[:4]
        listed = blocks("cmake")
        self.assertTrue(listed, f"{DOC}: no ```cmake block")
        with open(os.path.join(CONSUMER, "CMakeLists.txt")) as f:
            self.assertEqual(listed[0], f.read(),
                             f"{DOC}'s cmake block differs from {CONSUMER}/CMakeLists.txt")
        shutil.rmtree(work, ignore_errors=True)
        project = os.path.join(work, "my_ops")
        shutil.copytree(CONSUMER, project)
        options = [f"-DCMAKE_CXX_COMPILER={cxx}"]
        if len(ARGS) > 4 and ARGS[4]:
            options.append(f"-DCMAKE_MAKE_PROGRAM={ARGS[4]}")
        prefix = f"{build_tree};{torch.utils.cmake_prefix_path}"
        subprocess.run(["cmake", "-S", project, "-B", os.path.join(project, "build"), "-G",
                        generator, "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={prefix}",
                        *options], check=True)
        subprocess.run(["cmake", "--build", os.path.join(project, "build")], check=True)
        loader = blocks("python cmake")
        self.assertEqual(len(loader), 1, f"{DOC}: expected one ```python cmake block")
        script = f"import sys\nsys.path.insert(0, {HERE!r})\n" + loader[0] + CHECK
        result = subprocess.run([sys.executable, "-c", script], cwd=work, capture_output=True,
                                text=True)
        print(result.stdout, result.stderr)
        self.assertEqual(result.returncode, 0, result.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
