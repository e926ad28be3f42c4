#pragma once
// How the ranks of one ring call agree (docs/semantics.md "Bad input": bad input raises before any output
// is touched, here on every rank). One call is:
//   1. each rank validates its own input and describes the call (config, global shape, storage
//      type, options that change the result) in a fixed-size CallRecord;
//   2. one all_gather of those records, before any K/V row moves. A rank whose input is invalid
//      raises its own std::invalid_argument; every other rank raises PeerFailure naming it and
//      its reason. A rank whose description differs from rank 0's raises std::invalid_argument
//      naming the parameter; the ranks that agree with rank 0 raise PeerFailure naming it;
//   3. the body (the ring's transfers and compute). A rank that fails tells the others
//      (notify_failure), so their waits raise PeerFailure instead of waiting for its messages;
//   4. a second all_gather of each rank's verdict: a rank that finished its own part still
//      raises when another failed, so either every rank returns or every rank raises;
//   5. commit (write the output), only when every rank succeeded.
// No message of a refused call is ever posted; messages of a failed call are cancelled or parked
// by the driver and carry that call's tags only (transport.hpp), so the next call is clean.

#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../../config.hpp"
#include "../transport/transport.hpp"

namespace dilated_attention::ring {

struct CallRecord {
  static constexpr int num_fields = 14;
  static constexpr int storage_field = 11;  // fields[storage_field]: the storage type T
  std::int64_t fields[num_fields];
  std::int32_t status;  // CallStatus
  std::int32_t origin;  // the rank whose failure this one follows from, or -1
  char reason[232];
};
static_assert(std::is_trivially_copyable_v<CallRecord>);

enum CallStatus : std::int32_t {
  call_ok = 0,
  call_refused = 1,
  call_failed = 2,
  call_knock_on = 3
};

// Which collective the ranks are in: a rank calling ring::forward while another calls
// ring::backward is refused like any other mismatch.
enum class CallOperation : std::int64_t { forward = 0, backward = 1 };

namespace detail {

inline const char* call_field_name(int field) {
  static const char* const names[CallRecord::num_fields] = {
      "shape.batch",           "shape.seq_len",
      "shape.num_heads",       "shape.num_kv_heads",
      "shape.head_dim",        "config.segment_lengths",
      "config.dilation_rates", "config.causal",
      "config.offsets",        "config.mixing",
      "config.scale",          "the storage type T",
      "options.layout",        "operation (0 forward, 1 backward)"};
  return names[field];
}
// Fields compared by hash only (lists); the message says "differ" without values.
inline bool call_field_is_hash(int field) { return field == 5 || field == 6; }

inline std::int64_t hash_list(const std::vector<std::int64_t>& values) {
  std::uint64_t h = 1469598103934665603ull;
  const auto mix = [&h](std::uint64_t value) {
    for (int byte = 0; byte < 8; ++byte) {
      h ^= (value >> (8 * byte)) & 0xffu;
      h *= 1099511628211ull;
    }
  };
  mix(values.size());
  for (const std::int64_t value : values) mix(static_cast<std::uint64_t>(value));
  return static_cast<std::int64_t>(h);
}

inline void set_reason(CallRecord& record, const std::string& reason) {
  std::memset(record.reason, 0, sizeof(record.reason));
  std::strncpy(record.reason, reason.c_str(), sizeof(record.reason) - 1);
}
inline std::string reason_of(const CallRecord& record) {
  return std::string(record.reason, strnlen(record.reason, sizeof(record.reason)));
}

}  // namespace detail

// The description every rank must share. `layout` is the numeric value of Options::layout.
template <class T>
CallRecord describe_call(const Config& config, const Shape& shape, std::int64_t layout,
                         CallOperation operation = CallOperation::forward) {
  CallRecord record{};
  std::int64_t scale_bits = 0;
  static_assert(sizeof(scale_bits) == sizeof(config.scale));
  std::memcpy(&scale_bits, &config.scale, sizeof(scale_bits));
  const std::int64_t values[CallRecord::num_fields] = {
      shape.batch,
      shape.seq_len,
      shape.num_heads,
      shape.num_kv_heads,
      shape.head_dim,
      detail::hash_list(config.segment_lengths),
      detail::hash_list(config.dilation_rates),
      config.causal ? 1 : 0,
      static_cast<std::int64_t>(config.offsets),
      static_cast<std::int64_t>(config.mixing),
      scale_bits,
      static_cast<std::int64_t>(sizeof(T)) * 1000 + std::numeric_limits<T>::digits,
      layout,
      static_cast<std::int64_t>(operation)};
  std::memcpy(record.fields, values, sizeof(values));
  record.status = call_ok;
  record.origin = -1;
  return record;
}

namespace detail {

// Step 2's verdict for this rank: returns when every rank may go on, else throws.
inline void check_agreement(const std::vector<CallRecord>& all, int me) {
  for (std::size_t q = 0; q < all.size(); ++q)
    if (all[q].status == call_refused && static_cast<int>(q) != me)
      throw PeerFailure(static_cast<int>(q), "dilated_attention: rank " + std::to_string(q) +
                                                 " refused the ring call: " + reason_of(all[q]));
  const auto first_difference = [&](const CallRecord& a) {
    for (int f = 0; f < CallRecord::num_fields; ++f)
      if (a.fields[f] != all[0].fields[f]) return f;
    return -1;
  };
  const int mine = first_difference(all[static_cast<std::size_t>(me)]);
  if (mine >= 0) {
    const std::string name = call_field_name(mine);
    if (call_field_is_hash(mine))
      dilated_attention::detail::reject(
          name, " differ between rank ", me,
          " and rank 0: every rank "
          "of a ring call must pass the same config, shape, type and layout");
    dilated_attention::detail::reject(name, " = ", all[static_cast<std::size_t>(me)].fields[mine],
                                      " on rank ", me, " but ", all[0].fields[mine],
                                      " on rank 0: every rank of a ring call must pass the same "
                                      "config, shape, type and layout");
  }
  for (std::size_t q = 1; q < all.size(); ++q) {
    const int f = first_difference(all[q]);
    if (f >= 0)
      throw PeerFailure(static_cast<int>(q), "dilated_attention: rank " + std::to_string(q) +
                                                 " refused the ring call: its " +
                                                 call_field_name(f) + " differs from rank 0's");
  }
}

// Ends the transport's call on every path.
struct CallScope {
  Transport& transport;
  ~CallScope() { transport.end_call(); }
};

}  // namespace detail

// Runs one ring call (steps 1-5 above). validate_local() throws std::invalid_argument for this
// rank's bad input; body() moves and computes; commit() writes the output.
template <class Validate, class Body, class Commit>
void run_agreed_call(Transport& transport, Transport::Duration timeout, CallRecord mine,
                     Validate&& validate_local, Body&& body, Commit&& commit) {
  std::exception_ptr refusal;
  try {
    validate_local();
  } catch (const std::exception& e) {
    mine.status = call_refused;
    detail::set_reason(mine, e.what());
    refusal = std::current_exception();
  }
  transport.begin_call(timeout);
  detail::CallScope scope{transport};
  const int me = transport.rank();
  std::vector<CallRecord> all(static_cast<std::size_t>(transport.size()));
  transport.all_gather(&mine, all.data(), sizeof(CallRecord));
  if (refusal) std::rethrow_exception(refusal);
  detail::check_agreement(all, me);

  CallRecord verdict = mine;
  std::exception_ptr failure;
  try {
    body();
  } catch (const PeerFailure& e) {
    verdict.status = call_knock_on;
    verdict.origin = e.failed_rank();
    detail::set_reason(verdict, e.what());
    failure = std::current_exception();
  } catch (const std::exception& e) {
    verdict.status = call_failed;
    detail::set_reason(verdict, e.what());
    failure = std::current_exception();
    transport.notify_failure("dilated_attention: rank " + std::to_string(me) +
                             " failed during the ring call: " + e.what());
  } catch (...) {
    verdict.status = call_failed;
    detail::set_reason(verdict, "an exception that is not a std::exception");
    failure = std::current_exception();
    transport.notify_failure("dilated_attention: rank " + std::to_string(me) +
                             " failed during the ring call");
  }
  try {
    transport.all_gather(&verdict, all.data(), sizeof(CallRecord));
  } catch (...) {
    if (failure) std::rethrow_exception(failure);  // this rank's own cause first
    throw;
  }
  if (verdict.status == call_failed) std::rethrow_exception(failure);
  for (std::size_t q = 0; q < all.size(); ++q)
    if (all[q].status == call_failed)
      throw PeerFailure(static_cast<int>(q),
                        "dilated_attention: rank " + std::to_string(q) +
                            " failed during the ring call: " + detail::reason_of(all[q]));
  if (failure) std::rethrow_exception(failure);
  for (std::size_t q = 0; q < all.size(); ++q)
    if (all[q].status != call_ok)
      throw PeerFailure(static_cast<int>(q),
                        "dilated_attention: rank " + std::to_string(q) +
                            " could not finish the ring call: " + detail::reason_of(all[q]));
  commit();
}

}  // namespace dilated_attention::ring
