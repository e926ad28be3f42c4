# Tests of the ring area. Every ring test carries the label `ring`; the pattern-cache and
# in-process transport tests also carry `tsan` (CI reruns them under ThreadSanitizer), and the
# tests launched through mpiexec carry `mpi`.

dilated_attention_add_test(ring_forward_test SOURCES ring_forward_test.cpp LABELS ring)
dilated_attention_add_test(ring_schedule_test SOURCES ring_schedule_test.cpp LABELS ring)
dilated_attention_add_test(ring_pattern_cache_test SOURCES ring_pattern_cache_test.cpp LABELS "ring;tsan")
dilated_attention_add_test(ring_transport_test SOURCES ring_transport_test.cpp LABELS "ring;tsan")
