# Tests of the cpu area.
