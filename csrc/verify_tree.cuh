// verify_tree_greedy_kernel: one warp walks one row's tree from the root.
#pragma once

#include "common.cuh"

namespace ht {

// Block of 4 warps, warp w of block x takes row 4 x + w. From node u the warp scans the nodes after
// u 32 at a time (children follow their parent) and takes the lowest-index child c with
// draft[c] == target[u]; the walk ends at a node without one. Node ids are written in path order,
// the rest of the row is -1.
__global__ void verify_tree_greedy_kernel(VerifyTreeParams p) {
  const int lane = threadIdx.x & 31;
  const int b = blockIdx.x * 4 + (threadIdx.x >> 5);
  if (b >= p.B) return;
  const int64_t* draft = p.draft + static_cast<int64_t>(b) * p.T;
  const int64_t* target = p.target + static_cast<int64_t>(b) * p.T;
  const int64_t* parents = p.parents + b * p.parents_stride_b;
  int64_t* accepted = p.accepted + static_cast<int64_t>(b) * p.T;
  for (int i = lane; i < p.T; i += 32) accepted[i] = i == 0 ? 0 : -1;
  __syncwarp();
  int u = 0, len = 1;
  while (true) {
    const int64_t want = target[u];
    int next = -1;
    for (int c0 = u + 1; c0 < p.T; c0 += 32) {  // warp-uniform loop: every lane sees the same ballot
      const int c = c0 + lane;
      const bool hit = c < p.T && parents[c] == u && draft[c] == want;
      const unsigned found = __ballot_sync(0xffffffffu, hit);
      if (found) {
        next = c0 + __ffs(found) - 1;
        break;
      }
    }
    if (next < 0) break;
    if (lane == 0) accepted[len] = next;
    ++len;
    u = next;
  }
  if (lane == 0) p.accept_len[b] = len;
}

}  // namespace ht
