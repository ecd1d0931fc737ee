"""bench/train_step.py on tiny models (CPU): its fast variant computes the library's loss, the naive one the same math.

The numerical check of the benchmark is only worth something if both variants compute one loss: a fast variant that
dropped a term (as the lora scheme's CLIP loss once was) would time less work and still pass its gradient check."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_lora_variants_compute_the_same_losses_and_gradients(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--tiny", "--scheme", "lora",
                           "--quick", "--steps", "1"], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "train_step.json").read_text())["rows"]
    fast = [r for r in rows if r["variant"] != "naive"]
    assert fast and any("shared" in r["variant"] for r in fast)
    for r in fast:  # fp32 on the CPU: only the order of operations differs
        assert r["rel_err_loss_vsd"] < 1e-4, r
        assert r["rel_err_grad_student"] < 1e-2, r
        if "shared" in r["variant"]:  # its LoRA teacher trains at other draws of t and noise: not comparable
            assert "rel_err_loss_lora" not in r, r
        else:
            assert r["rel_err_loss_lora"] < 1e-4, r


def test_profile_sorts_kernels_by_what_they_compute():
    """Kernel names from the H100 profile (bench/results/train_step_h100_eager_profile.txt): cuDNN's attention and
    implicit-GEMM convolutions name "sm90"/"gemm" too and must not count as matmuls."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_step", ROOT / "bench" / "train_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    expect = {"cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3": "attention",
              "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw": "convolution",
              "sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw": "convolution",
              "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>": "layout conversion (NCHW <-> NHWC)",
              "nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NNT": "matmul (GEMM)",
              "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>": "normalization",
              "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>":
                  "optimizer and gradient clipping",
              "void at::native::lpnorm_cleanup<float, (at::native::NormType)1, float, float>":
                  "optimizer and gradient clipping",
              "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16>": "normalization",
              "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>":
                  "elementwise / copies / other",
              "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
              "TensorListMetadata<2>, at::native::(anonymous namespace)::CopyFunctor<c10::BFloat16, c10::BFloat16, 2, "
              "1, 1>>": "list copies (_foreach_copy_: CUDA-graph inputs)"}
    assert {k: mod.kernel_kind(k) for k in expect} == expect


def test_profile_counts_kernels_not_the_annotations_around_them():
    """The H100 profiles listed ``Optimizer.step#AdamW.step`` (a GPU user annotation spanning the fused AdamW
    kernels) with device time: counted, the optimizer's time was in the total twice."""
    import importlib.util
    from types import SimpleNamespace as Ev

    spec = importlib.util.spec_from_file_location("train_step", ROOT / "bench" / "train_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    events = [Ev(key="void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
                 device_type="DeviceType.CUDA", self_device_time_total=10_000.0, is_user_annotation=False),
              Ev(key="Optimizer.step#AdamW.step", device_type="DeviceType.CUDA", self_device_time_total=10_500.0,
                 is_user_annotation=True),
              Ev(key="nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NNT", device_type="DeviceType.CUDA",
                 self_device_time_total=30_000.0, is_user_annotation=False),
              Ev(key="aten::mm", device_type="DeviceType.CPU", self_device_time_total=0.0, is_user_annotation=False)]
    assert mod.kernel_ms_by_kind(events, 2) == {"optimizer and gradient clipping": 5.0, "matmul (GEMM)": 15.0}


def test_interleaved_variants_share_models_and_are_timed_in_turns(tmp_path):
    """--interleave: naive alone, then the chosen variants on one set of models, each with its own timed steps;
    variants that need other models (here: torch.compile's or channels_last's) are refused."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "bench" / "train_step.py"), "--tiny", "--scheme", "full", "--steps", "2"]
    turns = ["--interleave", "no gradient", "shared LoRA-teacher pass (no", "checkpoint up_blocks.1"]
    proc = subprocess.run(cmd + turns, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "train_step.json").read_text())["rows"]
    assert [r["variant"].strip() for r in rows] == ["naive", "+ no gradient checkpointing",
                                                    "+ shared LoRA-teacher pass (no channels_last)",
                                                    "+ checkpoint up_blocks.1 (shared pass)"]
    assert not rows[0].get("interleaved")
    for r in rows[1:]:
        assert r["interleaved"] and len(r["step_ms_all"]) == 2 and r["speedup_vs_naive"] > 0
    # each turn ran its own settings: the shared pass and the checkpointed blocks switch between steps
    assert [r["steps_with_shared_pass"] for r in rows[1:]] == [0, 2, 2]
    assert [r["checkpointed_blocks"] for r in rows[1:]] == [[], [], ["up_blocks.1"]]
    bad = subprocess.run(cmd + ["--interleave", "no gradient", "channels_last"], env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    assert bad.returncode != 0 and "differ only in the shared pass and checkpointing" in bad.stderr
