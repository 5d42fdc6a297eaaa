"""tools/aot_compile.py compiles the real train step ahead of time and reports memory/FLOPs."""

import importlib.util
import os

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices")
def test_report_on_cpu_devices():
    from avjax.train import aot

    cfg = _load("configs/speechssm.py", "cfg").get_config()
    cfg.model.width, cfg.model.mlp_width, cfg.model.lru_width = 32, 64, 32
    cfg.model.num_layers, cfg.model.num_heads, cfg.model.window = 3, 2, 16
    cfg.data.num_units, cfg.data.seq_len, cfg.train.batch_size = 32, 64, 8
    cfg.mesh.update({"data": 2, "fsdp": 2, "tensor": 2})
    r = aot.compile_report(cfg, "cpu:8")
    assert r["num_chips"] == 8 and r["fits"]
    assert r["params"] > 0 and r["peak_bytes_per_chip"] >= r["params_bytes_per_chip"] > 0
    # FSDP x tensor sharding: each device holds about a quarter of the parameters.
    assert r["params_bytes_per_chip"] < 0.5 * 4 * r["params"]
    # The compiler's FLOPs and the analytic count agree within a factor of two.
    assert 0.5 < r["flops_per_step"] / r["analytic_flops_per_step"] < 2.0, r


def test_speechssm_2b_is_a_variant_of_the_speechssm_config():
    """`configs/speechssm.py:2b` is SpeechSSM-2B (RecurrentGemma-2B's backbone, 26 layers,
    2.11B parameters over 32,768 units); an unknown variant is refused by name."""
    import flax.linen as nn
    import numpy as np

    from avjax.models.speechssm import speechssm

    module = _load("configs/speechssm.py", "cfg2b")
    cfg = module.get_config("2b")
    assert cfg.data.num_units == 32_768 and cfg.data.seq_len == 6000
    assert cfg.model.num_layers == 26 and cfg.model.width == 2560
    assert cfg.mesh.preset == "fsdp_tp" and cfg.train.batch_size == 128
    assert module.get_config().model.num_layers == 6  # the CPU default is untouched
    model = speechssm(cfg.model, cfg.data.num_units)
    tokens = np.zeros((1, 4), np.int32)
    pos = np.arange(4, dtype=np.int32)[None]
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, pos))["params"]
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(boxed)))
    assert 2.10e9 < n < 2.12e9
    with pytest.raises(ValueError, match="speechssm.py:7b"):
        module.get_config("7b")


def _tiny(name: str):
    cfg = _load(f"configs/{name}.py", f"cfg_{name}").get_config()
    cfg.model.width, cfg.model.mlp_width, cfg.model.num_layers, cfg.model.num_heads = 32, 64, 3, 2
    if "lru_width" in cfg.model:
        cfg.model.lru_width, cfg.model.window = 32, 16
    cfg.data.num_units, cfg.data.seq_len, cfg.train.batch_size = 32, 64, 8
    cfg.mesh.update({"data": 2, "fsdp": 2, "tensor": 2})
    return cfg


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices")
def test_decode_mode_reports_the_cache_per_chip():
    """`--mode=decode` compiles one cached step: SpeechSSM's state has a constant size
    (recurrent: RG-LRU state + 3 conv inputs; attention: a 16-slot ring buffer), the
    Transformer's KV cache holds `cache_tokens` keys and values per layer; the batch (8) is
    split over data x fsdp = 4, so a chip holds 2 sequences' caches."""
    import avjax.main  # noqa: F401  (the tool imports beside it: both have --config / --mode)

    tool = _load("tools/aot_compile.py", "aot_tool")
    ssm = tool.decode_report(_tiny("speechssm"), "cpu:8", batch=8, cache_tokens=100)
    tf = tool.decode_report(_tiny("speechtransformer"), "cpu:8", batch=8, cache_tokens=100)
    f32 = 4
    # 2 recurrent layers x (32 + 3 * 32) floats; 1 attention layer: keys + values
    # [16, 1 head, 16] + slot positions [16] + index.
    assert ssm["cache_bytes_per_sequence"] == 2 * 4 * 32 * f32 + (2 * 16 * 16 + 16 + 1) * f32
    # 3 layers x (keys + values [100, 1 head, 16] + index).
    assert tf["cache_bytes_per_sequence"] == 3 * (2 * 100 * 16 + 1) * f32
    assert ssm["cache_tokens"] is None and tf["cache_tokens"] == 100
    for r in (ssm, tf):
        assert r["mode"] == "decode" and r["num_chips"] == 8 and r["fits"]
        assert r["cache_bytes_per_chip"] == 2 * r["cache_bytes_per_sequence"]
        assert r["bytes_floor_per_chip"] == r["params_bytes_per_chip"] + r["cache_bytes_per_chip"]
        assert r["peak_bytes_per_chip"] >= r["bytes_floor_per_chip"]
        assert r["bytes_accessed_per_chip"] > 0
        # Host devices: no HBM size or bandwidth, so no roofline and no batch limit.
        assert r["memory_bound_s_per_step"] is None and r["max_batch_estimate"] is None
    # The memory roofline on a chip with HBM bandwidth: bytes / bandwidth, batch per step.
    t = tool._decode_traffic_roofline(1e9, {"hbm_bw": 1e12}, 64)
    assert t == {"memory_bound_s_per_step": 1e-3, "tokens_per_s": 64_000.0}
    # Largest batch: 8 sequences per chip of 4 chips used 8 x (100 cache + 25 temp) bytes;
    # 1,024 of HBM less the reserve (16), 490 of parameters and 10 of code leave room for 4.
    fake = {"hbm_bytes_per_chip": 1024, "params_bytes_per_chip": 490, "code_bytes_per_chip": 10}
    fake.update(cache_bytes_per_chip=800, temp_bytes_per_chip=200, batch=32)
    m = tool._max_batch(fake, {"hbm_bw": 1e3}, seqs_per_chip=8)
    assert m["max_batch_estimate"] == 16
    assert m["tokens_per_s_at_max_batch"] == pytest.approx(16 / ((490 + 4 * 100) / 1e3))


def test_hlo_bytes_count_an_async_copy_pair_once():
    """TPU HLO moves buffers with copy-start / copy-done pairs: the transfer (read the source,
    write the destination) is counted once, not on both ops with their echoed operands."""
    from avjax.train.aot import hlo_bytes_by_category

    hlo = """HloModule m, entry_computation_layout={(f32[256]{0})->f32[256]{0}}

ENTRY %main (p0: f32[256]) -> f32[256] {
  %p0 = f32[256]{0} parameter(0)
  %cs = (f32[256]{0}, f32[256]{0}, u32[]) copy-start(f32[256]{0} %p0)
  %cd = f32[256]{0} copy-done((f32[256]{0}, f32[256]{0}, u32[]) %cs)
  ROOT %n = f32[256]{0} negate(f32[256]{0} %cd)
}
"""
    total = sum(hlo_bytes_by_category(hlo).values())
    assert total == (2 * 1024 + 4) + 2 * 1024  # the copy (+ its context word), the negate


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices")
def test_mfu_counts_remat_recomputation_in_scanned_builds(monkeypatch):
    """A scanned build's compiler FLOPs count one loop iteration, so the step time once came
    from the analytic FLOPs, as did MFU: 100 % whatever remat recomputed (compute-bound). The
    compute time now comes from the HLO walk's matmuls times their trip counts: with
    remat=full the forward is recomputed (~1.3x the useful FLOPs at this size), so MFU drops
    below that of remat=none."""
    from avjax.train import aot

    chip = {"hbm": 2**34, "flops": 1e12, "hbm_bw": 1e15}  # compute-bound: MFU = 1 / factor
    real = aot.topology_devices
    monkeypatch.setattr(aot, "topology_devices", lambda t, n=1: (real("cpu:8", n)[0], chip))
    reports = {}
    for remat in ("none", "full"):
        cfg = _tiny("speechssm")
        cfg.model.num_layers, cfg.model.scan_layers, cfg.model.remat = 7, True, remat
        reports[remat] = aot.compile_report(cfg, "v5e:fake")
    none, full = reports["none"], reports["full"]
    print(
        {
            k: {f: r[f] for f in ("recompute_factor", "estimated_mfu", "flops_per_step")}
            for k, r in reports.items()
        }
    )
    for r in (none, full):  # 7 layers scanned as 2 x (r, r, a) + (r): one body counted
        assert r["flops_per_step"] < r["analytic_flops_per_step"] < r["executed_flops_per_step"]
        assert r["executed_flops_source"] == "hlo_matmul"
        assert r["estimated_mfu"] == pytest.approx(1 / r["recompute_factor"])
    assert 0.95 < none["recompute_factor"] < 1.12, none
    assert full["recompute_factor"] > none["recompute_factor"] + 0.15, full
    assert full["estimated_mfu"] < 0.9 and none["estimated_mfu"] > full["estimated_mfu"]


def test_hlo_matmul_flops_multiply_loop_bodies_by_their_trip_count():
    """A dot [4, 8] x [8, 16] (2 x 64 x 8 = 1,024 FLOPs) inside a fusion in a while body run
    3 times (CPU: `known_trip_count`) and again twice (TPU: no trip count, read off the
    condition `i < 2`) counts 5 x 1,024. A causal conv1d (window 4, 3 -> 2 features, 8
    steps, left pad 3: 26 of the 32 taps read input) counts 2 x 2 x 26 x 3 = 312; a batched
    matmul written as TPU writes it, a convolution over a padded spatial axis (4 products
    [3, 2] x [2, 5], one tap each on the input) 2 x 4 x 3 x 5 x 2 = 240, not 4 x that."""
    from avjax.train.aot import _valid_taps, hlo_matmul_flops

    hlo = """HloModule m

%fused_dot (param_0: f32[4,8], param_1: f32[8,16]) -> f32[4,16] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,16]{1,0} dot(%param_0, %param_1), DOT_DIMS
}

%body (p: (s32[], f32[4,8], f32[8,16])) -> (s32[], f32[4,8], f32[8,16]) {
  %p = (s32[], f32[4,8]{1,0}, f32[8,16]{1,0}) parameter(0)
  %a = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %b = f32[8,16]{1,0} get-tuple-element(%p), index=2
  %f = f32[4,16]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused_dot
  ROOT %t = (s32[], f32[4,8]{1,0}, f32[8,16]{1,0}) tuple(%i, %a, %b)
}

%lt2 (q: (s32[], f32[4,8], f32[8,16])) -> pred[] {
  %two = s32[] constant(2)
  %q = (s32[], f32[4,8]{1,0}, f32[8,16]{1,0}) parameter(0)
  %i2 = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%i2, %two), direction=LT
}

ENTRY %main (x: f32[1,8,3], k: f32[4,3,2]) -> f32[1,8,2] {
  %x = f32[1,8,3]{2,1,0} parameter(0)
  %k = f32[4,3,2]{2,1,0} parameter(1)
  %w = (s32[], f32[4,8]{1,0}, f32[8,16]{1,0}) while(%init), condition=%cond, body=%body, TRIPS
  %w2 = (s32[], f32[4,8]{1,0}, f32[8,16]{1,0}) while(%init), condition=%lt2, body=%body
  %c = f32[1,8,2]{2,1,0} convolution(%x, %k), window={size=4 pad=3_0}, dim_labels=b0f_0io->b0f
  %l = f32[2,3,1]{2,1,0} parameter(2)
  %r = f32[4,5,2]{2,1,0} parameter(3)
  ROOT %g = f32[3,4,5]{2,1,0} convolution(%l, %r), window={size=4 pad=3_3 rhs_reversal=1}, GROUPED
}
"""
    hlo = hlo.replace("DOT_DIMS", "lhs_contracting_dims={1}, rhs_contracting_dims={0}")
    hlo = hlo.replace("TRIPS", 'backend_config={"known_trip_count":{"n":"3"}}')
    hlo = hlo.replace("GROUPED", "dim_labels=fb0_0oi->b0f")
    assert hlo_matmul_flops(hlo) == (3 + 2) * 1024 + 312 + 240
    # TPU's block-diagonal form (SpeechSSM-2B's banded attention): window 12, stride 11, the
    # input dilated by 12: one tap of 12 lands on an input element at each output position.
    assert _valid_taps(12, 12, 12, 11, 0, 12, 1) == 12


def test_hlo_bytes_of_a_fusion_that_slices_a_scanned_buffer_count_the_slice():
    """A loop body's fusion that dynamic-slices its chunk [8] of a scanned buffer [64] reads
    the chunk (32 bytes), not the buffer (256), each of the loop's 8 iterations (TPU: trip
    count from the condition): 8 x (32 read + the 4-byte index + 32 written)."""
    from avjax.train.aot import hlo_bytes_by_category

    hlo = """HloModule m

%chunk (param_0.7: f32[64], param_1.7: s32[]) -> f32[8] {
  %param_0.7 = f32[64]{0} parameter(0)
  %param_1.7 = s32[] parameter(1)
  %ds = f32[8]{0} dynamic-slice(%param_0.7, %param_1.7), dynamic_slice_sizes={8}
  ROOT %neg = f32[8]{0} negate(%ds)
}

%body (p: (s32[], f32[64])) -> (s32[], f32[64]) {
  %p = (s32[], f32[64]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %buf = f32[64]{0} get-tuple-element(%p), index=1
  %f = f32[8]{0} fusion(%buf, %i), kind=kLoop, calls=%chunk
  ROOT %t = (s32[], f32[64]{0}) tuple(%i, %buf)
}

%cond (q: (s32[], f32[64])) -> pred[] {
  %n = s32[] constant(8)
  %q = (s32[], f32[64]{0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (x: (s32[], f32[64])) -> (s32[], f32[64]) {
  %x = (s32[], f32[64]{0}) parameter(0)
  ROOT %w = (s32[], f32[64]{0}) while(%x), condition=%cond, body=%body
}
"""
    assert sum(hlo_bytes_by_category(hlo).values()) == 8 * (32 + 4 + 32)
