"""Tests for moas.models.dataflow: ordering, wiring, errors, parameters and thread-safety."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from moas.errors import DataFlowError
from moas.models.dataflow import DataFlow


class Linear(nn.Module):
    """Stage with a named input so it can be wired by keyword."""

    def __init__(self, key: str, dim: int = 4) -> None:
        super().__init__()
        self.key = key
        self.proj = nn.Linear(dim, dim)

    def forward(self, **kwargs: torch.Tensor) -> torch.Tensor:
        return self.proj(kwargs[self.key])


def original_flow() -> DataFlow:
    """The original system's wiring: gnn -> structure(embedding) -> line_art and background."""
    torch.manual_seed(0)
    flow = DataFlow()
    # Registered out of dependency order on purpose: the plan must sort them.
    flow.register_module("line_art", Linear("structure"), inputs=["structure"], outputs=["line_art"])
    flow.register_module("background", Linear("structure"), inputs=["structure"], outputs=["background"])
    flow.register_module("structure", Linear("embedding"), inputs=["embedding"], outputs=["structure"])
    flow.register_module("gnn", Linear("graph"), inputs=["graph"], outputs=["graph_features"])
    flow.connect("gnn", "graph_features", "structure", "embedding")
    return flow


def test_order_resolution_with_connect() -> None:
    flow = original_flow()
    order = flow.modules_in_order()
    assert order == ["gnn", "structure", "line_art", "background"]  # ties keep registration order
    x = torch.randn(2, 4)
    out = flow(graph=x)
    gnn = flow.get_module("gnn")
    structure = flow.get_module("structure")
    expected_structure = structure(embedding=gnn(graph=x))
    assert torch.allclose(out["structure"], expected_structure)
    assert torch.allclose(out["line_art"], flow.get_module("line_art")(structure=expected_structure))
    assert torch.equal(out["gnn.graph_features"], out["graph_features"])
    assert torch.equal(out["graph"], x)
    assert {"background", "background.background", "line_art.line_art"} <= set(out)


def test_new_module_by_registration_alone_changes_output() -> None:
    flow = original_flow()
    x = torch.randn(2, 4)
    before = flow(graph=x)
    line_art = flow.get_module("line_art")
    line_art_params = [p.clone() for p in line_art.parameters()]

    # A colour stage that consumes line_art by name: no connect(), no change to other modules.
    flow.register_module(
        "color",
        lambda line_art, background: {"image": line_art + background, "alpha": line_art.sigmoid()},
        inputs=["line_art", "background"],
        outputs=["image", "alpha"],
    )
    after = flow(graph=x)
    assert "image" not in before
    assert torch.allclose(after["image"], after["line_art"] + after["background"])
    assert torch.allclose(after["line_art"], before["line_art"])
    assert flow.modules_in_order()[-1] == "color"
    assert all(torch.equal(a, b) for a, b in zip(line_art_params, line_art.parameters(), strict=True))

    flow.unregister_module("color")
    assert "color" not in flow and "image" not in flow(graph=x)


def test_required_outputs_prunes() -> None:
    calls: list[str] = []

    def stage(name: str, key: str):  # noqa: ANN202 - tiny factory
        def fn(**kw: float) -> float:
            calls.append(name)
            return kw[key] + 1

        return fn

    flow = DataFlow()
    flow.register_module("a", stage("a", "x"), ["x"], ["y"])
    flow.register_module("b", stage("b", "y"), ["y"], ["z"])
    flow.register_module("c", stage("c", "y"), ["y"], ["w"])
    out = flow(x=1, required_outputs=["z"])
    assert calls == ["a", "b"] and out["z"] == 3 and "w" not in out
    calls.clear()
    # An external value for y makes its producer unnecessary.
    assert flow(y=10, required_outputs=["c.w"])["w"] == 11 and calls == ["c"]
    with pytest.raises(DataFlowError):
        flow(x=1, required_outputs=["nope"])


def test_cycle_error_names_modules() -> None:
    flow = DataFlow()
    flow.register_module("src", lambda x: x, ["x"], ["a"])
    flow.register_module("p", lambda a, r: a + r, ["a", "r"], ["q"])
    flow.register_module("r", lambda q: q, ["q"], ["r"])
    with pytest.raises(DataFlowError) as info:
        flow(x=1)
    msg = str(info.value)
    assert "cycle" in msg and "p" in msg and "r" in msg and "src" not in msg
    assert "INVALID" in flow.describe()


def test_missing_input_error_names_module_and_key() -> None:
    flow = original_flow()
    with pytest.raises(DataFlowError) as info:
        flow(not_graph=torch.zeros(1, 4))
    assert "'gnn'" in str(info.value) and "'graph'" in str(info.value)


def test_registration_errors() -> None:
    flow = original_flow()
    with pytest.raises(DataFlowError):
        flow.register_module("gnn", nn.Identity(), ["a"], ["b"])
    for bad in ("", "has.dot", "has space", 3):
        with pytest.raises(DataFlowError):
            flow.register_module(bad, nn.Identity(), ["a"], ["b"])  # type: ignore[arg-type]
    with pytest.raises(DataFlowError):
        flow.register_module("update", nn.Identity(), ["a"], ["b"])  # shadows ModuleDict.update
    with pytest.raises(DataFlowError):
        flow.register_module("dup", nn.Identity(), ["a", "a"], ["b"])
    with pytest.raises(DataFlowError):
        flow.register_module("badkey", nn.Identity(), ["a-b"], ["b"])
    with pytest.raises(DataFlowError):
        flow.connect("gnn", "nope", "structure", "embedding")
    with pytest.raises(DataFlowError):
        flow.connect("ghost", "graph_features", "structure", "embedding")
    with pytest.raises(DataFlowError):
        flow.connect("gnn", "graph_features", "structure", "nope")
    with pytest.raises(DataFlowError):
        flow.connect("line_art", "line_art", "structure", "embedding")  # already connected
    with pytest.raises(DataFlowError):
        flow.unregister_module("ghost")


def test_ambiguous_producer_needs_connect() -> None:
    flow = DataFlow()
    flow.register_module("a", lambda x: x + 1, ["x"], ["v"])
    flow.register_module("b", lambda x: x + 2, ["x"], ["v"])
    flow.register_module("use", lambda v: v * 10, ["v"], ["out"])
    with pytest.raises(DataFlowError) as info:
        flow(x=0)
    assert "several" in str(info.value)
    flow.connect("b", "v", "use", "v")
    out = flow(x=0)
    assert out["out"] == 20 and out["a.v"] == 1 and out["b.v"] == 2


def test_bad_return_values() -> None:
    flow = DataFlow()
    flow.register_module("m", lambda x: {"a": x}, ["x"], ["a", "b"])
    with pytest.raises(DataFlowError, match="'b'"):
        flow(x=1)
    flow2 = DataFlow()
    flow2.register_module("m", lambda x: x, ["x"], ["a", "b"])
    with pytest.raises(DataFlowError):
        flow2(x=1)


def test_parameters_registered_and_gradients_flow() -> None:
    flow = original_flow()
    names = {n for n, _ in flow.named_parameters()}
    assert "stages.gnn.proj.weight" in names and "stages.background.proj.bias" in names
    assert len(list(flow.parameters())) == 8
    out = flow(graph=torch.randn(3, 4))
    (out["line_art"].sum() + out["background"].sum()).backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Saved and restored with the owner.
    clone = original_flow()
    with torch.no_grad():
        for p in clone.parameters():
            p.zero_()
    clone.load_state_dict(flow.state_dict())
    assert torch.equal(clone.get_module("gnn").proj.weight, flow.get_module("gnn").proj.weight)


def test_deepcopy_works() -> None:
    flow = original_flow()
    twin = copy.deepcopy(flow)  # EMA copies rely on this despite the lock
    x = torch.randn(1, 4)
    assert torch.allclose(twin(graph=x)["background"], flow(graph=x)["background"])
    twin.register_module("extra", lambda background: background, ["background"], ["extra"])
    assert "extra" in twin and "extra" not in flow


def test_thread_safety_smoke() -> None:
    flow = DataFlow()
    flow.register_module("base", lambda x: x * 2, ["x"], ["y"])
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            for j in range(25):
                name = f"w{i}_{j}"
                flow.register_module(name, lambda y, k=j: y + k, ["y"], [f"out_{i}_{j}"])
                out = flow(x=1)
                assert out["y"] == 2 and out[f"out_{i}_{j}"] == 2 + j
                flow.modules_in_order()
                if j % 2:
                    flow.unregister_module(name)
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(flow) == 1 + 8 * 13


def test_describe_lists_modules_and_connections() -> None:
    flow = original_flow()
    text = flow.describe()
    for name in ("gnn", "structure", "line_art", "background"):
        assert name in text
    assert "embedding <- gnn.graph_features (connected)" in text
    assert "structure <- structure.structure (by name)" in text
    assert "graph <- external input" in text
    assert text.index("1. gnn") < text.index("2. structure") < text.index("3. line_art")
