"""What the SGLang client's tests share: a tiny Qwen3 the fake server runs, in-process fake servers
(``fake``), the client's settings for them (``url_cfg``), the server's own counters (``stats``), the
controller's post-sync probe (``probe_gap``) and the fake tensor serializer (``tensor_sync``)."""

from __future__ import annotations

import pytest

from support.models import tiny_qwen3 as _tiny_qwen3
from tempo_mega.rollout.base import SamplingParams

VOCAB = 64
PAD = 0
STOP = 7
PROMPTS = [[5, 17, 9], [3, 44, 61, 12, 8], [20, 7, 31], [11, 12]]
SAMPLING = SamplingParams(temperature=1.0, max_response_tokens=6, stop_token_ids=(STOP,))


def tiny_qwen3(seed: int):
    """The model the fake servers run: smaller than the suite's tiny shape (one layer, vocabulary 64) and
    with a peakier init, so a weight push visibly changes the samples."""
    return _tiny_qwen3(seed, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                       tie_word_embeddings=False, initializer_range=0.2, pad_token_id=PAD)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen3")
    tiny_qwen3(0).save_pretrained(path)
    return str(path)


@pytest.fixture
def fake(model_dir):
    """``fake(**knobs)`` starts an in-process fake SGLang server serving ``model_dir``; all stop after the test."""
    from support.fake_sglang import FakeSGLangServer

    servers: list = []

    def make(**knobs):
        s = FakeSGLangServer(model_dir, **knobs)
        s.start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def tensor_sync():
    """weight_sync=tensor on CPU: the client's MultiprocessingSerializer is the fake server's stand-in."""
    from support.fake_sglang import install_fake_serializer, uninstall_fake_serializer

    added = install_fake_serializer()
    yield
    uninstall_fake_serializer(added)


def url_cfg(*urls: str, **kw):
    """An ``SGLangConfig`` that connects to ``urls``, with timeouts short enough for tests."""
    from tempo_mega.rollout.sglang import SGLangConfig

    kw.setdefault("request_timeout_s", 20.0)
    kw.setdefault("health_timeout_s", 10.0)
    kw.setdefault("weight_sync", "disk")
    kw.setdefault("restart_wait_s", 1.0)  # a server that goes away is waited for briefly (default: minutes)
    return SGLangConfig(urls=tuple(urls), **kw)


def stats(url: str) -> dict:
    """The fake server's ``/fake/stats`` (request counts, refusals, released memory tags)."""
    from tempo_mega.rollout.sglang.transport import _http

    return _http(url, "/fake/stats", None, 5.0, method="GET")


def probe_gap(eng, model) -> float:
    """What the controller's post-sync probe measures (``WeightSync.probe``): the largest |engine - trainer|
    log-prob of the engine's probe ids, ``model`` standing for the trainer; raises past the tolerance."""
    from tempo_mega.backends.torch import build_actor
    from tempo_mega.weight_sync import WeightSync

    return WeightSync(build_actor(model), eng, PAD).probe()["rollout/probe_logprob_diff_max"]
