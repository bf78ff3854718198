"""A call captured in a CUDA graph, for the benchmark suites' ``*_graph`` rows."""

import torch


def graphed(fn):
    """``fn`` (no arguments) captured once in a ``torch.cuda.CUDAGraph`` after a side-stream
    warm-up; the returned callable replays it and returns the captured output — what a
    captured sampler runs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up off the capture stream (allocator, cuBLAS handles)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return lambda: (graph.replay(), out)[1]
