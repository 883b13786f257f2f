#!/usr/bin/env bash
# The GPU checks, in one run on a lent GPU machine (see docs/benchmarks.md for what they gave):
#   the device-sensitive tests on CUDA, then the segment / render / train / stylize benchmarks.
# Usage: bash scripts/device_checks.sh OUT_DIR [STEP...]   (python3 must hold torch with CUDA and our dependencies:
#        packed here beforehand by scripts/pack_gpu_site.sh, carried there with .cache/styles, and unpacked on the
#        GPU machine with `mkdir -p /tmp/site && tar xJf .gpu-wheels/site.tar.xz -C /tmp/site && export
#        PYTHONPATH=/tmp/site`. Every step's whole log goes into OUT_DIR/steps.log, one file: the device tool brings
#        back at most 8 files from OUT_DIR, and quick's eight logs and benchmarks.md lost one)
#        STEP names pick some of the steps below, all by default; FRAMES=N and SIZES="1080p" shorten the renders.
#        `quick` picks the steps a 15-minute device session has time for (about 7 minutes on an H200): the tests, the
#        reference R50 weights, the R50 1080p render as it is, with every speed setting and at batch 8, and where
#        its time goes (each stage's kernel time, the segmenter's front and back).
# Each step has its own time limit so that one slow step cannot starve the rest.
set -u
OUT=${1:?usage: device_checks.sh OUT_DIR [STEP...]}
shift
QUICK="tests r50_reference bench_render_r50 bench_render_r50_every3_propagate_fast bench_render_r50_batch8
    bench_render_r50_kernels profile_segment_render_batch"
ONLY=" $(echo ${*/quick/$QUICK}) "  # unquoted: the list's line breaks become spaces
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2; shift 2
    [[ "$ONLY" == "  " || "$ONLY" == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit}s) $(date +%T)"
    local start=$SECONDS log=$OUT/$name.log
    timeout "$limit" "$@" > "$log" 2>&1
    echo "--- $name: exit $? in $((SECONDS - start)) s"
    tail -n 25 "$log"
    { echo "=== $name"; cat "$log"; } >> "$OUT/steps.log" && rm "$log"
}
nvidia-smi -L
python3 -c "import torch, torchvision, av; print('torch', torch.__version__, 'tv', torchvision.__version__, 'av', av.__version__,
'cuvid/nvenc:', sorted(c for c in av.codecs_available if c.startswith('h264_')))"
ldconfig -p | grep -E "libnvcuvid|libnvidia-encode" || echo "no libnvcuvid / libnvidia-encode in ldconfig"

step 180 tests python3 -m pytest -q -rs --device cuda -p no:cacheprovider tests/test_segment_parity.py \
    tests/test_stylize_parity.py tests/test_colour.py tests/test_render_cli.py tests/test_stylize_apply.py \
    tests/test_decode_encode.py tests/test_encode_colour.py tests/test_composite.py tests/test_track.py \
    tests/test_assign.py tests/test_host_copy.py tests/test_segment_components.py tests/test_thread_stream.py \
    tests/test_roi_masks.py tests/test_stylize_stage.py tests/test_transfer.py tests/test_style_carry.py \
    tests/test_segment_stage.py tests/test_soft_masks.py tests/test_cuda_graph.py \
    tests/test_train_resume.py::test_rngs_kept_on_the_device_under_test \
    tests/test_stylize_train.py::test_new_style_keeps_other_rows_frozen_after_the_network_moves
step 90 bench_stylize python3 scripts/bench_stylize.py --device cuda --profile --layers
step 90 bench_segment python3 scripts/bench_segment.py --devices cuda --image-size 480 640 --batch-sizes 1 8 \
    --precisions ${PRECISIONS:-fp32 bf16} --iterations 5 --warmup 2 --save-reference /tmp/r50_reference.pth --overwrite
# the steps from here on that name /tmp/r50_reference.pth need bench_segment or r50_reference in the same run: both
# write that file, the same seeded weights (calibrated on the same three photos at 480x640) as GPU sessions 4-6 used;
# r50_reference is the short one, one setting
step 60 r50_reference python3 scripts/bench_segment.py --devices cuda --image-size 480 640 --batch-sizes 8 \
    --precisions bf16 --iterations 3 --warmup 2 --save-reference /tmp/r50_reference.pth --overwrite
step 60 profile_segment python3 scripts/profile_segment.py --checkpoint /tmp/r50_reference.pth
# the same at the R50 render's batch (four 1080p frames, 10 detections): the segmenter's 13.9-15.5 ms per frame
# in the render (GPU sessions 4-6) split into its front and the rest, and with cuDNN's algorithm timing
step 90 profile_segment_render_batch python3 scripts/profile_segment.py --checkpoint /tmp/r50_reference.pth --batch 4 \
    --image-size 1080 1920 --detections 10
RENDER="python3 scripts/bench_render.py --sizes"
BENCH="--device cuda --frames ${FRAMES:-240} --warmup-frames 16"
step 60 bench_render_nvidia $RENDER 1080p $BENCH segment.precision=bf16 decode.decoder=nvdec encode=nvenc
step 70 bench_render_software $RENDER ${SIZES:-480p 1080p} $BENCH segment.precision=bf16
step 45 bench_render_graphs $RENDER 1080p $BENCH segment.precision=bf16 style.cuda_graphs=true
step 45 bench_render_x264_ultrafast $RENDER 1080p $BENCH segment.precision=bf16 encode.preset=ultrafast
R50_MODEL="segment=r50_fpn segment.checkpoint=/tmp/r50_reference.pth segment.precision=bf16
    style/class_styles=coco style.palette=[style_03,style_17,style_09] decode.decoder=nvdec"
R50="$R50_MODEL segment.detections_per_img=10"
step 60 bench_render_r50 $RENDER 1080p $BENCH $R50
# torchvision's 100 detections per frame (a COCO model on a busy scene keeps that many at score >= 0.05), none
# stylized (the seeded model's scores are all about 0.6): what each detection costs segment, track and assign, and
# the memory its mask takes (box-local RoIMasks since 2026-11-27; full 1080p masks were 8 MB each)
step 60 bench_render_r50_dets100 $RENDER 1080p $BENCH $R50_MODEL segment.detections_per_img=100 style.min_score=0.99
# every model stage on one thread (stage_threads=2, the default, each on its own CUDA stream: 29.99 against 16.58 fps
# on an H200, GPU session 6)
step 60 bench_render_r50_one_stage_thread $RENDER 1080p $BENCH $R50 stage_threads=1
# composite on a third thread: the stylize + composite thread bound the two-thread render (29.1 ms per frame)
step 60 bench_render_r50_three_stage_threads $RENDER 1080p $BENCH $R50 stage_threads=3
# torch's default operator threads (one per core) instead of torch_threads=auto's 1 on a GPU: session 6 measured
# that setting only as OMP_NUM_THREADS=1
step 60 bench_render_r50_torch_threads_16 $RENDER 1080p $BENCH $R50 torch_threads=16
# eight frames per batch: more crops per shape, so fewer style network calls per frame (2.6 at four)
step 60 bench_render_r50_batch8 $RENDER 1080p $BENCH $R50 batch_size=8
# each stage's GPU kernel time beside its wall time (one more, profiled render of a 16-frame clip, every stage on
# one thread): which stages the host binds. 51 s on an H200 (GPU session 6; 160 frames had run past 110 s)
step 150 bench_render_r50_kernels $RENDER 1080p $BENCH --kernel-time --kernel-frames 16 $R50
# style CUDA graphs at the auto bucket (256 px at 1080p: on the R50 clip's recorded crop sizes 415 network calls of
# 95 shapes, against 868 of 166 at 128 px, where graphs lost to eager: 17.6 against 20.2 fps on an H200)
step 60 bench_render_r50_graphs $RENDER 1080p $BENCH $R50 style.cuda_graphs=true
# the style net at half resolution (style.downsample=2): a quarter of its kernel work, the same number of calls
step 60 bench_render_r50_downsample2 $RENDER 1080p $BENCH $R50 style.downsample=2
# crops capped at 256 px at the net (style.max_side=256): on the R50 clip's recorded crop sizes about a fifth of
# the padded pixels of the default and a handful of input shapes, so style CUDA graphs may pay there (both measured)
step 60 bench_render_r50_max_side $RENDER 1080p $BENCH $R50 style.max_side=256
step 60 bench_render_r50_max_side_graphs $RENDER 1080p $BENCH $R50 style.max_side=256 style.cuda_graphs=true
# the same with the segmenter at a 600-px short side instead of 800 (about 0.56x its pixels): our R50 ran 107-117
# img/s at 800x1066 on an H200 (bench_segment, batch 8, bf16), which alone bounds an 800-px 1080p render below 120 fps
step 60 bench_render_r50_fast $RENDER 1080p $BENCH $R50 style.max_side=256 style.cuda_graphs=true \
    segment.min_size=600 segment.max_size=1000
# the segmenter on every 2nd / 3rd frame, the tracker moving its objects over the others (segment_every), and with
# style.propagate the skipped frames' stylized crops carried over from the segmented frame instead of restyled:
# on an H200 1.09x alone and 1.20x with style.propagate (GPU session 7); on the 2-core CPU 1.03-1.10x and 1.56-1.79x
step 60 bench_render_r50_every2 $RENDER 1080p $BENCH $R50 segment_every=2
step 60 bench_render_r50_every2_propagate $RENDER 1080p $BENCH $R50 segment_every=2 style.propagate=true
step 60 bench_render_r50_every3_propagate $RENDER 1080p $BENCH $R50 segment_every=3 style.propagate=true
# every speed setting at once, x264 at veryfast too: the closest this tree gets to the 120 fps target
step 60 bench_render_r50_every3_propagate_fast $RENDER 1080p $BENCH $R50 segment_every=3 style.propagate=true \
    style.max_side=256 style.cuda_graphs=true segment.min_size=600 segment.max_size=1000 encode.preset=veryfast
# whole frames through the style net, once per style in use, instead of per-object crops (fixed shapes, fewer calls)
step 60 bench_render_r50_frame $RENDER 1080p $BENCH $R50 style.region=frame
# the same after an untimed render of the same clip: every crop shape already met (cuDNN's cold start per shape)
step 90 bench_render_r50_warm $RENDER 1080p $BENCH --warmup-frames ${FRAMES:-240} $R50
TRAIN="python3 scripts/bench_train.py --device cuda --backbone resnet50 --size 800 --batch 4 --amp bf16 \
    --fpn-channels 256 --representation-size 1024 --mask-head-channels 256 --iterations 10 --warmup 3 --channels-last"
step 80 bench_train_frozen_bn $TRAIN --norm frozen_bn --profile
# the same without padding the mask head's RoI batch: what cuDNN's per-shape cold start costs a step
step 60 bench_train_mask_unpadded $TRAIN --norm frozen_bn --mask-batch-bucket 1
step 80 bench_train_gn $TRAIN --norm gn
cp docs/benchmarks.md "$OUT/benchmarks.md"
