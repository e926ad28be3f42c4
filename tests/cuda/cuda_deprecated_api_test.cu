// The positional spellings of cuda::forward and cuda::backward (deprecated in 0.1.0, removed in
// 0.2.0) forward to the grouped ones: on a GPU each old call gives bitwise the result of the new
// call, and the new backward without a workspace (stream-ordered allocation) gives bitwise the
// result with one. The old backward still rejects a null workspace (it never allocated); that and
// the argument checks run without a device. tests/cuda/CMakeLists.txt checks at build time that
// the old spellings are deprecated (cuda.deprecation_check.*).
#include <dilated_attention/cuda.cuh>

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "support/cuda_test_support.cuh"
#include "support/random_config.hpp"
#include "support/tensors.hpp"

#pragma nv_diag_suppress 1444  // use of a deprecated entity: these calls are the point
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

namespace da = dilated_attention;
namespace dt = dilated_attention::testing;

namespace {

TEST(CudaDeprecatedApi, OldBackwardStillRejectsANullWorkspace) {
  const da::Config config = dt::make_config({32}, {1});
  const da::Shape s{1, 64, 2, 2, 64};
  const std::uintptr_t span = 1u << 24;
  auto at = [&](int i) { return reinterpret_cast<float*>(std::uintptr_t{1} << 32 | (span * i)); };
  auto in = [&](int i, std::int64_t heads) {
    return da::contiguous_view<const float>(at(i), s, heads);
  };
  auto grad = [&](int i, std::int64_t heads) { return da::contiguous_view(at(i), s, heads); };
  try {
    da::cuda::backward<float>(config, s, in(0, 2), in(1, 2), in(2, 2), in(3, 2), at(4), in(5, 2),
                              grad(6, 2), grad(7, 2), grad(8, 2), nullptr, 0);
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find("workspace is null"), std::string::npos)
        << error.what();
  }
  // The new spelling with a workspace too small is rejected as before.
  da::cuda::Options options;
  options.workspace = at(9);
  options.workspace_bytes = 16;
  try {
    da::cuda::backward<float>(config, s, {in(0, 2), in(1, 2), in(2, 2)}, {in(3, 2), at(4)},
                              in(5, 2), {grad(6, 2), grad(7, 2), grad(8, 2)}, options);
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find("workspace_bytes = 16"), std::string::npos)
        << error.what();
  }
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

TEST(CudaDeprecatedApi, OldSpellingsMatchTheGroupedCallsBitwise) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  const da::Config config = dt::make_config({32, 64}, {1, 2}, /*causal=*/true);
  const da::Shape s{2, 128, 4, 2, 64};
  const auto rows = static_cast<std::size_t>(s.batch * s.num_heads * s.seq_len);
  const auto q_elems = static_cast<std::size_t>(s.batch * s.seq_len * s.num_heads * s.head_dim);
  const auto kv_elems = static_cast<std::size_t>(s.batch * s.seq_len * s.num_kv_heads * s.head_dim);
  dt::Tensor<float> hq(s, s.num_heads), hk(s, s.num_kv_heads), hv(s, s.num_kv_heads),
      hdo(s, s.num_heads);
  hq.fill_random(1);
  hk.fill_random(2);
  hv.fill_random(3);
  hdo.fill_random(4);
  dt::DeviceBuffer<float> q(q_elems), k(kv_elems), v(kv_elems), d_out(q_elems);
  q.upload(hq.storage);
  k.upload(hk.storage);
  v.upload(hv.storage);
  d_out.upload(hdo.storage);
  auto cq = [&](const dt::DeviceBuffer<float>& b, std::int64_t heads) {
    return da::contiguous_view<const float>(b.data(), s, heads);
  };
  auto mq = [&](const dt::DeviceBuffer<float>& b, std::int64_t heads) {
    return da::contiguous_view(b.data(), s, heads);
  };
  const da::Inputs<float> inputs{cq(q, 4), cq(k, 2), cq(v, 2)};
  cudaStream_t stream = nullptr;
  da::cuda::check(cudaStreamCreate(&stream), "cudaStreamCreate");

  // forward: old (config, shape, q, k, v, out, lse, stream) against new.
  dt::DeviceBuffer<float> out_new(q_elems), out_old(q_elems), lse_new(rows), lse_old(rows);
  da::cuda::forward<float>(config, s, inputs, {mq(out_new, 4), lse_new.data()}, {stream});
  da::cuda::forward<float>(config, s, cq(q, 4), cq(k, 2), cq(v, 2), mq(out_old, 4), lse_old.data(),
                           stream);
  da::cuda::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  std::vector<float> a, b, la, lb;
  out_new.download(a);
  out_old.download(b);
  lse_new.download(la);
  lse_old.download(lb);
  EXPECT_TRUE(same_bits(a, b));
  EXPECT_TRUE(same_bits(la, lb));

  // backward: old (..., workspace, bytes, stream), new with that workspace, new without one.
  const std::size_t bytes = da::cuda::backward_workspace_size(config, s);
  dt::DeviceBuffer<unsigned char> workspace(bytes);
  struct Grads {
    dt::DeviceBuffer<float> d_q, d_k, d_v;
  };
  const std::size_t kv = kv_elems;
  Grads g_old{dt::DeviceBuffer<float>(q_elems), dt::DeviceBuffer<float>(kv),
              dt::DeviceBuffer<float>(kv)};
  Grads g_new{dt::DeviceBuffer<float>(q_elems), dt::DeviceBuffer<float>(kv),
              dt::DeviceBuffer<float>(kv)};
  Grads g_own{dt::DeviceBuffer<float>(q_elems), dt::DeviceBuffer<float>(kv),
              dt::DeviceBuffer<float>(kv)};
  const da::Outputs<const float> forward_outputs{cq(out_new, 4), lse_new.data()};
  da::cuda::backward<float>(config, s, cq(q, 4), cq(k, 2), cq(v, 2), cq(out_new, 4), lse_new.data(),
                            cq(d_out, 4), mq(g_old.d_q, 4), mq(g_old.d_k, 2), mq(g_old.d_v, 2),
                            workspace.data(), bytes, stream);
  da::cuda::backward<float>(config, s, inputs, forward_outputs, cq(d_out, 4),
                            {mq(g_new.d_q, 4), mq(g_new.d_k, 2), mq(g_new.d_v, 2)},
                            {stream, workspace.data(), bytes});
  da::cuda::backward<float>(config, s, inputs, forward_outputs, cq(d_out, 4),
                            {mq(g_own.d_q, 4), mq(g_own.d_k, 2), mq(g_own.d_v, 2)}, {stream});
  da::cuda::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  for (auto member : {&Grads::d_q, &Grads::d_k, &Grads::d_v}) {
    std::vector<float> x, y, z;
    (g_old.*member).download(x);
    (g_new.*member).download(y);
    (g_own.*member).download(z);
    EXPECT_TRUE(same_bits(x, y));
    EXPECT_TRUE(same_bits(y, z));
  }
  cudaStreamDestroy(stream);
}

}  // namespace
