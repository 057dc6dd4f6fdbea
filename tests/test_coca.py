"""CoCa against open_clip 3.3 on the same random weights: features, decoder logits, the user's path (an open_clip
folder read with phi="auto"), the real architectures on the meta device, and captions: greedy and beam search
against reference decoders written here over open_clip's own forward, sampling within its filtered set."""
from __future__ import annotations

import json

import pytest
import torch

from nets import build_model, get_config, phi_of
from nets.configs import COCA
from nets.shape_config import infer_config
from nets.open_clip_configs import from_open_clip
from tests.conftest import SMALL_COCA as SMALL, meta_models_with_open_clips_names_and_shapes
from utils.errors import UserError
from utils.predict.generate import Generation, filtered, generate, processed

open_clip = pytest.importorskip("open_clip")

TOL = 1e-4
SOT, EOT = 498, 499  # the last two of SMALL's vocabulary


def reference(seed: int = 0):
    """open_clip's CoCa of SMALL with seeded weights in every parameter (LayerNorms too); its end token made likely
    enough that some captions end before the length limit."""
    from open_clip.coca_model import CoCa

    torch.manual_seed(seed)
    model = CoCa(SMALL["embed_dim"], SMALL["multimodal_cfg"], SMALL["text_cfg"], SMALL["vision_cfg"]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, p[0].numel() ** -0.5 if p.ndim > 1 else 0.1)
            if p.ndim == 1 and name.endswith("weight"):
                p.add_(1)
        model.text_decoder.text_projection[:, EOT] *= 6
    return model


def ours_of(ref):
    model = build_model(from_open_clip(SMALL)).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def captions_tokens(n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    tokens = torch.zeros(n, 12, dtype=torch.long)
    for i, length in enumerate([3, 7, 12, 5][:n]):
        tokens[i, :length] = torch.randint(1, SOT, (length,), generator=g)
        tokens[i, 0], tokens[i, length - 1] = SOT, EOT
    return tokens


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_real_cocas_have_open_clips_names_and_shapes_and_configs():
    for name in COCA:
        meta_models_with_open_clips_names_and_shapes(name, get_config(name))
        assert from_open_clip(open_clip.get_model_config(name)) == get_config(name)
        assert phi_of(from_open_clip(open_clip.get_model_config(name))) == name


def test_image_and_text_features_and_decoder_logits_within_1e_4_of_open_clip():
    ref = reference()
    ours = ours_of(ref)
    pixels, tokens = images(), captions_tokens()
    with torch.no_grad():
        image_diff = (ref.encode_image(pixels, normalize=False) - ours.encode_image(pixels)).abs().max().item()
        text_diff = (ref.encode_text(tokens, normalize=False) - ours.encode_text(tokens)).abs().max().item()
        # Trimmed captions are padded back: the class embedding's position is the context length, as open_clip's.
        short = tokens[[0, 1, 3]]  # captions of 3, 7 and 5 tokens
        trimmed = (ref.encode_text(short, normalize=False) - ours.encode_text(short[:, :8])).abs().max().item()
        theirs = ref(pixels[:1].expand(4, -1, -1, -1), tokens, output_labels=False)["logits"]
        mine = ours.caption_logits(ours.visual.forward_with_tokens(pixels[:1].expand(4, -1, -1, -1))[1], tokens)
        # Unpadded prefixes, as generation feeds them.
        prefix = (ref(pixels, tokens[:3, :4], output_labels=False)["logits"]
                  - ours.caption_logits(ours.visual.forward_with_tokens(pixels)[1], tokens[:3, :4])).abs().max().item()
        # The padding takes part (open_clip's mask hides key j where token j - 1 is padding): a caption's feature
        # depends on it, so the parity above is a check of that mask.
        moved = (ours.encode_text(tokens[2:3]) - ours.text.forward_with_tokens(tokens[2:3, :5])[0]).abs().max().item()
    print(f"\nCoCa parity: image {image_diff:.2e}, text {text_diff:.2e}, logits {(theirs - mine).abs().max():.2e}")
    assert image_diff < TOL and text_diff < TOL and trimmed < TOL and prefix < TOL
    assert (theirs - mine).abs().max().item() < TOL and theirs.abs().max() > 0.1
    assert moved > 1e-3


def test_an_accelerated_decoders_vocabulary_projection_runs_packed_within_1e_4_of_open_clip():
    from nets.fast import PACK_AFTER, Matmul, accelerate

    ref = reference()
    ours = ours_of(ref)
    accelerate(ours)
    pixels, tokens = images()[:1].expand(4, -1, -1, -1), captions_tokens()
    with torch.no_grad():
        theirs = ref(pixels, tokens, output_labels=False)["logits"]
        image_tokens = ours.visual.forward_with_tokens(pixels)[1]
        for _ in range(PACK_AFTER):
            mine = ours.caption_logits(image_tokens, tokens)
    vocabulary = ours.text_decoder.vocabulary
    assert isinstance(vocabulary, Matmul) and vocabulary.packed is not None
    assert (theirs - mine).abs().max().item() < TOL and theirs.abs().max() > 0.1


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "onednn"])
def test_caption_steps_give_the_whole_prefixs_logits_through_padding_and_beam_reordering(fast):
    from nets.fast import accelerate

    ours = ours_of(reference())
    if fast:
        accelerate(ours)
    pixels, beams = images(2), 3
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, SOT, (2 * beams, 9), generator=g)
    tokens[:, 0] = SOT
    tokens[1, 4], tokens[1, 5:] = EOT, 0  # a finished caption: its end token, then padding (masked as keys)
    tokens[4, 2:] = 0
    with torch.inference_mode():
        image_tokens = ours.visual.forward_with_tokens(pixels)[1]
        repeated = image_tokens.repeat_interleave(beams, dim=0)
        steps = ours.caption_steps(image_tokens, beams)
        worst, seen = 0.0, tokens[:, :0]
        for p in range(tokens.shape[1]):
            if p == 5:  # a beam search's sources: rows move and repeat within each image's beams
                rows = torch.tensor([2, 0, 0, 5, 3, 4])
                steps.keep(rows)
                tokens, seen = tokens[rows], seen[rows]
            seen = torch.cat([seen, tokens[:, p:p + 1]], dim=1)
            want = ours.caption_logits(repeated, seen)[:, -1]
            worst = max(worst, (steps.next(tokens[:, p:p + 1]) - want).abs().max().item())
        with pytest.raises(ValueError, match="same image"):
            steps.keep(torch.tensor([3, 1, 2, 0, 4, 5]))
        last = ours.caption_logits(repeated, seen, last=True)  # what generate's whole-prefix fallback asks
    assert worst < 1e-5 and want.abs().max() > 0.1, worst
    assert last.shape == want.shape and (last - want).abs().max() < 1e-5


def test_a_decoder_with_a_wrapped_block_generates_through_the_whole_prefix():
    ref = reference()
    ours = ours_of(ref)
    pixels = images(2)
    settings = Generation(generation="greedy", seq_len=8, min_seq_len=3)
    plain = generate(ours, pixels, SOT, EOT, settings)

    class Wrapped(torch.nn.Module):  # as an adapter wraps a layer: its forward is what runs, and step would skip it
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    ours.text_decoder.resblocks[0] = Wrapped(ours.text_decoder.resblocks[0])
    assert ours.caption_steps(ours.visual.forward_with_tokens(pixels)[1]) is None
    assert torch.equal(generate(ours, pixels, SOT, EOT, settings), plain)


def test_an_open_clip_folder_loads_with_phi_auto_and_a_bare_state_dict_names_its_row(tmp_path):
    from safetensors.torch import save_file

    from utils.weights.load import load_model

    ref = reference()
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": SMALL, "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    model, phi = load_model(tmp_path, "auto")
    assert phi == "custom" and model.config.decoder is not None
    pixels, tokens = images(), captions_tokens()
    with torch.no_grad():
        assert (ref.encode_image(pixels, normalize=False) - model.encode_image(pixels)).abs().max() < TOL
        assert (ref.encode_text(tokens, normalize=False) - model.encode_text(tokens)).abs().max() < TOL
    with torch.device("meta"):
        real = build_model(get_config("coca_ViT-B-32")).state_dict()
    assert phi_of(infer_config(real)) == "coca_ViT-B-32"


def test_an_open_clip_coca_it_cannot_build_is_refused_by_name():
    from nets.configs import UnsupportedArchitectureError

    with pytest.raises(UnsupportedArchitectureError, match="attentional_pool"):
        from_open_clip(open_clip.get_model_config("coca_base"))
    with pytest.raises(UnsupportedArchitectureError, match="hf_model_name|text tower other"):
        from_open_clip(open_clip.get_model_config("coca_roberta-ViT-B-32"))


def _reference_greedy(ref, pixels, seq_len: int, min_len: int) -> list[list[int]]:
    """Greedy decoding through open_clip's forward, as its generate calls it, one image at a time."""
    out = []
    for image in pixels:
        tokens = [SOT]
        while tokens[-1] != EOT and len(tokens) < seq_len:
            logits = ref(image[None], torch.tensor([tokens]), output_labels=False)["logits"][:, -1][0]
            if len(tokens) < min_len:
                logits[EOT] = -float("inf")
            tokens.append(EOT if len(tokens) + 1 == seq_len else int(logits.argmax()))
        out.append(tokens)
    return out


def _trim(row: torch.Tensor) -> list[int]:
    row = row.tolist()
    return row[:row.index(EOT) + 1] if EOT in row else row


def test_greedy_tokens_equal_greedy_decoding_through_open_clips_forward():
    ref = reference()
    ours = ours_of(ref)
    pixels = images(4)
    settings = Generation(generation="greedy", seq_len=12, min_seq_len=3)
    with torch.no_grad():
        expected = _reference_greedy(ref, pixels, 12, 3)
    got = generate(ours, pixels, SOT, EOT, settings)
    assert [_trim(r) for r in got] == expected
    assert any(len(t) < 12 for t in expected) and any(len(t) > 3 for t in expected)  # both ends are exercised
    assert (got[:, 1:] == 0).any()  # the finished captions' pad after their end token


def _reference_beam_search(ref, image, beams: int, seq_len: int, min_len: int) -> tuple[list[int], float]:
    """A plain beam search over open_clip's forward, as open_clip's (summed raw logits, 2 x beams candidates, a
    finished caption's score its sum over its length with the end token, stopped when no open beam can beat the
    kept ones), one image at a time."""
    open_beams, finished = [([SOT], 0.0)], []
    while True:
        length = len(open_beams[0][0]) + 1
        logits = ref(image[None].expand(len(open_beams), -1, -1, -1), torch.tensor([b for b, _ in open_beams]),
                     output_labels=False)["logits"][:, -1]
        if length - 1 < min_len:
            logits[:, EOT] = -float("inf")
        scores = logits + torch.tensor([s for _, s in open_beams])[:, None]
        values, order = scores.flatten().sort(descending=True)
        vocab, new = logits.shape[1], []
        for rank, (value, index) in enumerate(zip(values[:2 * beams].tolist(), order[:2 * beams].tolist())):
            prefix, token = open_beams[index // vocab][0], index % vocab
            if token == EOT:
                if rank < beams:
                    finished = sorted(finished + [(value / length, prefix)], key=lambda f: -f[0])[:beams]
            else:
                new.append((prefix + [token], value))
            if len(new) == beams:
                break
        done = len(finished) >= beams and finished[-1][0] >= values[0].item() / length
        open_beams = new
        if done or length >= seq_len:
            break
    if not done:
        finished += [(s / len(b), b) for b, s in open_beams]
    score, best = max(finished, key=lambda f: f[0])
    return (best + [EOT] if len(best) < seq_len else best), score


def test_beam_search_equals_a_plain_reference_beam_search_over_open_clips_forward():
    ref = reference()
    ours = ours_of(ref)
    pixels = images(3)
    settings = Generation(seq_len=12, min_seq_len=3)  # open_clip's 6 beams in 3 groups: 2 beams searched
    with torch.no_grad():
        expected = [_reference_beam_search(ref, image, 2, 12, 3)[0] for image in pixels]
    got = generate(ours, pixels, SOT, EOT, settings)
    assert [_trim(r) for r in got] == expected
    assert any(t[-1] == EOT and len(t) < 12 for t in expected)
    # More beams search more: a caption of 3 beams is another test of the same rules.
    with torch.no_grad():
        wider = [_reference_beam_search(ref, image, 3, 12, 3)[0] for image in pixels]
    assert [_trim(r) for r in generate(ours, pixels, SOT, EOT, Generation(seq_len=12, min_seq_len=3, num_beams=3,
                                                                            num_beam_groups=1))] == wider


@pytest.mark.parametrize("generation, value", [("top_k", 3), ("top_p", 0.5)])
def test_sampling_with_a_seed_stays_within_the_filtered_set(generation, value):
    ref = reference()
    ours = ours_of(ref)
    pixels = images(3)
    settings = Generation(generation=generation, seq_len=10, min_seq_len=2, **{generation: value})
    got = generate(ours, pixels, SOT, EOT, settings, generator=torch.Generator().manual_seed(0))
    again = generate(ours, pixels, SOT, EOT, settings, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, again)
    sizes = set()
    with torch.no_grad():
        for image, row in zip(pixels, got):
            row = _trim(row)
            for step in range(1, len(row) - 1):  # the last is the end token, forced at the limit or drawn
                prefix = torch.tensor([row[:step]])
                logits = ref(image[None], prefix, output_labels=False)["logits"][:, -1]
                allowed = filtered(processed(prefix, logits, settings, EOT), settings)[0].isfinite()
                assert allowed[row[step]], (generation, step)
                sizes.add(int(allowed.sum()))
    assert max(sizes) > 1  # a choice was made among several tokens
    if generation == "top_k":
        assert sizes == {3}


def test_a_model_without_a_decoder_refuses_in_one_line():
    with pytest.raises(UserError, match="no caption decoder") as e:
        generate(build_model(get_config("tiny/VIT-T-8")), torch.zeros(1, 3, 64, 64), SOT, EOT)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="generation 'nucleus'"):
        Generation(generation="nucleus")


def test_onnx_export_of_a_coca_gives_its_contrastive_features_within_1e_4(tmp_path):
    """CoCa's image tower (attentional pooler) and its text tower, read at the full context because its class
    embedding sits after the padding, export; onnxruntime equals PyTorch on captions the export's tokenizer makes."""
    pytest.importorskip("onnxruntime")
    from safetensors.torch import save_file

    from clip import CLIP
    from utils.export.onnx_export import export_files, write_files
    from utils.export.onnx_predict import OnnxCLIP

    cfg = {**SMALL, "text_cfg": {**SMALL["text_cfg"], "vocab_size": 49408},  # OpenAI's BPE ids
           "multimodal_cfg": {**SMALL["multimodal_cfg"], "vocab_size": 49408}}
    from open_clip.coca_model import CoCa

    torch.manual_seed(0)
    ref = CoCa(cfg["embed_dim"], cfg["multimodal_cfg"], cfg["text_cfg"], cfg["vision_cfg"])
    folder = tmp_path / "coca"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, folder / "open_clip_model.safetensors")
    model = CLIP(model_path=str(folder), phi="auto", cuda=False)
    lines = []
    files = export_files(model, log=lines.append)
    assert [line.split(":")[0] for line in lines] == ["image.onnx", "text.onnx"]
    assert all(float(line.split("= ")[1].split()[0]) < TOL for line in lines), lines
    export = tmp_path / "export"
    export.mkdir()
    write_files(export, files)
    onnx = OnnxCLIP(export)
    tokens = onnx.tokenize(["a dog", "a photo of a red car by a tall building"])
    with torch.no_grad():
        want = model.net.encode_text(torch.from_numpy(tokens)).numpy()
        image = model.net.encode_image(images(2)).numpy()
    assert abs(onnx.encode_text(tokens) - want).max() < TOL and abs(want).max() > 1e-2
    assert abs(onnx.encode_image(images(2).numpy()) - image).max() < TOL
