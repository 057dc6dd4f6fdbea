"""Shared builders: tiny CLIP configs, random token batches, reference models with the same weights."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import pytest
import torch

from nets import CLIPConfig, TextConfig, VisionConfig, build_model
from tests.reference_openai import ReferenceCLIP

SMALL = CLIPConfig(embed_dim=48, vision=VisionConfig(image_size=32, patch_size=8, width=128, layers=2, heads=2),
                   text=TextConfig(kind="openai", context_length=77, vocab_size=1000, width=128, layers=2, heads=2))
# open_clip's coca_ViT-B-32.json scaled down: a 4 x 4 grid, 9 pooler queries, 12-token captions, a 500-token
# vocabulary (tests/test_coca.py makes its last two the start and end tokens). The vision width differs from
# embed_dim, so the pooler holds separate q/k/v weights as the published models' do.
SMALL_COCA = {"embed_dim": 64,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 96, "patch_size": 8, "head_width": 32,
                             "attentional_pool": True, "attn_pooler_heads": 4, "attn_pooler_queries": 9,
                             "output_tokens": True},
              "text_cfg": {"context_length": 12, "vocab_size": 500, "width": 64, "heads": 2, "layers": 2,
                           "embed_cls": True, "output_tokens": True},
              "multimodal_cfg": {"context_length": 12, "vocab_size": 500, "width": 64, "heads": 2, "layers": 2,
                                 "attn_pooler_heads": 4},
              "custom_text": True}


def small_coca(layers: int = 2, context_length: int = 12, vocab_size: int = 500) -> dict:
    """SMALL_COCA (an open_clip model_cfg) with `layers` in every tower and the captions' context and vocabulary."""
    import copy

    cfg = copy.deepcopy(SMALL_COCA)
    cfg["vision_cfg"]["layers"] = layers
    for tower in ("text_cfg", "multimodal_cfg"):
        cfg[tower].update(layers=layers, context_length=context_length, vocab_size=vocab_size)
    return cfg


SMALL_BERT = dict(vocab_size=21128, width=128, layers=2, heads=2, intermediate_size=256,
                  max_position_embeddings=96, type_vocab_size=2)


def bert_config(kind: str, context_length: int) -> CLIPConfig:
    return CLIPConfig(embed_dim=48, vision=SMALL.vision, text=TextConfig(kind=kind, context_length=context_length,
                                                                         **SMALL_BERT))


def random_tokens(n: int, vocab_size: int, context_length: int = 77, seed: int = 0, max_len: int = 30):
    """OpenAI-style ids: SOT = vocab-2, EOT = vocab-1 (the largest id), zero padding after EOT."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, context_length, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(0, max_len, (1,), generator=g))
        tokens[i, 0] = vocab_size - 2
        tokens[i, 1:length + 1] = torch.randint(1, vocab_size - 2, (length,), generator=g)
        tokens[i, length + 1] = vocab_size - 1
    return tokens


def reference_for(config: CLIPConfig) -> ReferenceCLIP:
    v, t = config.vision, config.text
    return ReferenceCLIP(embed_dim=config.embed_dim, image_size=v.image_size, vision_layers=v.layers,
                         vision_width=v.width, patch=v.patch_size, context_length=t.context_length,
                         vocab_size=t.vocab_size, width=t.width, heads=t.heads, layers=t.layers,
                         vision_heads=v.heads).eval()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A tiny/VIT-T-8 state dict of seeded random weights, saved once for the tests that load a weight file, as
    training saves it (its architecture recorded beside it)."""
    from nets import get_config
    from utils.weights.arch import save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.pth"
    save_weights(build_model(get_config("tiny/VIT-T-8")).state_dict(), path, get_config("tiny/VIT-T-8"), "tiny/VIT-T-8")
    return path


@pytest.fixture
def small_pair():
    """(our model, reference model) holding the same random weights."""
    torch.manual_seed(0)
    reference = reference_for(SMALL)
    ours = build_model(SMALL).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


# OpenAI ships its weights as TorchScript archives, so the weight tests trace the reference to make one: torch's
# deprecation of torch.jit (FutureWarning) and the trace's note that Python shape checks become constants
# (TracerWarning, right for the one input shape the archive is read with) are expected there, and only there.
TRACES_ON_PURPOSE = [pytest.mark.filterwarnings(f"ignore:`torch.jit.{name}` is deprecated:FutureWarning")
                     for name in ("trace", "trace_method", "save")] + \
                    [pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]


def traces_on_purpose(test):
    for mark in TRACES_ON_PURPOSE:
        test = mark(test)
    return test


class ScriptResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run_script(script: str, *args, capsys=None, threads: int | None = None) -> ScriptResult:
    """(exit status, stdout, stderr) of `python <script> args...` run in this process: the script's config block
    and main through utils.config.run_script, as the command line runs them, without a new interpreter's
    seconds of imports. The output is collected through pytest's capsys when given, else (in fixtures wider
    than a test) by redirecting sys.stdout and sys.stderr. Warnings the run gives are written to its stderr, as
    an interpreter shows them (pytest.ini's errors still raise). `threads`: that many torch threads for the run,
    as OMP_NUM_THREADS gives a new interpreter. Signal handlers the script installs (train.py's stop flag) are
    put back afterwards."""
    import contextlib
    import importlib.util
    import io
    import signal
    import warnings
    from pathlib import Path

    from utils.config import run_script as run

    path = Path(script) if Path(script).is_absolute() else Path(__file__).resolve().parents[1] / script
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    torch_threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    if capsys is not None:
        capsys.readouterr()
    try:
        with contextlib.ExitStack() as stack:
            if capsys is None:
                stack.enter_context(contextlib.redirect_stdout(out))
                stack.enter_context(contextlib.redirect_stderr(err))
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            if threads:
                torch.set_num_threads(threads)
            try:
                run(vars(module), module.main, [str(a) for a in args])
                code = 0
            except SystemExit as e:
                code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    finally:
        torch.set_num_threads(torch_threads)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    stdout, stderr = capsys.readouterr() if capsys is not None else (out.getvalue(), err.getvalue())
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught)
    return ScriptResult(code, stdout, shown + stderr)


def write_hf_tokenizer(folder: Path, tokenizer, settings: dict) -> Path:
    """`folder` holding a Hugging Face tokenizer as the weights' repos do (no hub): the `tokenizers.Tokenizer`'s
    tokenizer.json, and tokenizer_config.json with `settings` (its class and special tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_", "xavier_normal_",
          "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


def free_port() -> int:
    """A TCP port nothing listens on now: tests run side by side (pytest -n), so no port is fixed."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def no_init():
    """torch.nn.init's fills as no-ops: on the meta device they change nothing but cost half of a big tower's build
    (each op dispatched through the device mode), and only names and shapes are compared."""
    def keep(*args, **kwargs):
        return args[0] if args else next(iter(kwargs.values()))

    with contextlib.ExitStack() as stack:
        for name in _INITS:
            stack.enter_context(mock.patch.object(torch.nn.init, name, keep))
        yield


def meta_models_with_open_clips_names_and_shapes(name: str, config):
    """(open_clip's `name`, our model of `config`), both on the meta device (nothing allocated), checked to have the
    same parameter names and shapes."""
    import open_clip

    with no_init(), torch.device("meta"):
        reference = open_clip.create_model(name, pretrained=None, device="meta")
        model = build_model(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    return reference, model
