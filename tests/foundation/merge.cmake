# The merge algebra (include/dilated_attention/merge.hpp): log_add_exp, merge_weights and
# OnlineSoftmax against a direct fp64 softmax over the union of keys.
dilated_attention_add_test(merge_test SOURCES ${CMAKE_CURRENT_LIST_DIR}/merge_test.cpp
                           LABELS foundation)
target_include_directories(merge_test PRIVATE ${PROJECT_SOURCE_DIR}/tests)
