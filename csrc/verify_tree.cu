// run_verify_tree_greedy: one warp per row, four rows per block.
#include "verify_tree.cuh"

namespace ht {

void run_verify_tree_greedy(const VerifyTreeParams& p, cudaStream_t stream) {
  if (p.B == 0) return;
  verify_tree_greedy_kernel<<<(p.B + 3) / 4, 128, 0, stream>>>(p);
  check_launch("verify_tree_greedy");
}

}  // namespace ht
