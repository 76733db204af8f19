"""Shared fixtures: real (tiny) models and real images, through the production code path."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The shared cache (models, embeddings) of the whole test session: never the user's own.
_SHARED_CACHE = tempfile.mkdtemp(prefix="neuroviz-shared-test-")
os.environ["NEUROVIZ_SHARED_CACHE"] = _SHARED_CACHE
atexit.register(shutil.rmtree, _SHARED_CACHE, True)

APP_PATH = Path(__file__).resolve().parent.parent / "app.py"
SKIMAGE_SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "horse", "immunohistochemistry")
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30)}
SHAPES = ("square", "circle")


def make_shape_images(folder: Path, per_combo: int = 4, size: int = 64, seed: int = 0) -> list[tuple[Path, str]]:
    """Coloured squares and circles on grey: a probe set whose concepts we know."""
    rng = np.random.default_rng(seed)
    out = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            sub = folder / f"{colour} {shape}"
            sub.mkdir(parents=True, exist_ok=True)
            for i in range(per_combo):
                img = Image.new("RGB", (size, size), (128, 128, 128))
                draw = ImageDraw.Draw(img)
                r = int(rng.integers(size // 5, size // 3))
                cx, cy = rng.integers(r, size - r, 2)
                box = (cx - r, cy - r, cx + r, cy + r)
                (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=rgb)
                path = sub / f"{i}.png"
                img.save(path)
                out.append((path, f"{colour} {shape}"))
    return out


def save_skimage_samples(folder: Path) -> list[Path]:
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SKIMAGE_SAMPLES:
        arr = getattr(data, name)()
        img = Image.fromarray(arr).convert("RGB")
        img.thumbnail((256, 256))
        path = folder / f"{name}.png"
        img.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """32 coloured shapes (in labelled sub-folders) + 8 real scikit-image photos."""
    root = tmp_path_factory.mktemp("probe")
    make_shape_images(root / "shapes")
    save_skimage_samples(root / "photos")
    return root


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory, image_folder):
    """A real store: random ResNet-18 at 64 px, layers layer2/layer4/fc over image_folder, k=10.

    Returns a dict with store, model, probe_set and runs (layer name -> RunInfo).
    """
    from neuroviz import datasets, extract, models
    from neuroviz.store import Store

    store = Store(tmp_path_factory.mktemp("cache"))
    model = models.create("torchvision:resnet18@random", image_size=64)
    ps = datasets.from_folder(image_folder, cache_dir=store.root)
    runs = extract.extract(model, ps, ["layer2", "layer4", "fc"], store, k=10, batch_size=16, chunk_size=16)
    return {"store": store, "model": model, "probe_set": ps, "runs": {r.layer: r for r in runs}}


def make_tiny_llama(folder: Path, words, max_positions: int = 256) -> Path:
    """A randomly initialised 2-layer Llama with a word-level tokenizer over ``words``,
    saved like a hub model: the transformers language-model path, in milliseconds."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_positions,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_blip(folder: Path) -> Path:
    """A randomly initialised 1-layer BLIP with a 17-word vocabulary, saved like a hub model
    (the transformers captioner path in about a second). Returns the model folder."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red", "square", "the", "on", "table", "rocket"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True, model_max_length=32)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return folder / "model"


class FakeOpenAIServer:
    """A tiny local server that answers like the OpenAI API (and logs what it was sent)."""

    def __init__(self):
        import http.server
        import json
        import threading

        requests = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                requests.append((self.path, dict(self.headers), body))
                if self.path == "/v1/chat/completions":
                    text = f"echo:{body['messages'][0]['content']}|seed={body['seed']}|t={body['temperature']}"
                    reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
                elif self.path == "/v1/completions" and body.get("echo"):
                    if body["model"] == "chat-only":
                        return self._send(400, {"error": {"message": "echo is not supported"}})
                    reply = {"choices": [{"index": i, "text": p, "logprobs": {"tokens": p.split(),
                             "token_logprobs": [None] + [-float(len(w)) for w in p.split()[1:]]}} for i, p in enumerate(body["prompt"])]}
                elif self.path == "/v1/completions":
                    reply = {"choices": [{"index": 0, "text": f" continued {body['prompt']}"}]}
                else:
                    return self._send(404, {"error": "no such route"})
                self._send(200, reply)

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def dashboard_env(mp: pytest.MonkeyPatch, cache_root) -> None:
    """The environment every AppTest of the dashboard runs in: this cache, bugs raise
    (``at.exception``) instead of becoming polite messages, no owner password (local: open)."""
    mp.setenv("NEUROVIZ_CACHE", str(cache_root))
    mp.setenv("NEUROVIZ_UI_RAISE", "1")
    mp.delenv("NEUROVIZ_OWNER_PASSWORD", raising=False)


def open_page(page: str, timeout: float = 120, **query):
    """The app with ``query`` in the URL, run once through app.py, then switched to ``page``."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP_PATH), default_timeout=timeout)
    for key, value in query.items():
        at.query_params[key] = str(value)
    at.run()
    return at.switch_page(page).run()
