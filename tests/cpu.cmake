# Tests of the cpu area: the attend primitive and the threaded forward kernel, against the fp64
# reference and brute force. Small shapes, so that Debug and sanitizer builds stay quick.
dilated_attention_add_test(cpu_attend_test SOURCES cpu_attend_test.cpp LABELS cpu)
dilated_attention_add_test(cpu_forward_test SOURCES cpu_forward_test.cpp LABELS "cpu;tsan")
dilated_attention_add_test(cpu_threads_test SOURCES cpu_threads_test.cpp LABELS "cpu;tsan")
# The backward: against reference::backward, determinism across threads (also under TSan), a
# 128 KiB-stack thread, one test per bad input.
dilated_attention_add_test(cpu_backward_test SOURCES cpu_backward_test.cpp LABELS "cpu;tsan")
