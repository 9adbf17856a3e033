"""Hostile .skpc files: crafted as an attacker would (checksum recomputed), they must never run
code, and must be refused with CorruptModelError / IncompatibleModelError rather than failing late."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import skpatchcore
from skpatchcore import CorruptModelError, IncompatibleModelError, make_patchcore
from skpatchcore.io.model_graph import audit_source, is_keyword_name, is_module_path

from _helpers import rewrite_model_file

NAMED_ERRORS = (CorruptModelError, IncompatibleModelError)
#: Audit events that mean "code from the file ran".
_FORBIDDEN_EVENTS = ("os.system", "subprocess.Popen", "os.posix_spawn", "os.exec", "os.spawn", "os.fork")
_events: list = []


def _audit(event, args):
    if event in _FORBIDDEN_EVENTS or (
            event == "exec" and args and hasattr(args[0], "co_names")
            and {"__import__", "system", "eval", "exec", "open", "popen"} & set(args[0].co_names)):
        _events.append(event)


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one only records


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def fitted(images):
    return make_patchcore(backbone="resnet18", weights=None, resize=64, crop_size=None, random_state=0,
                          sampling_ratio=0.5).fit(images)


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    return skpatchcore.save(fitted, tmp_path_factory.mktemp("secure") / "model.skpc")


@pytest.fixture(scope="module")
def expected_scores(fitted, images):
    return fitted.score_samples(images[:1])


def _graph(description):
    return description["estimator"]["steps"][0][1]["fitted"]["backbone_"]["graph"]


def _first(nodes, op):
    return next(node for node in nodes if node["op"] == op)


def _payload(marker):
    return f"__import__('os').system('touch {marker}')"


# Each edit plants a payload that touches the marker file if it ever runs.
EDITS = {
    "keyword name": lambda g, p: _first(g["nodes"], "call_module").update(
        kwargs={"dict": {f"**{{}}) if not {p} else dict(_k": 1}}),
    "keyword name of a function": lambda g, p: g["nodes"].insert(len(g["nodes"]) - 1, {
        "op": "call_function", "target": "torch.add", "args": {"tuple": [{"node": 1}, {"node": 1}]},
        "kwargs": {"dict": {f"alpha=1) if {p} else (_k": 1}}}),
    "module target": lambda g, p: _first(g["nodes"], "call_module").update(target=f'conv1", {p}) or ("'),
    "module target with a newline": lambda g, p: _first(g["nodes"], "call_module").update(target="conv1\n"),
    "module path": lambda g, p: g["modules"].update({f'x"); {p}; ("': {"class": "Identity", "arguments": {}}}),
    "module path with a newline": lambda g, p: g["modules"].update({"bn1\n": g["modules"]["bn1"]}),
    "method name": lambda g, p: _first(g["nodes"], "call_module").update(op="call_method", target=f"view() or {p}"),
    "function name": lambda g, p: _first(g["nodes"], "call_module").update(op="call_function", target=p),
    "op name": lambda g, p: _first(g["nodes"], "call_module").update(op=p),
    "getattr attribute": lambda g, p: g["nodes"].insert(len(g["nodes"]) - 1, {
        "op": "call_function", "target": "builtins.getattr", "args": {"tuple": [{"node": 1}, f'x"), {p}, ("']},
        "kwargs": {"dict": {}}}),
    "string argument with a newline": lambda g, p: g["nodes"].insert(len(g["nodes"]) - 1, {
        "op": "call_function", "target": "torch._assert", "args": {"tuple": [True, f"x\n{p}"]},
        "kwargs": {"dict": {}}}),
    "node reference": lambda g, p: _first(g["nodes"], "call_module").update(args={"tuple": [{"node": 10**6}]}),
    "attribute path": lambda g, p: g["nodes"].insert(1, {
        "op": "get_attr", "target": "conv1.weight\n", "parameter": True, "args": {"tuple": []},
        "kwargs": {"dict": {}}}),
}


@pytest.mark.parametrize("where", sorted(EDITS))
def test_crafted_graph_strings_are_refused_and_never_run(saved, tmp_path, where, images):
    marker = tmp_path / "PWNED"

    def edit(metadata, description):
        EDITS[where](_graph(description), _payload(marker))

    crafted = rewrite_model_file(saved, tmp_path / "crafted.skpc", edit)
    del _events[:]
    with pytest.raises(NAMED_ERRORS, match="graph"):
        skpatchcore.load(crafted).score_samples(images[:1])
    assert not marker.exists() and not _events


def test_cli_refuses_the_crafted_file_without_running_it(saved, tmp_path, images):
    from PIL import Image

    marker = tmp_path / "PWNED"
    crafted = rewrite_model_file(saved, tmp_path / "crafted.skpc",
                                 lambda m, d: EDITS["keyword name"](_graph(d), _payload(marker)))
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    result = subprocess.run(
        [sys.executable, "-m", "skpatchcore", "score", str(crafted), str(tmp_path / "a.png"), "-o",
         str(tmp_path / "out"), "--no-images"], capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "keyword name" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "out" / "scores.csv").exists()


def test_the_source_audit_refuses_injected_code():
    forward = "def forward(self, x):\n    conv1 = self.conv1(x, **{{}}) if not {} else dict(_k = 1)\n    return conv1\n"
    with pytest.raises(ValueError, match="IfExp|UnaryOp"):
        audit_source(forward.format("__import__('os').system('id')"))
    with pytest.raises(ValueError, match="'__import__'"):
        audit_source("def forward(self, x):\n    y = __import__('os')\n    return y\n")
    with pytest.raises(ValueError, match="call of 'eval'"):
        audit_source("def forward(self, x):\n    y = eval('1')\n    return y\n")
    with pytest.raises(ValueError, match="attribute '__class__'"):
        audit_source("def forward(self, x):\n    y = x.__class__\n    return y\n")
    audit_source('def forward(self, x):\n    a = getattr(self.layer1, "0").conv1(x);  x = None\n    return [a]\n')


def test_strict_grammar_of_paths_and_keyword_names():
    assert is_module_path("layer1.0.conv1") and is_module_path("blocks.4.2.bn3")
    for bad in ("layer1\n", "layer1.", ".a", "a..b", "a.__class__", "a.if", "a b", "a-b", "", 1, None, "é"):
        assert not is_module_path(bad), bad
    assert is_keyword_name("alpha") and is_keyword_name("training")
    for bad in ("**{}) or (x", "a b", "class", "__import__", "1a", "", None):
        assert not is_keyword_name(bad), bad


def _strings(node, path=()):
    """Paths of every string (dict keys and values) in a JSON tree."""
    if isinstance(node, str):
        yield (*path, "value")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _strings(item, (*path, i))
    elif isinstance(node, dict):
        for key, item in node.items():
            yield (*path, key, "key")
            yield from _strings(item, (*path, key))


def _mutate(tree, where, text, position):
    *parents, last = where
    owner = tree
    if last == "key":
        *parents, key = parents
        for step in parents:
            owner = owner[step]
        cut = position % (len(key) + 1)
        owner[key[:cut] + text + key[cut:]] = owner.pop(key)
    else:
        for step in parents[:-1]:
            owner = owner[step]
        old = owner[parents[-1]]
        cut = position % (len(old) + 1)
        owner[parents[-1]] = old[:cut] + text + old[cut:]


INJECTIONS = st.sampled_from([
    "\n", "'", '"', "\\", ")", "**{}", "__class__", "(__import__('os').system('true'))", " or ", "\u2028",
    '", __import__("os").system("true"), "', ";import os;os.system('true')#",
]) | st.text(min_size=1, max_size=8)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutating_any_string_of_the_description_never_runs_code(saved, images, expected_scores, data,
                                                                 tmp_path_factory):
    """Load either refuses the file with a named error or scores exactly as before; nothing runs."""
    description = json.loads(json.loads(
        saved.read_bytes()[8:8 + int.from_bytes(saved.read_bytes()[:8], "little")])["__metadata__"]["model"])
    paths = sorted(_strings(description), key=repr)
    where = data.draw(st.sampled_from(paths), label="string")
    text = data.draw(INJECTIONS, label="inserted")
    position = data.draw(st.integers(0, 100), label="position")
    target = tmp_path_factory.mktemp("mutated") / "m.skpc"
    rewrite_model_file(saved, target, lambda metadata, d: _mutate(d, where, text, position))
    del _events[:]
    try:
        model = skpatchcore.load(target)
    except NAMED_ERRORS:
        pass
    else:
        np.testing.assert_array_equal(model.score_samples(images[:1]), expected_scores)
    assert not _events


def test_deeply_nested_header_is_a_corrupt_model_error(tmp_path):
    header = b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = tmp_path / "nested.skpc"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CorruptModelError, match="nested too deeply"):
        skpatchcore.load(path)


@pytest.mark.parametrize("change, match", [
    (lambda t: t.update({"model.detector.memory_bank_": t["model.detector.memory_bank_"].double()}),
     "memory_bank_ has dtype float64; fit stores float32"),
    (lambda t: t.update({"model.detector.memory_bank_": t["model.detector.memory_bank_"].half()}),
     "memory_bank_ has dtype float16"),
    (lambda t: t["model.detector.memory_bank_"].__setitem__((0, 0), float("nan")), "NaN"),
    (lambda t: t.update({"model.detector.memory_bank_": t["model.detector.memory_bank_"][:, :10].contiguous()}),
     "10 features per row"),
    (lambda t: t.update({"model.detector.memory_bank_": t["model.detector.memory_bank_"].reshape(-1)}),
     "2-D array"),
    (lambda t: t["model.detector.calibration_scores_"].__setitem__(0, float("inf")), "calibration_scores_"),
    (lambda t: t["model.coreset.coreset_indices_"].__setitem__(0, 10**9), "coreset_indices_ holds indices"),
])
def test_tensors_are_checked_against_what_fit_stores(saved, tmp_path, change, match):
    def edit(tensors):
        for name in list(tensors):
            tensors[name] = tensors[name].clone()
        change(tensors)

    with pytest.raises(CorruptModelError, match=match):
        skpatchcore.load(rewrite_model_file(saved, tmp_path / "edited.skpc", change_tensors=edit))


def test_fitted_numbers_are_checked(saved, tmp_path):
    def edit(metadata, description):
        description["estimator"]["steps"][2][1]["fitted"]["offset_"] = float("nan")

    with pytest.raises(CorruptModelError, match="offset_ is nan"):
        skpatchcore.load(rewrite_model_file(saved, tmp_path / "edited.skpc", edit))


def test_model_format_of_the_wrong_type_says_so(saved, tmp_path):
    def edit(metadata, description):
        description["model_format"] = str(description["model_format"])

    with pytest.raises(CorruptModelError, match=r"model format is '\d+' \(a str\), not an integer"):
        skpatchcore.load(rewrite_model_file(saved, tmp_path / "edited.skpc", edit))


def test_untampered_file_still_loads(saved, images, expected_scores):
    assert torch.is_tensor(next(iter(skpatchcore.load(saved)[0].backbone_.state_dict().values())))
    np.testing.assert_array_equal(skpatchcore.load(saved).score_samples(images[:1]), expected_scores)


def test_the_source_audit_allows_only_listed_torch_functions_and_tensor_methods():
    with pytest.raises(ValueError, match="'torch.os.system'"):
        audit_source("def forward(self, x):\n    y = torch.os.system('id')\n    return y\n")
    with pytest.raises(ValueError, match="attribute 'numpy' of 'x'"):
        audit_source("def forward(self, x):\n    y = x.numpy()\n    return y\n")
    audit_source("def forward(self, x):\n    y = torch.nn.functional.relu(x.view(1, -1));  x = None\n"
                 "    z = y.shape\n    return [y, z]\n")


@pytest.mark.parametrize("entry", ["args", "kwargs", "target"])
def test_a_graph_node_missing_or_renaming_an_entry_is_refused(saved, tmp_path, entry):
    # A node whose "args" key was renamed used to load and then call its module without input.
    def rename(metadata, description):
        nodes = description["estimator"]["steps"][0][1]["fitted"]["backbone_"]["graph"]["nodes"]
        node = next(n for n in nodes if n["op"] == "call_module")
        node["\n" + entry] = node.pop(entry)

    with pytest.raises(IncompatibleModelError, match=r"cannot be rebuilt: a call_module node has the entries"):
        skpatchcore.load(rewrite_model_file(saved, tmp_path / "renamed.skpc", rename))
