"""Every request the SGLang client sends, checked against SGLang 0.5.23's own types.

SGLang does not install on a CPU machine and its package does not import without its dependencies, so its
source is read instead (``scripts/fetch_sglang_source.py``, run by ``scripts/setup_cpu.sh``, extracts it from
the released wheel): which request struct each HTTP route parses its body into (``@app.post(...)`` handlers'
``obj`` annotation in ``srt/entrypoints/http_server.py``), that struct's fields (``srt/managers/io_struct.py``,
inherited ``BaseReq`` fields included) with ``ast``, the in-process ``Engine``'s method signatures, and the
generated ``/generate`` JSON contract (``api/v1/api_types.py``, loaded as a standalone module: it needs only
msgspec), which is the decoder the server itself runs on a ``/generate`` body.

The client's bodies are captured on the wire: it talks to the fake server (``support.fake_sglang``),
which is given the same field lists and refuses unknown keys, while its transport records each request. Every
route the client calls must be one SGLang serves; every key of a body must be a field of the route's struct
(a route without one takes no body keys); every field without a default must be sent. Nothing here is copied
from SGLang by hand: a field renamed or removed upstream fails this test.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]



def _client_source() -> str:
    """The source of every module of the SGLang client package."""
    return "\n".join(p.read_text() for p in sorted(Path(sglang_mod.__file__).parent.glob("*.py")))

def _load(name: str, path: Path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


fetcher = _load("fetch_sglang_source", ROOT / "scripts" / "fetch_sglang_source.py")
SRC = fetcher.default_dest()
if not fetcher.is_complete(SRC):
    message = (f"SGLang {fetcher.SGLANG_VERSION} sources are not in {SRC}: run "
               "`python scripts/fetch_sglang_source.py` (scripts/setup_cpu.sh does)")
    if os.environ.get("CI"):
        raise RuntimeError(message)  # in CI the setup ran: a missing source is a failure, not a skip
    pytest.skip(message, allow_module_level=True)

from support.sglang import (  # noqa: E402  (the fake server, the tiny model and the client's settings)
    PAD,
    PROMPTS,
    SAMPLING,
    probe_gap,
    stats,
    tiny_qwen3,
    url_cfg,
)

import tempo_mega.rollout.sglang as sglang_mod  # noqa: E402
import tempo_mega.rollout.sglang.transport as sglang_transport  # noqa: E402
import tempo_mega.rollout.sglang.weight_push as weight_push  # noqa: E402
from tempo_mega.rollout.sglang import SGLangRolloutEngine, build_sglang_engine  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- SGLang's source, read
def _tree(rel: str) -> ast.Module:
    return ast.parse((SRC / rel).read_text(), filename=str(SRC / rel))


def _name(node: ast.expr) -> str:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


def struct_fields(tree: ast.Module) -> dict[str, dict[str, bool]]:
    """{class: {field: has a default}} for every class of the module: annotated class attributes (not
    ClassVar), those of its bases defined in the same module first (msgspec Structs and dataclasses both
    inherit fields)."""
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out: dict[str, dict[str, bool]] = {}

    def fields(name: str) -> dict[str, bool]:
        if name in out:
            return out[name]
        node = classes[name]
        got: dict[str, bool] = {}
        for base in node.bases:
            if _name(base) in classes:
                got.update(fields(_name(base)))
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                if "ClassVar" in ast.unparse(stmt.annotation):
                    continue
                got[stmt.target.id] = stmt.value is not None
        out[name] = got
        return got

    for name in classes:
        fields(name)
    return out


def route_structs(tree: ast.Module) -> dict[str, str | None]:
    """{path: the struct its handler parses the body into, or None} for every ``@app.<verb>("/path")``
    handler of http_server.py (the parameter named ``obj``: ``X`` or ``Annotated[X, Body()]``)."""
    routes: dict[str, str | None] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
            continue
        paths = [d.args[0].value for d in node.decorator_list
                 if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and _name(d.func.value) == "app"
                 and d.args and isinstance(d.args[0], ast.Constant) and isinstance(d.args[0].value, str)]
        struct = None
        for arg in node.args.args:
            if arg.arg == "obj" and arg.annotation is not None:
                ann = arg.annotation
                if isinstance(ann, ast.Subscript) and _name(ann.value) == "Annotated":
                    ann = ann.slice.elts[0] if isinstance(ann.slice, ast.Tuple) else ann.slice
                struct = _name(ann) or None
        for path in paths:
            routes[path] = struct
    return routes


def engine_params(tree: ast.Module) -> dict[str, set[str]]:
    """{method: parameter names} of ``class Engine`` in srt/entrypoints/engine.py."""
    (engine,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Engine"]
    out = {}
    for fn in engine.body:
        if isinstance(fn, ast.FunctionDef):
            a = fn.args
            out[fn.name] = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs} - {"self"}
    return out


@pytest.fixture(scope="module")
def sglang_types():
    structs = struct_fields(_tree("sglang/srt/managers/io_struct.py"))
    routes = route_structs(_tree("sglang/srt/entrypoints/http_server.py"))
    sampling = struct_fields(_tree("sglang/srt/sampling/sampling_params.py"))["SamplingParams"]
    pytest.importorskip("msgspec", reason="the generated /generate contract needs msgspec (dev extra)")
    api = _load("sglang_api_v1_types", SRC / "sglang" / "api" / "v1" / "api_types.py")
    return {"structs": structs, "routes": routes, "sampling": sampling, "api": api,
            "engine": engine_params(_tree("sglang/srt/entrypoints/engine.py"))}


def request_fields(types) -> dict[str, set[str]]:
    """{path: allowed body keys} for the fake server: each POST route's struct fields (none: no keys)."""
    out = {path: set(types["structs"].get(struct, {})) if struct else set()
           for path, struct in types["routes"].items()}
    out["sampling_params"] = set(types["sampling"])
    return out


def test_source_reading_finds_what_the_client_relies_on(sglang_types):
    """The readers themselves, on facts of this release (so an empty parse cannot pass the checks below)."""
    routes, structs = sglang_types["routes"], sglang_types["structs"]
    assert routes["/generate"] == "GenerateReqInput"
    assert routes["/update_weights_from_tensor"] == "UpdateWeightsFromTensorReqInput"
    assert routes["/flush_cache"] is None  # its handler takes a query parameter, no body
    assert structs["InitWeightsUpdateGroupReqInput"]["master_address"] is False  # required
    assert structs["AbortReq"]["rid"] is True  # inherited from BaseReq, with a default
    assert "input_ids" in structs["GenerateReqInput"] and "max_new_tokens" in sglang_types["sampling"]
    assert {"tags"} <= sglang_types["engine"]["release_memory_occupation"]
    with pytest.raises(sglang_types["api"].JsonContractError, match="unknown field"):
        sglang_types["api"].GenerateRequest.from_json_value({"input_ids": [1], "sampling_params": {"nope": 1}})


# ----------------------------------------------------------------------------- the client's requests
@pytest.fixture
def wire(monkeypatch):
    """(method, path, body) of every request the client's transport sends."""
    sent: list[tuple[str, str, dict | None]] = []
    real = sglang_transport._Transport.call

    def call(self, url, path, body, timeout_s, method="POST"):
        sent.append((method, path, body))
        return real(self, url, path, body, timeout_s, method=method)

    monkeypatch.setattr(sglang_transport._Transport, "call", call)
    return sent


def check_request(types, method: str, path: str, body: dict | None) -> list[str]:
    """What is wrong with one request by SGLang's types ([] if nothing)."""
    routes, structs = types["routes"], types["structs"]
    if path not in routes:
        return [f"{path}: SGLang {fetcher.SGLANG_VERSION} has no such route"]
    if method == "GET" or body is None:
        return []
    struct = routes[path]
    if struct is None:
        return [f"{path}: takes no body, got keys {sorted(body)}"] if body else []
    fields = structs[struct]
    problems = [f"{path}: {k!r} is not a field of {struct}" for k in body if k not in fields]
    problems += [f"{path}: {struct}'s required field {k!r} is missing" for k, has_default in fields.items()
                 if not has_default and k not in body]
    if path == "/generate":  # the generated contract the server runs on the JSON itself (types too)
        try:
            types["api"].GenerateRequest.from_json_value(body)
        except types["api"].JsonContractError as e:
            problems.append(f"/generate contract: {e}")
    return problems


def test_every_http_request_matches_sglang_types(fake, wire, sglang_types, tensor_sync, monkeypatch):
    """Generation, the probe, every weight-sync mode (disk, tensor, distributed, each with its session
    and cache flush), memory release and resume and abort, against a fake that refuses unknown fields."""
    monkeypatch.setattr(weight_push, "_init_weight_group", lambda *a: None)  # the NCCL side needs GPUs
    monkeypatch.setattr(weight_push.NcclPush, "broadcast_bucket", lambda self, bucket: None)
    server = fake(request_fields=request_fields(sglang_types))
    new = tiny_qwen3(1)
    for mode in ("disk", "tensor", "distributed"):
        eng = build_sglang_engine(url_cfg(server.url, weight_sync=mode, bucket_bytes=4096), pad_token_id=PAD)
        assert len(eng.generate(PROMPTS, 2, SAMPLING)[0]) == 2 * len(PROMPTS)
        eng.release_memory()
        eng.resume_memory()
        eng.update_weights(new.state_dict().items())
        assert probe_gap(eng, new) < 1e-4  # the probe's request
        if mode == "distributed":  # the fake, like SGLang, aborts whatever comes next too: last
            eng.abort()
        eng.shutdown()

    paths = {p for _, p, _ in wire}
    expected = {"/generate", "/update_weights_from_disk", "/update_weights_from_tensor",
                "/update_weights_from_distributed", "/init_weights_update_group", "/begin_weight_update",
                "/end_weight_update", "/flush_cache", "/release_memory_occupation",
                "/resume_memory_occupation", "/abort_request", "/health", "/server_info"}
    assert expected <= paths, f"not exercised: {sorted(expected - paths)}"
    problems = sorted({p for m, path, body in wire for p in check_request(sglang_types, m, path, body)})
    assert not problems, "\n".join(problems)
    assert stats(server.url)["unknown_fields"] == []


def test_client_paths_are_all_covered(sglang_types):
    """Every route literal in the client's source is an SGLang route: a request added to the client but not
    to the test above still has its path checked."""
    tree = ast.parse(_client_source())
    literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                and n.value.startswith("/") and n.value[1:].replace("_", "").isalpha()}
    literals -= {"/get_server_info"}  # the deprecated route of servers older than 0.5.23, tried second
    missing = sorted(p for p in literals if p not in sglang_types["routes"])
    assert not missing, f"routes SGLang {fetcher.SGLANG_VERSION} does not serve: {missing}"


def test_checker_catches_a_renamed_or_missing_field(sglang_types):
    """The check can fail: a key SGLang does not know, a required field left out, a bad /generate type."""
    assert check_request(sglang_types, "POST", "/update_weights_from_distributed",
                         {"names": [], "dtypes": [], "shape": []}) == [
        "/update_weights_from_distributed: 'shape' is not a field of UpdateWeightsFromDistributedReqInput",
        "/update_weights_from_distributed: UpdateWeightsFromDistributedReqInput's required field 'shapes' "
        "is missing"]
    assert check_request(sglang_types, "POST", "/flush_cache", {"timeout": 1}) != []
    assert any("contract" in p for p in check_request(
        sglang_types, "POST", "/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": "8"}}))
    assert check_request(sglang_types, "POST", "/no_such_route", {}) != []


def test_fake_server_refuses_unknown_fields(fake, sglang_types):
    from tempo_mega.rollout.sglang.transport import SGLangServerError, _http

    server = fake(request_fields=request_fields(sglang_types))
    with pytest.raises(SGLangServerError, match="unknown field.*abort_everything"):
        _http(server.url, "/abort_request", {"abort_everything": True}, 5.0)
    with pytest.raises(SGLangServerError, match="sampling_params.max_tokens"):
        _http(server.url, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_tokens": 2}}, 5.0)
    assert stats(server.url)["unknown_fields"] == ["/abort_request: abort_everything",
                                                  "/generate: sampling_params.max_tokens"]


# ----------------------------------------------------------------------------- in-process Engine mode
class _RecordingEngine:
    """Stands in for ``sglang.Engine``: records each method call's keyword arguments and answers success."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)

        def method(**kwargs):
            self.calls.append((name, kwargs))
            if name == "generate":
                n = kwargs["sampling_params"]["n"]
                return [{"output_ids": [1], "meta_info": {"output_token_logprobs": [[-0.5, 1, None]],
                                                          "finish_reason": {"type": "stop"}}}] * n
            return {"success": True, "message": ""}

        return method


def test_engine_mode_calls_match_sglang_engine_signatures(monkeypatch, sglang_types):
    """mode=engine: each call's keyword arguments are parameters of SGLang's ``Engine`` method of that name."""
    rec = _RecordingEngine()
    monkeypatch.setattr(SGLangRolloutEngine, "_make_inprocess_engine", lambda self: rec)
    monkeypatch.setattr(weight_push, "_init_weight_group", lambda *a: None)
    monkeypatch.setattr(weight_push.NcclPush, "broadcast_bucket", lambda self, bucket: None)
    weights = [("w", torch.zeros(2))]
    for mode in ("tensor", "distributed"):
        cfg = sglang_mod.SGLangConfig(model_path="/m", mode="engine", weight_sync=mode, probe=False)
        eng = SGLangRolloutEngine(cfg, pad_token_id=PAD)
        eng.generate(PROMPTS[:1], 2, SAMPLING)
        eng.release_memory()
        eng.resume_memory()
        eng.update_weights(weights)
        eng.shutdown()
    names = {name for name, _ in rec.calls}
    assert {"generate", "update_weights_from_tensor", "update_weights_from_distributed", "flush_cache",
            "init_weights_update_group", "release_memory_occupation", "resume_memory_occupation",
            "begin_weight_update", "end_weight_update"} <= names, names
    params = sglang_types["engine"]
    problems = [f"Engine.{name}: no such method" if name not in params else
                f"Engine.{name}: no parameter {k!r}" for name, kw in rec.calls
                for k in ([None] if name not in params else [k for k in kw if k not in params[name]])]
    assert not problems, "\n".join(sorted(set(problems)))


def test_tensor_serializer_call_matches_sglang():
    """The client calls ``MultiprocessingSerializer.serialize(bucket, output_str=True)``."""
    tree = _tree("sglang/srt/utils/common.py")
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MultiprocessingSerializer"]
    (ser,) = [f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "serialize"]
    assert [a.arg for a in ser.args.args] == ["obj", "output_str"]
    assert "MultiprocessingSerializer.serialize(bucket, output_str=True)" in _client_source()


def test_routed_experts_request_is_sglangs(sglang_types):
    """Routing replay's /generate body (``return_routed_experts``) is SGLang's: a field of its
    GenerateReqInput (the HTTP contract too) and an argument of ``Engine.generate``."""
    from tempo_mega.rollout.base import SamplingParams
    from tempo_mega.rollout.sglang import SGLangConfig
    from tempo_mega.rollout.sglang.engine import SGLangRolloutEngine

    eng = SGLangRolloutEngine(SGLangConfig(model_path="/m", return_routed_experts=True), pad_token_id=0,
                              start=False, moe_shape=(2, 2, 4))
    fields = eng._request_fields(SamplingParams(return_routed_experts=True))
    eng.shutdown()
    assert fields["return_routed_experts"] is True
    body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}, **fields}
    assert check_request(sglang_types, "POST", "/generate", body) == []
    assert set(fields) <= sglang_types["engine"]["generate"]
