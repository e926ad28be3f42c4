# Tests of the ring area.
