"""What the heads' fast paths know about how they run (models/trace_state.py): inside one
sampler call the export state is read once, at its start, and what can begin inside a
call (a ``jit`` trace, a compiler's trace) is still seen at each op."""

from __future__ import annotations

import torch

from ate_fast.models import trace_state


def _counting_onnx_query(monkeypatch, answer: bool) -> list[int]:
    asked: list[int] = []

    def is_in_onnx_export() -> bool:
        asked.append(1)
        return answer

    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", is_in_onnx_export)
    return asked


def test_a_sampler_call_reads_the_export_state_once(monkeypatch):
    asked = _counting_onnx_query(monkeypatch, False)
    assert not trace_state.exporting_graph() and len(asked) == 1  # outside a call: each op
    with trace_state.sampler_call():
        at_start = len(asked)
        for _ in range(5):
            assert not trace_state.exporting_graph()
            assert trace_state.opaque_ops_may_run(torch.ones(2))
        with trace_state.sampler_call():  # nested: the outer call's reading stands
            assert not trace_state.capturing_graph()
        assert len(asked) == at_start
    assert not trace_state.exporting_graph() and len(asked) == at_start + 1


def test_a_call_inside_an_export_asks_at_each_op(monkeypatch):
    asked = _counting_onnx_query(monkeypatch, True)
    with trace_state.sampler_call():
        assert trace_state.exporting_graph() and trace_state.capturing_graph()
        assert not trace_state.opaque_ops_may_run(torch.ones(2))
        assert trace_state.exporting_graph()
    assert len(asked) == 5  # the call's start, then each of the four queries


def test_traces_that_begin_inside_a_call_are_seen():
    """``jit.trace`` and ``torch.compile`` inside a call: the trace sees the export /
    capture state it is in, not the call's reading."""
    with trace_state.sampler_call():
        traced = torch.jit.trace(lambda x: x + float(trace_state.exporting_graph()), torch.zeros(1))
        assert traced(torch.zeros(1)).item() == 1.0
        compiled = torch.compile(
            lambda x: x + float(trace_state.capturing_graph()), backend="eager", fullgraph=True
        )
        assert compiled(torch.zeros(1)).item() == 1.0
