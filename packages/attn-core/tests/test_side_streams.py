"""attn_core.side_streams.fork_join: independent work on side streams, ordered around the caller's."""

from __future__ import annotations

import pytest
import torch

from attn_core import side_streams


def _writers(x: torch.Tensor, log: list[int]):
    def writer(i: int):
        def fn() -> None:
            log.append(i)
            x[i].add_(x[i] * 0 + i + 1)  # reads and writes only its own row

        return fn

    return [writer(i) for i in range(x.shape[0])]


def test_off_cuda_runs_in_order():
    x, log = torch.zeros(5, 3), []
    side_streams.fork_join(_writers(x, log), torch.device("cpu"), streams=4)
    assert log == [0, 1, 2, 3, 4]
    assert torch.equal(x, torch.arange(1.0, 6.0)[:, None].expand(5, 3))
    side_streams.fork_join([], torch.device("cpu"), streams=4)  # nothing to run


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("streams", [1, 2, 8, 64])
def test_cuda_work_is_ordered_after_and_before_the_current_stream(streams):
    dev = torch.device("cuda")
    x = torch.zeros(12, 1 << 20, device=dev)
    torch.cuda._sleep(50_000_000)  # the fork must wait for this and the fill behind it
    x.fill_(1.0)
    side_streams.fork_join(_writers(x, []), dev, streams)
    total = x.sum(dim=1)  # queued on the current stream: must see every side stream's write
    want = (1.0 + torch.arange(1, 13, device=dev, dtype=torch.float32)) * (1 << 20)
    assert torch.equal(total, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_replays_the_side_work():
    dev = torch.device("cuda")
    x = torch.zeros(6, 1024, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graphs asks
        side_streams.fork_join(_writers(x, []), dev, streams=3)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        side_streams.fork_join(_writers(x, []), dev, streams=3)
    x.zero_()
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(x[:, 0], 2.0 * torch.arange(1, 7, device=dev, dtype=torch.float32))
