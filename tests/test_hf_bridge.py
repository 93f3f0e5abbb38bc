"""course_lib's GPT and BERT in Hugging Face transformers' classes compute what course_lib computes."""

import pytest
import torch

from course_lib import hf_bridge
from course_lib.bert import Bert, BertConfig, load_minilm
from course_lib.gpt import GPT, GPTConfig

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _small_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    config = dict(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=12)
    model = GPT(GPTConfig(**{**config, **overrides})).eval()
    with torch.no_grad():  # biases and LayerNorm parameters away from their 0 / 1 start
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(mean=1.0 if "ln" in name and name.endswith("weight") else 0.0, std=0.3)
    return model


@pytest.mark.parametrize("bias", [True, False])
def test_gpt_logits_match_gpt2_lm_head_model(bias):
    model = _small_gpt(bias=bias)
    hf = hf_bridge.gpt_to_hf(model)
    ids = torch.randint(0, 61, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, hf_logits = model(ids)[0], hf(ids).logits
    torch.testing.assert_close(hf_logits, ours, rtol=0, atol=1e-5)


def test_gpt_mapping_transposes_conv1d_and_ties_the_head():
    model = _small_gpt()
    hf = hf_bridge.gpt_to_hf(model)
    qkv = model.blocks[1].attn.qkv.weight
    assert hf.transformer.h[1].attn.c_attn.weight.shape == (12, 36)
    torch.testing.assert_close(hf.transformer.h[1].attn.c_attn.weight, qkv.T, rtol=0, atol=0)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    assert sum(p.numel() for p in hf.parameters()) == model.num_params()


def test_gpt_greedy_generation_is_the_same():
    model = _small_gpt()
    hf = hf_bridge.gpt_to_hf(model)
    ids = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(2))
    ours = model.generate(ids, 8, temperature=0)
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_gpt_with_a_tensor_gpt2_lacks_is_refused():
    model = _small_gpt()
    model.register_buffer("rotary_inv_freq", torch.ones(3))
    with pytest.raises(ValueError, match="rotary_inv_freq"):
        hf_bridge.gpt_state_dict_to_hf(model)


def test_bert_hidden_states_match_bert_model():
    torch.manual_seed(0)
    model = Bert(BertConfig(vocab_size=50, max_position=20, n_layer=2, n_head=2, n_embd=8, n_inner=16)).eval()
    hf = hf_bridge.bert_to_hf(model)
    ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()  # padded positions' vectors are never used (mean pooling masks them out)
    torch.testing.assert_close(theirs[real], ours[real], rtol=0, atol=1e-5)
    assert sum(p.numel() for p in hf.parameters()) == model.num_params()


def test_minilm_from_the_wheel_matches_course_lib():
    ours = load_minilm()
    hf = hf_bridge.load_minilm_hf()
    texts = ["The king is dead.", "Now is the winter of our discontent made glorious summer by this sun."]
    ids, mask = ours.tokenize(texts)
    torch.testing.assert_close(hf_bridge.hf_sentence_embeddings(hf, ids, mask), ours.encode(texts),
                               rtol=0, atol=1e-6)
    assert sum(p.numel() for p in hf.parameters()) == ours.model.num_params() == 22_565_376
