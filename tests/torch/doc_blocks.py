"""The fenced blocks of docs/torch.md, by info string: ```python blocks run by test_docs.py,
```python cmake (the CMake path's Python side) and ```cmake by test_cmake_consumer.py."""

import os
import re

from torch_test_support import REPO

DOC = os.path.join(REPO, "docs", "torch.md")


def blocks(info):
    with open(DOC) as f:
        text = f.read()
    return [m.group(2) for m in re.finditer(r"^```([^\n]*)\n(.*?)^```\s*$", text, re.S | re.M)
            if m.group(1).strip() == info]
