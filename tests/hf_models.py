"""Tiny Hugging Face models built from configs (nothing downloaded), each with example inputs:
(model in eval mode, positional inputs, keyword inputs)."""

from __future__ import annotations

import torch
import transformers


def tokens(shape=(2, 7), vocab=99, seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64,
    )
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # padding: the mask takes part
    return transformers.BertModel(config).eval(), (tokens(),), {"attention_mask": mask}


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
        bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2Model(config).eval(), (tokens(),), {}


def vit(seed=0):
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        image_size=16, patch_size=4, num_channels=3,
    )
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return transformers.ViTModel(config).eval(), (pixels,), {}


def t5(seed=0):
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    return transformers.T5EncoderModel(config).eval(), (tokens(),), {}


HF = {"bert": bert, "gpt2": gpt2, "vit": vit, "t5": t5}
