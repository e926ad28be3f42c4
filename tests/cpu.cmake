# Tests of the cpu area: the attend primitive and the threaded forward kernel, against the fp64
# reference and brute force. Small shapes, so that Debug and sanitizer builds stay quick.
dilated_attention_add_test(cpu_attend_test SOURCES cpu_attend_test.cpp LABELS cpu)
dilated_attention_add_test(cpu_forward_test SOURCES cpu_forward_test.cpp LABELS "cpu;tsan")
dilated_attention_add_test(cpu_threads_test SOURCES cpu_threads_test.cpp LABELS "cpu;tsan")
# The forward suite once more per instruction-set path, forced by DILATED_ATTENTION_CPU_ISA;
# skipped (not failed) where this CPU or build lacks the path.
foreach(isa generic avx2 avx512 neon)
  add_test(NAME cpu_forward_test.isa.${isa} COMMAND cpu_forward_test)
  set_tests_properties(cpu_forward_test.isa.${isa} PROPERTIES
    ENVIRONMENT DILATED_ATTENTION_CPU_ISA=${isa} LABELS cpu SKIP_REGULAR_EXPRESSION "isa-unsupported")
endforeach()
