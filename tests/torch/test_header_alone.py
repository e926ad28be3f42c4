"""packaging.header_alone for the Torch headers (tests/packaging lists them as skipped there: the
project's own build does not find Torch): each compiles on its own, included twice, with the
flags torch.utils.cpp_extension uses (-std=c++20, Torch's include paths). Syntax only.

    test_header_alone.py CXX_COMPILER"""

import glob
import os
import subprocess
import sys
import unittest

from torch.utils import cpp_extension

from torch_test_support import REPO

CXX = sys.argv[1] if len(sys.argv) > 1 else "c++"
sys.argv[1:] = []


class HeaderAloneTest(unittest.TestCase):
    def test_each_torch_header_alone_twice(self):
        include = os.path.join(REPO, "include")
        headers = sorted(os.path.relpath(p, include)
                         for p in glob.glob(os.path.join(include, "dilated_attention", "torch*")))
        self.assertGreaterEqual(len(headers), 2)
        flags = ["-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", f"-I{include}",
                 "-I/usr/include/eigen3"]
        flags += [f"-isystem{p}" for p in cpp_extension.include_paths()]
        for header in headers:
            with self.subTest(header=header):
                source = f"#include <{header}>\n#include <{header}>\n"
                subprocess.run([CXX, *flags, "-x", "c++", "-"], input=source, text=True,
                               check=True)


if __name__ == "__main__":
    unittest.main(verbosity=2)
