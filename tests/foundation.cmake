# Tests of the foundation area: the pattern generator, the fp64 reference and input validation,
# each checked against brute force written independently in tests/support/.
dilated_attention_add_test(pattern_test SOURCES pattern_test.cpp LABELS foundation)
dilated_attention_add_test(reference_test SOURCES reference_test.cpp LABELS foundation)
dilated_attention_add_test(validation_test SOURCES validation_test.cpp LABELS foundation
                           LIBRARIES GTest::gmock)
dilated_attention_add_test(reference_backward_test SOURCES reference_backward_test.cpp
                           LABELS foundation LIBRARIES GTest::gmock)
