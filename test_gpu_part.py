"""bench.py --gpu (issue #12) end to end on a tiny model: the code path the GPU figures take, in seconds
on a CPU. The figures themselves need a GPU: python bench.py --gpu --gpu-out FILE."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench


def test_gpu_figures_tiny(tmp_path):
    out = tmp_path / "gpu.json"
    res = bench.main(["--gpu", "--gpu-size", "tiny", "--gpu-micro", "4", "--gpu-repeats", "1", "--threads", "1",
                    "--gpu-out", str(out)])  # 1 thread: OpenMP spin-waits when the 2 cores are shared
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["params"] > res["backbone_params"] > 0
    for step in ("finetune", "distill"):
        fig = res[step]
        assert fig["micro_batch"] == 4, fig  # 3 robot frames + 1 QA sample (mm_ratio 0.25): both teachers run
        for key in ("step_s", "samples_per_s", "tokens_per_s", "tokens_per_sample", "padded_tokens_per_sample",
                    "model_tflop_per_step"):
            assert isinstance(fig[key], float) and fig[key] > 0, (step, key, fig[key])
        assert fig["image_tokens_per_sample"] == 64  # 224 px: 16 x 16 patches merged 2 x 2
        assert fig["padded_tokens_per_sample"] >= fig["tokens_per_sample"] > 64
        if res["device"] == "cpu":  # no allocator peak counter and no tensor-core peak on a CPU
            assert fig["mfu"] is None and fig["peak_memory_gib"] is None and fig["peak_reserved_gib"] is None
        else:
            assert fig["peak_reserved_gib"] >= fig["peak_memory_gib"] > 0 and (fig["mfu"] is None or fig["mfu"] > 0)
    # the same batch, plus two teacher forwards
    assert res["distill"]["model_tflop_per_step"] > res["finetune"]["model_tflop_per_step"]
