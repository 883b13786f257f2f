"""ThreadStream and the stage timing on CUDA streams: each pipeline thread waits for its own GPU work only, a
batch leaves a thread with its work done, and memory a thread drops is not reused under its queued kernels."""
from __future__ import annotations

import time
from fractions import Fraction

import pytest
import torch

from pipeline.record import FrameRecord, StylizedRegion
from pipeline.stage_timing import timed
from pipeline.thread_stream import ThreadStream
from segment.roi_masks import RoIMasks
from segment.structures import Instances

LONG_SLEEP = 2_000_000_000   # GPU cycles: about a second, far longer than any host step below
SHORT_SLEEP = 20_000_000


def _record(image: torch.Tensor) -> FrameRecord:
    return FrameRecord(index=0, pts=0, time_base=Fraction(1, 25), image=image)


def _cuda(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("CUDA streams: run with --device cuda")


def test_a_record_lists_every_tensor_it_holds_and_a_cpu_run_is_the_step():
    record = _record(torch.zeros(3, 4, 5, dtype=torch.uint8))
    record.instances = Instances((4, 5), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, dtype=torch.int64),
                                 torch.zeros(2, 4, 5))
    record.track_ids, record.keep = torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.bool)
    record.stylized = [StylizedRegion(0, "a", (0, 0, 2, 2), torch.zeros(3, 2, 2)),
                       StylizedRegion(1, "b", (1, 1, 3, 3), torch.zeros(3, 2, 2))]
    record.output = torch.zeros(3, 4, 5, dtype=torch.uint8)
    expected = [record.image, record.instances.boxes, record.instances.scores, record.instances.labels,
                record.instances.masks, record.track_ids, record.keep, record.stylized[0].pixels,
                record.stylized[1].pixels, record.output]
    assert [id(t) for t in record.tensors()] == [id(t) for t in expected]
    assert list(_record(torch.zeros(3, 2, 2)).tensors())[0].shape == (3, 2, 2)

    # a background style's frame and the render's RoIMasks (four tensors of their own) are held too
    record.background = torch.zeros(3, 4, 5)
    record.instances = Instances((4, 5), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, dtype=torch.int64),
                                 RoIMasks.from_probs(torch.ones(2, 28, 28), torch.tensor([[0., 0., 2., 2.]] * 2),
                                                     (4, 5)))
    masks = record.instances.masks
    expected = [record.image, record.instances.boxes, record.instances.scores, record.instances.labels,
                masks.grids, masks.boxes, masks.clipped, masks.scale, record.track_ids, record.keep,
                record.stylized[0].pixels, record.stylized[1].pixels, record.background, record.output]
    assert [id(t) for t in record.tensors()] == [id(t) for t in expected]

    stream = ThreadStream(torch.device("cpu"))
    assert stream.stream is None
    assert stream.run(lambda batch: batch[:1], [record, record]) == [record]


def test_a_batch_leaves_with_its_own_work_done_without_waiting_for_other_threads(device):
    _cuda(device)
    own, other = ThreadStream(device), torch.cuda.Stream(device)

    def step(batch):
        assert torch.cuda.current_stream(device) == own.stream
        torch.cuda._sleep(SHORT_SLEEP)
        batch[0].output = batch[0].image + 1
        return batch

    frames = [_record(torch.zeros(3, 8, 8, dtype=torch.uint8, device=device))]
    own.run(step, frames)   # the first launch of a kernel loads it, which waits for the whole device
    with torch.cuda.stream(other):
        torch.cuda._sleep(LONG_SLEEP)   # another thread's long kernel
    out = own.run(step, frames)
    assert own.stream.query(), "the step's own work is done when run returns"
    assert not other.query(), "run waited for another stream's work"
    assert torch.cuda.current_stream(device) == torch.cuda.default_stream(device)
    assert out[0].output.sum().item() == 3 * 8 * 8
    other.synchronize()


def test_stage_timing_waits_for_its_own_stream_only(device):
    _cuda(device)
    other, own = torch.cuda.Stream(device), torch.cuda.Stream(device)
    batch = [_record(torch.zeros(3, 8, 8, dtype=torch.uint8, device=device))]
    torch.cuda._sleep(1)   # loaded before the other stream's long kernel is queued (loading waits for the device)
    with torch.cuda.stream(other):
        torch.cuda._sleep(LONG_SLEEP)
    with torch.cuda.stream(own):
        with timed(batch, "segment"):
            torch.cuda._sleep(SHORT_SLEEP)
    assert own.query() and not other.query()
    assert batch[0].timings["segment"] > 0
    other.synchronize()


def _double_while_the_producer_makes_the_next_frame(run, producer: ThreadStream, device) -> int:
    """Runs, via `run`, a consumer step that queues (behind a long kernel) a read of the record's image, drops
    the image while that read waits, and lets the producer's stream allocate and fill a frame of the same size
    meanwhile. Returns what the read saw: 2 * 7 unless the producer's new frame took the image's memory."""
    with producer.active():
        image = torch.full((3, 1024, 1024), 7, dtype=torch.uint8, device=device)
    producer.synchronize()
    batch = [_record(image)]
    del image
    next_frame = []

    def step(batch):
        torch.cuda._sleep(LONG_SLEEP // 4)
        batch[0].image = batch[0].image * 2   # queued behind the sleep; drops the last reference to the old image
        with producer.active():
            next_frame.append(torch.full((3, 1024, 1024), 1, dtype=torch.uint8, device=device))
        return batch

    out = run(step, batch)
    torch.cuda.synchronize(device)
    return int(out[0].image.max().item())


def test_memory_a_thread_drops_is_not_reused_under_its_queued_kernels(device):
    _cuda(device)
    producer = ThreadStream(device)
    consumer = ThreadStream(device)
    assert _double_while_the_producer_makes_the_next_frame(consumer.run, producer, device) == 14

    def unmarked(step, batch):  # the same stream switch without record_stream: shows the race the test guards
        with consumer.active():
            return step(batch)
    assert _double_while_the_producer_makes_the_next_frame(unmarked, producer, device) == 2, \
        "without record_stream the producer's next frame no longer reuses the memory: this test shows nothing"


def test_a_blocks_time_is_shared_evenly_over_its_batch():
    batch = [_record(torch.zeros(3, 2, 2, dtype=torch.uint8)) for _ in range(4)]
    batch[0].timings["segment"] = 1.0  # a stage's time adds to what the record already holds
    start = time.perf_counter()
    with timed(batch, "segment"):
        time.sleep(0.2)
    elapsed = time.perf_counter() - start
    shares = [record.timings["segment"] for record in batch]
    shares[0] -= 1.0
    # the shares add up to the block's time, which lies within the time measured around it (a busy machine
    # only lengthens both)
    assert 0.2 <= sum(shares) <= elapsed + 1e-9
    assert max(shares) - min(shares) < 1e-9
