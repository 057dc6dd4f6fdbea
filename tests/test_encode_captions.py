"""encode_captions encodes a repeated caption once and hands every occurrence the same features."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nets import build_model, get_config
from utils.eval.encode import encode_captions
from utils.tokenizer import build_tokenizer


def test_repeated_captions_are_encoded_once_with_the_features_of_encoding_each_alone_within_1e5():
    torch.manual_seed(0)
    model = build_model(get_config("tiny/VIT-T-8")).eval()
    tokenizer = build_tokenizer("openai", model.config.text.context_length)
    captions = ["a red circle", "two dogs on the beach", "a red circle", "a blue square and a star",
                "two dogs on the beach", "a red circle"]
    calls = []
    encode_text = model.encode_text
    model.encode_text = lambda tokens: calls.append(len(tokens)) or encode_text(tokens)
    features = encode_captions(model, captions, tokenizer, batch_size=2, device=torch.device("cpu"), progress=False)
    assert sum(calls) == 3  # three distinct captions
    assert torch.equal(features[0], features[2]) and torch.equal(features[0], features[5])
    with torch.no_grad():
        alone = torch.cat([F.normalize(encode_text(tokenizer([c])), dim=-1) for c in captions])
    assert torch.allclose(features, alone, atol=1e-5)
