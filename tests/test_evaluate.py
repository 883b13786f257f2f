"""COCO evaluation: result conversion against pycocotools, COCOeval on perfect and degraded predictions, CLI."""
from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segment.data import CocoDetection, DatasetError
from segment.data.synthetic import CLASS_NAMES, write_coco_split
from segment.evaluate import STAT_NAMES, category_map, coco_eval, evaluate, format_table, main, to_coco_results
from segment.structures import Instances


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_data")
    # only three of the classes, so category ids (2, 3, 4) differ from labels (1, 2, 3)
    ann_file = write_coco_split(out, "val", 8, size=96, seed=1, classes=["square", "triangle", "star"],
                                progress=False)
    return CocoDetection(out / "val", ann_file)


def _perfect(dataset: CocoDetection, index: int) -> Instances:
    _, target = dataset[index]
    n = len(target["labels"])
    return Instances(image_size=target["orig_size"], boxes=target["boxes"], scores=torch.ones(n),
                     labels=target["labels"], masks=target["masks"].float())


def test_conversion_matches_pycocotools():
    masks = torch.zeros(3, 20, 30)
    masks[0, 2:8, 3:12] = 0.9
    masks[0, 5, 5] = 0.5  # the threshold counts as foreground
    masks[1, 10:18, 20:28] = 0.7
    masks[1, 12:14, 22:24] = 0.49
    masks[2, 0:4, 0:4] = 1.0
    instances = Instances(
        image_size=(20, 30), boxes=torch.tensor([[3.0, 2.0, 12.0, 8.0], [20.5, 10.0, 28.0, 18.25], [0, 0, 4, 4]]),
        scores=torch.tensor([0.9, 0.4, 0.3]), labels=torch.tensor([1, 2, 9]), masks=masks,
    )
    results = to_coco_results([instances], [42], {1: 17, 2: 5})
    assert len(results) == 2  # label 9 has no category: left out
    assert [r["category_id"] for r in results] == [17, 5] and [r["image_id"] for r in results] == [42, 42]
    assert results[0]["bbox"] == [3.0, 2.0, 9.0, 6.0] and results[1]["bbox"] == [20.5, 10.0, 7.5, 8.25]
    assert results[1]["score"] == pytest.approx(0.4)
    for result, prob in zip(results, masks):
        decoded = mask_utils.decode(result["segmentation"])
        np.testing.assert_array_equal(decoded, (prob >= 0.5).numpy().astype(np.uint8))
        expected = mask_utils.encode(np.asfortranarray((prob >= 0.5).numpy().astype(np.uint8)))
        assert result["segmentation"]["counts"] == expected["counts"].decode()
        assert mask_utils.area(result["segmentation"]) == int((prob >= 0.5).sum())
    assert isinstance(results[0]["segmentation"]["counts"], str)  # JSON-serialisable

    no_masks = Instances(image_size=(20, 30), boxes=instances.boxes, scores=instances.scores, labels=instances.labels)
    assert all("segmentation" not in r for r in to_coco_results([no_masks], [1], {1: 1, 2: 2}))


def test_perfect_predictions_score_one(dataset):
    predictions = [_perfect(dataset, i) for i in range(len(dataset))]
    results = to_coco_results(predictions, dataset.image_ids, dataset.label_to_category_id)
    stats = coco_eval(dataset.coco, results, dataset.image_ids, dataset.category_ids)
    assert set(stats) == {f"{t}_{s}" for t in ("bbox", "segm") for s in STAT_NAMES}
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "AR100"):
            assert stats[f"{iou_type}_{name}"] == pytest.approx(1.0), (iou_type, name)


def test_degraded_predictions_score_lower(dataset):
    degraded = []
    for i in range(len(dataset)):
        perfect = _perfect(dataset, i)
        keep = torch.arange(len(perfect)) % 2 == 0  # drop every other object
        shifted = perfect[keep]
        boxes = shifted.boxes + torch.tensor([6.0, 0.0, 6.0, 0.0])
        masks = torch.roll(shifted.masks, shifts=6, dims=2)
        degraded.append(Instances(perfect.image_size, boxes, shifted.scores, shifted.labels, masks))
    results = to_coco_results(degraded, dataset.image_ids, dataset.label_to_category_id)
    stats = coco_eval(dataset.coco, results, dataset.image_ids, dataset.category_ids)
    assert 0.0 < stats["bbox_AP"] < 0.6 and 0.0 < stats["segm_AP"] < 0.6
    assert stats["bbox_AP50"] > stats["bbox_AP75"]
    assert stats["segm_AR100"] < 0.7
    none = coco_eval(dataset.coco, [], dataset.image_ids, dataset.category_ids)
    assert none["bbox_AP"] == 0.0 and none["segm_AP"] == 0.0


def test_no_detections_score_as_cocoeval_scores_them(dataset):
    """They scored 0.000 everywhere; COCOeval gives -1 where an area range has no objects (this set has no large
    ones), so a file that scored -1 with detections scored 0 without."""
    empty = COCO()
    empty.dataset = {"images": dataset.coco.dataset["images"], "categories": dataset.coco.dataset["categories"],
                     "annotations": []}
    empty.createIndex()
    for iou_type in ("bbox", "segm"):
        evaluator = COCOeval(dataset.coco, empty, iou_type)
        evaluator.params.imgIds, evaluator.params.catIds = list(dataset.image_ids), list(dataset.category_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        want = [float(v) for v in evaluator.stats]
        got = coco_eval(dataset.coco, [], dataset.image_ids, dataset.category_ids, iou_types=(iou_type,))
        assert [got[f"{iou_type}_{name}"] for name in STAT_NAMES] == want
        assert -1.0 in want and 0.0 in want


class _Oracle:
    """Stands in for a model: returns the ground truth of whichever image it is given."""

    def __init__(self, dataset: CocoDetection, class_names: list[str]) -> None:
        self.class_names = class_names
        self.answers = {self._key(dataset.load_image(i)): _perfect(dataset, i) for i in range(len(dataset))}
        self.calls = 0

    @staticmethod
    def _key(image: torch.Tensor) -> str:
        return hashlib.sha1(image.numpy().tobytes()).hexdigest()

    def predict(self, frames):
        self.calls += 1
        assert all(f.dtype == torch.uint8 for f in frames)
        return [self.answers[self._key(f)] for f in frames]


def test_evaluate_runs_the_model_and_maps_classes_by_name(dataset):
    names = ["__background__", *dataset.class_names]
    oracle = _Oracle(dataset, names)
    stats = evaluate(oracle, dataset, batch_size=3, progress=False)
    assert oracle.calls == 3 and stats["segm_AP"] == pytest.approx(1.0)
    assert evaluate(oracle, dataset, batch_size=3, max_images=2, progress=False)["bbox_AP"] == pytest.approx(1.0)

    # a model trained on all five shapes: its labels are matched to the dataset's categories by name
    full = ["__background__", *CLASS_NAMES]
    mapping = category_map(full, dataset)
    assert mapping == {CLASS_NAMES.index(n) + 1: cid for n, cid in zip(dataset.class_names, dataset.category_ids)}
    assert category_map(["__background__", "a", "b", "c"], dataset) == dataset.label_to_category_id


def test_evaluate_runs_without_cuda_graphs_and_restores_the_setting(dataset):
    class GraphedOracle(_Oracle):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.cuda_graphs, self.seen = True, set()

        def set_inference_options(self, cuda_graphs=None):
            self.cuda_graphs = cuda_graphs

        def predict(self, frames):
            self.seen.add(self.cuda_graphs)
            return super().predict(frames)

    oracle = GraphedOracle(dataset, ["__background__", *dataset.class_names])
    assert evaluate(oracle, dataset, batch_size=3, progress=False)["segm_AP"] == pytest.approx(1.0)
    assert oracle.seen == {False} and oracle.cuda_graphs is True


def _random_checkpoint(path):
    """A narrow, randomly initialised ResNet-18 FPN Mask R-CNN (its detections mean nothing)."""
    from segment.checkpoint import save_checkpoint
    from segment.model import build_model

    torch.manual_seed(0)
    model = build_model({
        "backbone": "resnet18", "norm": "bn", "num_classes": 4, "class_names": ["__background__", *CLASS_NAMES[1:4]],
        "min_size": 64, "max_size": 128, "fpn_channels": 32, "representation_size": 64, "mask_head_channels": 32,
        "mask_head_layers": 1, "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20,
        "score_threshold": 0.0, "detections_per_img": 5,
    })
    return save_checkpoint(model.eval(), path)


def test_cli_prints_the_table_and_fails_cleanly(dataset, tmp_path, capsys):
    checkpoint = _random_checkpoint(tmp_path / "tiny.pt")
    args = ["--checkpoint", str(checkpoint), "--images", str(dataset.image_dir), "--device", "cpu",
            "--max-images", "2", "--num-workers", "0"]
    assert main([*args, "--annotations", str(dataset.annotation_file)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == list(STAT_NAMES)
    assert [line.split()[0] for line in out[1:]] == ["bbox", "segm"]
    assert all(-1.0 <= float(v) <= 1.0 for line in out[1:] for v in line.split()[1:])

    assert main([*args, "--annotations", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: annotation file not found") and "\n" not in err


@pytest.mark.parametrize("signum, status", [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_cli_stopped_by_a_signal_says_so_in_one_line(dataset, tmp_path, capsys, monkeypatch, unhandled, signum,
                                                     status):
    """A stop signal during an evaluation gave a KeyboardInterrupt traceback (SIGINT) or a silent end (SIGTERM,
    SIGHUP): it now gives the other command lines' one line and 128 + its number (it writes nothing)."""
    import signal

    import segment.evaluate
    from tests.helpers_process import stop_after

    stop_after(monkeypatch, segment.evaluate, "evaluate", signum=getattr(signal, signum))
    checkpoint = _random_checkpoint(tmp_path / "tiny.pt")
    args = ["--checkpoint", str(checkpoint), "--images", str(dataset.image_dir), "--device", "cpu",
            "--max-images", "1", "--num-workers", "0", "--annotations", str(dataset.annotation_file)]
    assert main(args) == status
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: interrupted: nothing written"


def test_a_sigterm_to_the_workers_too_is_one_line(dataset, tmp_path):
    """`timeout` and job schedulers send SIGTERM to the whole process group: a loader worker died of it, and the
    evaluation printed "DataLoader worker ... is killed by signal" tracebacks (exit 1 at times) around its line.
    Then a worker stopped at its signal, and an evaluation that came to the loader before it came to its own signal
    (a loaded machine) failed to fetch the batch the worker had queued (FileNotFoundError: its tensors are shared by
    file descriptor, from the worker), exit 1. Here that order is certain: the worker gets SIGTERM as it loads the
    third image, having queued the second batch, which the evaluation takes once that worker has left or has gone
    on; then the evaluation gets its own SIGTERM."""
    import subprocess
    import sys
    import textwrap

    from tests.helpers_process import interruptible_popen
    from tests.train_fixtures import ROOT

    checkpoint = _random_checkpoint(tmp_path / "tiny.pt")
    signalled, went_on = tmp_path / "signalled", tmp_path / "went_on"
    driver = textwrap.dedent(f"""
        import os, pathlib, signal, sys, time
        import segment.evaluate as evaluate
        signalled, went_on = pathlib.Path({str(signalled)!r}), pathlib.Path({str(went_on)!r})
        real = evaluate._Images.__getitem__
        def getitem(self, index):
            if index == 2:  # in the worker, once it has queued the second batch
                signalled.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGTERM)
                went_on.touch()
            return real(self, index)
        def gone(pid):
            stat = pathlib.Path(f"/proc/{{pid}}/stat")
            return not stat.is_file() or stat.read_text().split()[2] == "Z"
        def batches(iterable, **kwargs):  # in place of tqdm: the second batch taken late, then the SIGTERM
            batches = iter(iterable)
            yield next(batches)  # the loader hands the worker its first indices here
            deadline = time.monotonic() + 60
            while not signalled.is_file() or not signalled.read_text():
                assert time.monotonic() < deadline, "no worker loaded the third image"
                time.sleep(0.01)
            worker = int(signalled.read_text())
            deadline = time.monotonic() + 1.5  # half the grace a signalled worker waits (workers.STOP_GRACE_S)
            while not went_on.is_file() and not gone(worker) and time.monotonic() < deadline:
                time.sleep(0.01)
            second = next(batches)
            os.kill(os.getpid(), signal.SIGTERM)
            yield second
        evaluate._Images.__getitem__ = getitem
        evaluate.tqdm = batches
        sys.exit(evaluate.main(["--checkpoint", {str(checkpoint)!r}, "--images", {str(dataset.image_dir)!r},
                                "--annotations", {str(dataset.annotation_file)!r}, "--device", "cpu",
                                "--batch-size", "1", "--num-workers", "1"]))
        """)
    child = interruptible_popen([sys.executable, "-c", driver], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    _, err = child.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert child.returncode == 143 and lines == ["error: interrupted: nothing written"], err


def test_table_prints_each_value_under_its_own_column():
    """The CLI's test only sees a header and numbers in range: values printed under the wrong column passed it.
    Every stat here has a value of its own, and each must end where its column's name ends (right-aligned)."""
    stats = {f"{t}_{name}": round(offset + i / 100, 2) for offset, t in ((0.1, "bbox"), (0.5, "segm"))
             for i, name in enumerate(STAT_NAMES)}
    header, *rows = [{word.end(): word.group() for word in re.finditer(r"\S+", line)}  # column end -> word
                     for line in format_table(stats).splitlines()]
    assert list(header.values()) == list(STAT_NAMES)
    assert [row.pop(min(row)) for row in rows] == ["bbox", "segm"]  # each row's name, in front of its values
    for row, iou_type in zip(rows, ("bbox", "segm")):
        assert {header.get(end): value for end, value in row.items()} == {
            name: f"{stats[f'{iou_type}_{name}']:.3f}" for name in STAT_NAMES}, iou_type


def test_cli_precision_overrides_the_checkpoints(dataset, tmp_path, monkeypatch):
    import segment.evaluate
    checkpoint = _random_checkpoint(tmp_path / "tiny.pt")
    seen = []
    monkeypatch.setattr(segment.evaluate, "evaluate", lambda model, *a, **k: seen.append(model.precision) or {})
    monkeypatch.setattr(segment.evaluate, "format_table", lambda stats: "")
    args = ["--checkpoint", str(checkpoint), "--images", str(dataset.image_dir), "--device", "cpu",
            "--annotations", str(dataset.annotation_file)]
    for extra in ([], ["--precision", "bf16"], ["--precision", "auto"]):
        assert main([*args, *extra]) == 0
    assert seen == ["fp32", "bf16", "auto"]  # the tiny checkpoint was saved with the config default, fp32


@pytest.mark.parametrize("setting, message", [
    (["--max-images", "0"], ""), (["--max-images", "-1"], ""), (["--batch-size", "0"], ""),
    (["--num-workers", "-1"], ""), (["--device", "tpu"], "must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--device", "cpu:x"], ""),
    # were refused by the model's config as "segment.score_threshold must be ...", a key this command has not
    (["--score-threshold", "1.5"], "must be a number from 0 to 1, got '1.5'"), (["--score-threshold", "nan"], ""),
])
def test_cli_refuses_bad_settings_before_loading(setting, message, tmp_path, capsys):
    """Zero images printed a table of zeros and exited 0; the others were tracebacks."""
    args = ["--checkpoint", str(tmp_path / "unused.pt"), "--images", str(tmp_path), "--annotations",
            str(tmp_path / "unused.json"), *setting]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert f"argument {setting[0]}: {message}" in capsys.readouterr().err


def test_cli_without_cuda_names_the_device_option_as_typed(tmp_path, capsys, monkeypatch):
    """--device cuda on a machine without CUDA said "use device=auto or device=cpu": the render's setting."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "unused.pt"), "--images", str(tmp_path), "--annotations",
              str(tmp_path / "unused.json"), "--device", "cuda"])
    assert capsys.readouterr().err.endswith("error: argument --device: cuda asked for, but CUDA is not available "
                                            "here: use auto or cpu\n")


def test_cli_nothing_to_evaluate_and_worker_errors_are_one_line(dataset, tmp_path, capsys):
    import json
    import shutil

    checkpoint = _random_checkpoint(tmp_path / "tiny.pt")
    images = tmp_path / "images"
    shutil.copytree(dataset.image_dir, images)
    args = ["--checkpoint", str(checkpoint), "--images", str(images), "--device", "cpu", "--max-images", "2"]
    no_images = tmp_path / "no_images.json"
    no_images.write_text(json.dumps({k: v for k, v in dataset.coco.dataset.items() if k != "images"}))
    assert main([*args, "--annotations", str(no_images)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "has no images" in err and "\n" not in err

    # raised in a DataLoader worker, which wraps it in the worker's whole traceback (a missing file is found when
    # the dataset is built: a broken one only when it is read)
    (images / dataset.coco.imgs[dataset.image_ids[1]]["file_name"]).write_bytes(b"not a png")
    assert main([*args, "--annotations", str(dataset.annotation_file), "--num-workers", "1"]) == 2
    err = capsys.readouterr().err.strip()  # the progress bar's lines, then the error
    assert err.splitlines()[-1].startswith("error: cannot decode image ") and "Traceback" not in err

    with pytest.raises(DatasetError, match="no images to evaluate"):
        evaluate(_Oracle(dataset, ["__background__", *dataset.class_names]), dataset, max_images=0, progress=False)
