"""Weights by name, served from a local HTTP server on 127.0.0.1: downloads, the cache, checksums, broken
connections, no network, and hub repos through a fake HF_ENDPOINT."""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from nets import build_model, get_config
from nets.configs import MODEL_CONFIGS
from tests.conftest import SMALL, run_script
from tests.test_models import _hf_clip
from utils.errors import UserError
from utils.weights import pretrained
from utils.weights.download import TIMEOUT_S, DownloadError, cache_path
from utils.weights.load import load_model
from utils.weights.pretrained import GELU, QUICK_GELU, Pretrained, locate, phi_with_activation

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OPENAI_LIKE = "https://openaipublic.azureedge.net/clip/models/{sha}/tiny.pt"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files` {path: bytes or an HTTP status}; `server.drop` lists paths that stop after half their bytes. Paths under
    /ORG/NAME/resolve/REV/ answer as the hub does (X-Repo-Commit, ETag, EntryNotFound)."""
    timeout = 5  # a stuck client cannot hold the server

    def _head(self) -> bytes | None:
        files, hub = self.server.files, "/resolve/" in self.path
        body = files.get(self.path)
        self.server.requests.append(self.path)
        if isinstance(body, int):  # a status to answer with, such as a hub that is down
            self.send_response(body)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if body is None:
            self.send_response(404)
            if hub:
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if hub:
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.end_headers()
        return body

    def do_HEAD(self):
        self._head()

    def do_GET(self):
        body = self._head()
        if body is not None:
            if self.path in self.server.drop:
                self.wfile.write(body[:len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(files: dict[str, bytes], drop=()):
    """A server on a free port of 127.0.0.1 for the `with` block; it shuts itself down after 60 s regardless."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.files, server.drop, server.requests = files, set(drop), []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(60, server.shutdown)
    watchdog.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(5)


def _closed_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens here once the socket closes


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty CLIP cache and hub cache, no proxies, no mirror, online."""
    import huggingface_hub.constants as hub

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy",
                 "CLIP_DOWNLOAD_BASE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("CLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


@pytest.fixture(scope="module")
def tiny_bytes():
    torch.manual_seed(1)
    state = build_model(get_config("tiny/VIT-T-8")).state_dict()
    return _torch_bytes(state), state


def _files_in(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def _same_weights(model, state):
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def _tag(monkeypatch, sha: str, activation: str = QUICK_GELU, tag: str = "toy"):
    row = Pretrained("tiny/VIT-T-8", tag, OPENAI_LIKE.format(sha=sha), activation)
    monkeypatch.setitem(pretrained.PRETRAINED, ("tiny/VIT-T-8", tag), row)
    return row


def test_url_downloads_once_then_loads_from_the_cache_with_the_server_gone(env, tiny_bytes):
    data, state = tiny_bytes
    with serve({"/w/tiny.pth": data}) as (server, base):
        model, phi = load_model(f"{base}/w/tiny.pth", "tiny/VIT-T-8")
        assert server.requests == ["/w/tiny.pth"]
    _same_weights(model, state)
    assert phi == "tiny/VIT-T-8"
    cached = _files_in(env / "cache")
    assert [p.name for p in cached] == ["tiny.pth"] and cached[0].read_bytes() == data  # no .part, no stamp
    from utils.files import new_file_mode

    assert cached[0].stat().st_mode & 0o777 == new_file_mode()  # not mkstemp's 0600: a shared cache reads it
    again, _ = load_model(f"{base}/w/tiny.pth", "tiny/VIT-T-8")  # the server is gone
    _same_weights(again, state)


def test_a_tag_downloads_through_the_mirror_base_and_is_checked_by_its_sha256(env, tiny_bytes, monkeypatch):
    from clip import CLIP

    data, state = tiny_bytes
    row = _tag(monkeypatch, hashlib.sha256(data).hexdigest())
    with serve({"/mirror/tiny.pt": data}) as (server, base):
        monkeypatch.setenv("CLIP_DOWNLOAD_BASE", base + "/mirror/")
        clip = CLIP(model_path="toy", phi="tiny/VIT-T-8", cuda=False)
        assert server.requests == ["/mirror/tiny.pt"]
    _same_weights(clip.net, state)
    # Kept under the table's URL, not the mirror's, so the same file serves either way.
    assert clip.weights_path == cache_path(row.source) and clip.weights_path.read_bytes() == data
    stamp = clip.weights_path.with_name(".tiny.pt.sha256")  # the verified size and mtime: no rehash per load
    assert json.loads(stamp.read_text())["sha256"] == row.sha256
    monkeypatch.delenv("CLIP_DOWNLOAD_BASE")
    assert CLIP(model_path="TOY", phi="tiny/VIT-T-8", cuda=False).weights_path == clip.weights_path
    # A file in the cache that does not match the published checksum is refused, not loaded, and kept.
    clip.weights_path.write_bytes(data[:-1] + b"!")
    with pytest.raises(DownloadError, match="does not match the sha256"):
        load_model("toy", "tiny/VIT-T-8")
    assert clip.weights_path.exists()


def test_a_checksum_mismatch_is_refused_and_leaves_nothing_in_the_cache(env, tiny_bytes, monkeypatch):
    data, _ = tiny_bytes
    _tag(monkeypatch, hashlib.sha256(b"other bytes").hexdigest())
    with serve({"/tiny.pt": data}) as (_, base):
        monkeypatch.setenv("CLIP_DOWNLOAD_BASE", base)
        with pytest.raises(DownloadError, match="not the published") as raised:
            load_model("toy", "tiny/VIT-T-8")
    assert "\n" not in str(raised.value) and "put the file at" in str(raised.value)
    assert _files_in(env / "cache") == []
    # Pinned by the user on any URL (pip's #sha256=), the same check applies.
    with serve({"/tiny.pth": data}) as (_, base):
        with pytest.raises(DownloadError, match="not the published"):
            load_model(f"{base}/tiny.pth#sha256={'0' * 64}", "tiny/VIT-T-8")
        load_model(f"{base}/tiny.pth#sha256={hashlib.sha256(data).hexdigest()}", "tiny/VIT-T-8")
    assert sorted(p.name for p in _files_in(env / "cache")) == [".tiny.pth.sha256", "tiny.pth"]


def test_a_connection_dropped_mid_file_leaves_no_file_that_loads(env, tiny_bytes, monkeypatch):
    data, state = tiny_bytes
    with serve({"/w/tiny.pth": data}, drop={"/w/tiny.pth"}) as (_, base):
        for _ in range(2):  # a second try does not find a half file either
            with pytest.raises(DownloadError, match=r"closed after \d+ of \d+ bytes"):
                load_model(f"{base}/w/tiny.pth", "tiny/VIT-T-8")
            assert _files_in(env / "cache") == []
    with serve({"/w/tiny.pth": data}) as (_, base):
        _same_weights(load_model(f"{base}/w/tiny.pth", "tiny/VIT-T-8")[0], state)


def test_no_network_is_one_line_naming_source_and_place_exit_2_within_seconds(env, monkeypatch, capsys):
    dead = _closed_port()
    monkeypatch.setenv("CLIP_DOWNLOAD_BASE", dead)
    started = time.monotonic()
    code, out, err = run_script("predict.py", "--model_path", "openai", "--phi", "openai/VIT-B-32", "--image",
                                ROOT / "img" / "example.jpg", "--captions", "a dog", capsys=capsys)
    elapsed = time.monotonic() - started
    target = cache_path(pretrained.PRETRAINED["ViT-B-32", "openai"].source)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ViT-B-32 openai: could not download"), err
    assert f"{dead}/ViT-B-32.pt" in err and f"put the file at {target} by hand" in err
    assert elapsed < TIMEOUT_S  # refused at once: no retry loop
    assert _files_in(env / "cache") == []
    # HF_HUB_OFFLINE=1: no connection is tried at all, for URLs and hub repos alike.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with serve({}) as (server, base):
        monkeypatch.setenv("HF_ENDPOINT", base)
        for name in ("openai", f"{base}/w/tiny.pth", "hf-hub:org/repo"):
            with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set") as raised:
                load_model(name, "openai/VIT-B-32")
            assert "\n" not in str(raised.value)
        assert server.requests == []


def test_names_that_cannot_be_resolved_say_what_would_work(env):
    with pytest.raises(UserError, match="pretrained tag of ViT-B-16, ViT-B-16-plus-240, ViT-B-32, ViT-L-14: set phi"):
        locate("laion400m_e31", "auto")
    with pytest.raises(UserError, match="its tags: openai, laion400m_e31"):
        locate("laion_oops", "openai/VIT-B-32")
    with pytest.raises(UserError, match="no pretrained weights by name"):
        locate("anything", "tiny/VIT-T-8")
    assert locate("missing.pth", "tiny/VIT-T-8")[:2] == (Path("missing.pth"), "tiny/VIT-T-8")  # the reader says
    with pytest.raises(UserError, match="does not exist and is not a weight name"):
        load_model("missing.pth", "tiny/VIT-T-8")


def test_weights_trained_with_another_activation_never_load_silently(env, tiny_bytes, monkeypatch, tmp_path):
    data, _ = tiny_bytes
    _tag(monkeypatch, hashlib.sha256(data).hexdigest(), activation=GELU)
    with serve({"/tiny.pt": data}) as (server, base):
        monkeypatch.setenv("CLIP_DOWNLOAD_BASE", base)
        with pytest.raises(UserError, match="trained with gelu, but phi=tiny/VIT-T-8 uses quick_gelu"):
            load_model("toy", "tiny/VIT-T-8")
        assert server.requests == []  # refused before downloading
    # self-cn takes a tag's ViT-B/32 image tower, but is never swapped for the GELU ViT-B-32 (it has BERT text).
    with pytest.raises(UserError, match="no gelu variant"):
        phi_with_activation("self-cn/VIT-B-32", GELU, "ViT-B-32 laion2b_s34b_b79k")


@pytest.mark.skipif("ViT-B-32" not in MODEL_CONFIGS, reason="needs the open_clip names of nets/configs.py")
def test_a_tag_picks_the_phi_variant_with_its_activation(capsys):
    assert phi_with_activation("ViT-B-32", QUICK_GELU, "ViT-B-32 openai") == "ViT-B-32-quickgelu"
    assert "building phi=ViT-B-32-quickgelu instead of ViT-B-32" in capsys.readouterr().err
    assert phi_with_activation("ViT-B-32-quickgelu", GELU, "x") == "ViT-B-32"
    assert phi_with_activation("openai/VIT-B-32", GELU, "x") == "ViT-B-32"
    assert phi_with_activation("openai/VIT-B-32", QUICK_GELU, "x") == "openai/VIT-B-32"


@pytest.mark.skipif("ViT-B-32" not in MODEL_CONFIGS, reason="needs the open_clip names of nets/configs.py")
def test_every_row_builds_a_phi_of_the_table():
    rows = pretrained.PRETRAINED.values()
    assert sorted({r.architecture for r in rows if r.architecture not in MODEL_CONFIGS}) == []
    for row in rows:  # each finds the variant with its activation (-quickgelu or not), or raises
        pretrained.phi_with_activation(row.architecture, row.activation, f"{row.architecture} {row.tag}")


def test_the_table_holds_open_clips_tags_for_these_towers_with_its_sources_and_activations():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.pretrained import _PRETRAINED

    architectures = {a for a, _ in pretrained.PRETRAINED}
    theirs = {(a, t): cfg for a, tags in _PRETRAINED.items() if a in architectures for t, cfg in tags.items()}
    assert set(theirs) == set(pretrained.PRETRAINED)
    for key, row in pretrained.PRETRAINED.items():
        cfg = theirs[key]
        # the tag's quick_gelu, or the architecture's own (roberta-ViT-B-32's config sets it)
        quick = cfg.get("quick_gelu") or open_clip.get_model_config(key[0]).get("quick_gelu")
        assert row.activation == (QUICK_GELU if quick else GELU), key
        assert row.source in (cfg["url"], "hf-hub:" + cfg["hf_hub"].rstrip("/")), key
        if row.source.startswith("https://openaipublic"):
            assert len(row.sha256) == 64 and row.source == cfg["url"], key
    # Every OpenAI-style architecture of open_clip with pretrained weights is here (not the -quickgelu copies,
    # CoCa), and every SigLIP / SigLIP 2, CLIPA and MetaCLIP 2 "worldwide" architecture with pretrained weights.
    siglips = {a for a, _ in open_clip.list_pretrained() if "SigLIP" in a}
    clipas = {a for a, _ in open_clip.list_pretrained() if "CLIPA" in a}
    worldwide = {a for a, _ in open_clip.list_pretrained() if "worldwide" in a and not a.endswith("-quickgelu")}
    assert len(siglips) == 26 and len(clipas) == 6 and len(worldwide) == 4
    # ConvNeXt, EVA, ViTamin, PE-Core and MobileCLIP (nets/zoo_rows.py): every architecture of theirs with
    # pretrained weights.
    zoo = {a for a, _ in open_clip.list_pretrained()
           if a.startswith(("convnext_", "EVA", "ViTamin", "PE-Core", "MobileCLIP"))}
    assert len(zoo) == 13 + 15 + 5 + 9
    # open_clip's HFTextEncoder models (nets/hf_rows.py).
    hf_text = {a for a, _ in open_clip.list_pretrained() if "roberta" in a or a.startswith("nllb-clip")}
    assert len(hf_text) == 7
    cocas = {a for a, _ in open_clip.list_pretrained() if a.startswith("coca_")}
    assert cocas == {"coca_ViT-B-32", "coca_ViT-L-14"}
    assert architectures == {"RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-32-256",
                             "ViT-B-16", "ViT-B-16-plus-240", "ViT-L-14", "ViT-L-14-336", "ViT-H-14",
                             "ViT-H-14-378", "ViT-g-14", "ViT-bigG-14"} | siglips | clipas | zoo | hf_text | cocas \
                             | worldwide
    assert open_clip.__version__.startswith("3.")


def _open_clip_config(config) -> bytes:
    """open_clip's own description of a config, as its hub repos carry one beside the weights."""
    v, t = config.vision, config.text
    return json.dumps({"model_cfg": {
        "embed_dim": config.embed_dim, "quick_gelu": True,
        "vision_cfg": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width, "layers": v.layers,
                       "head_width": v.width // v.heads},
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                     "heads": t.heads, "layers": t.layers}}}).encode()


def _torch_bytes(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _hub_files(repo: str, files: dict[str, bytes]) -> dict[str, bytes]:
    return {f"/{repo}/resolve/main/{name}": body for name, body in files.items()}


def test_hub_repos_in_open_clip_and_transformers_layouts_through_a_fake_endpoint(env, monkeypatch, tmp_path):
    torch.manual_seed(2)
    small = build_model(SMALL).state_dict()
    hf = _hf_clip(SMALL, build_model(SMALL).state_dict())  # other weights than the open_clip repo's
    hf.save_pretrained(tmp_path / "hf")
    local_hf, _ = load_model(tmp_path / "hf", "auto")
    open_clip_config = _open_clip_config(SMALL)
    tiny = build_model(get_config("tiny/VIT-T-8")).state_dict()
    monkeypatch.setitem(pretrained.PRETRAINED, ("tiny/VIT-T-8", "hubtag"),
                        Pretrained("tiny/VIT-T-8", "hubtag", "hf-hub:org/tiny", QUICK_GELU))
    files = {**_hub_files("org/oc", {"open_clip_config.json": open_clip_config,
                                     "open_clip_model.safetensors": save_safetensors(small)}),
             **_hub_files("org/hf", {name: (tmp_path / "hf" / name).read_bytes()
                                     for name in ("config.json", "model.safetensors")}),
             **_hub_files("org/tiny", {"open_clip_config.json": _open_clip_config(get_config("tiny/VIT-T-8")),
                                       "open_clip_pytorch_model.bin": _torch_bytes(tiny)}),
             **_hub_files("org/down", {"open_clip_config.json": 503})}
    with serve(files) as (server, base):
        monkeypatch.setenv("HF_ENDPOINT", base)
        model, phi = load_model("hf-hub:org/oc", "auto")
        _same_weights(model, small)
        # open_clip's layout is found first; its safetensors file is taken, the .bin is never asked for.
        assert {r.rsplit("/", 1)[-1] for r in server.requests if r.startswith("/org/oc")} == {
            "open_clip_config.json", "open_clip_model.safetensors"}
        model, _ = load_model("hf-hub:org/hf", "auto")
        _same_weights(model, local_hf.state_dict())
        asked = {r.rsplit("/", 1)[-1] for r in server.requests if r.startswith("/org/hf")}
        assert asked == {"open_clip_config.json", "config.json", "model.safetensors", "preprocessor_config.json"}
        with pytest.raises(UserError, match="hub repo org/none has neither open_clip_config.json"):
            load_model("hf-hub:org/none", "auto")
        # A tag whose source is a hub repo; its .bin is taken when the repo has no safetensors file.
        _same_weights(load_model("hubtag", "tiny/VIT-T-8")[0], tiny)
        # One named file, and a pinned revision.
        _same_weights(load_model("hf-hub:org/oc/open_clip_model.safetensors", "auto")[0], small)
        _same_weights(load_model("hf-hub:org/oc@main", "auto")[0], small)
        with pytest.raises(UserError, match="hub repo org/oc has no file nothing.bin"):
            load_model("hf-hub:org/oc/nothing.bin", "auto")
        started = time.monotonic()  # a hub that is down is reported at once, not retried with backoff
        with pytest.raises(DownloadError, match=r"could not fetch org/down/open_clip_config.json \(HTTP 503 from"):
            load_model("hf-hub:org/down", "auto")
        assert time.monotonic() - started < TIMEOUT_S
    # The server is gone: both load from huggingface_hub's cache, without its retries with backoff (which waited
    # 23 s on the transformers repo's missing open_clip_config.json before download.py asked once first).
    started = time.monotonic()
    _same_weights(load_model("hf-hub:org/oc", "auto")[0], small)
    _same_weights(load_model("hf-hub:org/hf", "auto")[0], local_hf.state_dict())
    assert time.monotonic() - started < TIMEOUT_S
    # The same repo's files put in a folder by hand load from there.
    by_hand = tmp_path / "by_hand"
    by_hand.mkdir()
    (by_hand / "open_clip_config.json").write_bytes(open_clip_config)
    (by_hand / "open_clip_model.safetensors").write_bytes(save_safetensors(small))
    _same_weights(load_model(by_hand, "auto")[0], small)
    dead = _closed_port()
    monkeypatch.setenv("HF_ENDPOINT", dead)
    with pytest.raises(DownloadError, match=f"could not fetch org/new/open_clip_config.json \\(no answer from "
                                            f"{dead}\\)") as raised:
        load_model("hf-hub:org/new", "auto")
    assert "\n" not in str(raised.value)
