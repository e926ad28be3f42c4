"""docs/torch.md as written: every ```python block, in order, in one process, from the
repository root (the cpp_extension.load path; the extension comes from the build tree's cache,
which the torch.build_extension fixture filled with the same call)."""

import os
import unittest

from doc_blocks import DOC, blocks
from torch_test_support import REPO


class DocsTest(unittest.TestCase):
    def test_python_blocks_run_as_written(self):
        code = blocks("python")
        self.assertGreaterEqual(len(code), 4, f"{DOC}: expected the python examples")
        os.chdir(REPO)
        namespace = {"__name__": "__docs__"}
        for number, block in enumerate(code, 1):
            with self.subTest(block=number):
                exec(compile(block, f"{DOC} python block {number}", "exec"), namespace)


if __name__ == "__main__":
    unittest.main(verbosity=2)
