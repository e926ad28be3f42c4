# Tests of the cuda area.
