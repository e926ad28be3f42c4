#pragma once
// The CPU umbrella header (docs/semantics.md "Entry points"): the contract's types and validation, the pattern generator,
// the merge algebra, the fp64 reference, and the fast threaded CPU forward and backward. Needs only the C++17
// standard library, Eigen 3.4 and threads.

#include "config.hpp"
#include "arguments.hpp"
#include "sequences.hpp"
#include "merge.hpp"
#include "pattern.hpp"
#include "reference.hpp"
#include "cpu/attend.hpp"
#include "cpu/threads.hpp"
#include "cpu/forward.hpp"
#include "cpu/attend_backward.hpp"
#include "cpu/backward_units.hpp"
#include "cpu/backward.hpp"
