# Tests of the foundation area: the pattern generator, the fp64 reference and input validation,
# each checked against brute force written independently in tests/support/.
dilated_attention_add_test(pattern_test SOURCES pattern_test.cpp LABELS foundation)
dilated_attention_add_test(reference_test SOURCES reference_test.cpp LABELS foundation)
dilated_attention_add_test(validation_test SOURCES validation_test.cpp LABELS foundation
                           LIBRARIES GTest::gmock)
dilated_attention_add_test(reference_backward_test SOURCES reference_backward_test.cpp
                           LABELS foundation LIBRARIES GTest::gmock)
# Checked views (View::extent); -Werror=missing-field-initializers keeps the four-value aggregate
# spelling `View<T>{ptr, bs, ss, hs}` warning-free.
dilated_attention_add_test(checked_view_test SOURCES checked_view_test.cpp LABELS foundation
                           LIBRARIES GTest::gmock)
target_compile_options(checked_view_test PRIVATE
  $<$<CXX_COMPILER_ID:GNU,Clang>:-Werror=missing-field-initializers>)
