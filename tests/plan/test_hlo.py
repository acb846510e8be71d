"""The HLO reader on hand-written modules (reference: the shapes and loop bounds written in them)."""

from diffujax.plan import hlo

MODULE = """HloModule jit_step, entry_computation_layout={()}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %constant.7 = s32[]{:T(128)} constant(5)
  %gte = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%gte, %constant.7), direction=LT
}

%inner_cond (q: (s32[], bf16[4,16])) -> pred[] {
  %q = (s32[], bf16[4,16]) parameter(0)
  %constant.9 = s32[] constant(3)
  %g = s32[] get-tuple-element(%q), index=0
  ROOT %lt.2 = pred[] compare(%g, %constant.9), direction=LT
}

%inner_body (q.1: (s32[], bf16[4,16])) -> (s32[], bf16[4,16]) {
  %q.1 = (s32[], bf16[4,16]) parameter(0)
  %all-reduce-start.1 = bf16[4,16]{1,0:T(8,128)(2,1)} all-reduce-start(%x), channel_id=3, to_apply=%add
  %all-reduce-done.1 = bf16[4,16]{1,0:T(8,128)(2,1)} all-reduce-done(%all-reduce-start.1)
  ROOT %t = (s32[], bf16[4,16]) tuple(%i, %all-reduce-done.1)
}

%body (p.1: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p.1 = (s32[], f32[8,16]{1,0}) parameter(0)
  %all-gather.3 = f32[1,64,16]{2,1,0:T(8,128)} all-gather(%s), channel_id=1, dimensions={1}
  %w = (s32[], bf16[4,16]) while(%init), condition=%inner_cond, body=%inner_body
  ROOT %t.1 = (s32[], f32[8,16]) tuple(%i, %y)
}

ENTRY %main (a: f32[64,16]) -> f32[64,16] {
  %a = f32[64,16]{1,0} parameter(0)
  %all-gather.1 = f32[64,16]{1,0:T(8,128)} all-gather(%a), channel_id=2, dimensions={0}
  %while.1 = (s32[], f32[8,16]{1,0}) while(%t0), condition=%cond, body=%body
  %reduce-scatter.2 = (f32[8,16]{1,0}, bf16[2,2]{1,0}) reduce-scatter(%a, %b), channel_id=4
  ROOT %r = f32[64,16]{1,0} copy(%all-gather.1)
}
"""


def test_collectives_with_loop_trip_counts():
    items = {c.name: c for c in hlo.collectives(MODULE)}
    assert set(items) == {"all-gather.1", "all-gather.3", "all-reduce-done.1", "reduce-scatter.2"}
    assert (items["all-gather.1"].bytes, items["all-gather.1"].runs) == (64 * 16 * 4, 1)
    assert (items["all-gather.3"].bytes, items["all-gather.3"].runs) == (64 * 16 * 4, 5)
    # Nested loops multiply; the async pair counts once, at its -done.
    assert (items["all-reduce-done.1"].kind, items["all-reduce-done.1"].runs) == ("all-reduce", 15)
    assert items["all-reduce-done.1"].bytes == 4 * 16 * 2
    assert items["reduce-scatter.2"].bytes == 8 * 16 * 4 + 2 * 2 * 2
    summary = hlo.summarize(list(items.values()))
    assert summary["all-gather"] == dict(ops=2, bytes=2 * 4096, executions=6,
                                         bytes_per_step=4096 * 6)
    assert summary["all-reduce"]["bytes_per_step"] == 128 * 15


def test_parameters_gathered_whole_are_named():
    items = hlo.collectives(MODULE)
    shapes = {"embed": (64, 16), "layers/w": (3, 64, 16), "final_norm": (16,)}
    # all-gather.1 materialises the whole [64, 16] embedding; all-gather.3 one layer's slice.
    assert hlo.gathered_whole(items, shapes) == ["embed"]


def test_weights_all_reduced_whole_are_named():
    module = MODULE.replace(
        "%reduce-scatter.2 = (f32[8,16]{1,0}, bf16[2,2]{1,0}) reduce-scatter(%a, %b), channel_id=4",
        "%all-reduce.9 = (bf16[16]{0}, bf16[1,64,16]{2,1,0}) all-reduce(%a, %b), channel_id=4")
    items = hlo.collectives(module)
    shapes = {"layers/w_up": (64, 16), "layers/norm": (16,), "embed": (99, 16)}
    # A whole [64, 16] matrix (size-1 axes aside) is summed everywhere; norms are left out.
    assert hlo.all_reduced_whole(items, shapes) == ["layers/w_up"]
    assert hlo.all_reduced_whole(hlo.collectives(MODULE), shapes) == []


def test_a_loop_that_stops_on_data_counts_the_trips_it_is_given():
    """The cached decoder's loop: its condition is not one ``counter < N`` comparison (here an
    ``and`` of two), so its trips come from the caller; the counted loop inside still
    multiplies. Without ``open_trips`` the reading is the old one (the constant it compares,
    which bounds nothing here: the reason the plan passes the decoder's passes)."""
    module = MODULE.replace(
        "  ROOT %lt = pred[]{:T(512)} compare(%gte, %constant.7), direction=LT\n",
        "  %lt = pred[]{:T(512)} compare(%gte, %constant.7), direction=LT\n"
        "  %flag = pred[] get-tuple-element(%p), index=2\n"
        "  ROOT %both = pred[] and(%lt, %flag)\n").replace(
        "channel_id=1, dimensions={1}\n",
        "channel_id=1, dimensions={1}, backend_config={\"estimated_cycles\":\"100\"}\n")
    for trips in (7, 51):
        items = {c.name: c for c in hlo.collectives(module, open_trips=trips)}
        assert items["all-gather.3"].runs == trips
        assert items["all-reduce-done.1"].runs == trips * 3
        assert hlo.estimated_cycles(module, open_trips=trips).cycles == 100 * trips
    assert {c.name: c.runs for c in hlo.collectives(module)}["all-gather.3"] == 5
    # A counted loop keeps its own bound whatever the caller says about open loops.
    counted = MODULE.replace("dimensions={1}\n", "dimensions={1},"
                             " backend_config={\"estimated_cycles\":\"100\"}\n", 1)
    assert hlo.estimated_cycles(counted, open_trips=51).cycles == 100 * 5


CATEGORY_MODULE = """HloModule jit_step, entry_computation_layout={()}

%fused_dot (a: bf16[8,16], b: bf16[16,32]) -> bf16[8,32] {
  %a = bf16[8,16]{1,0} parameter(0)
  %b = bf16[16,32]{1,0} parameter(1)
  %c = f32[8,32]{1,0} convolution(%a, %b), dim_labels=bf_io->bf
  ROOT %d = bf16[8,32]{1,0} convert(%c)
}

%fused_norm (x: f32[8,32]) -> f32[8] {
  %x = f32[8,32]{1,0} parameter(0)
  %zero = f32[] constant(0)
  %s = f32[8,32]{1,0} multiply(%x, %x)
  ROOT %r = f32[8]{0} reduce(%s, %zero), dimensions={1}, to_apply=%add
}

%fused_gelu (x.1: f32[8,32]) -> f32[8,32] {
  %x.1 = f32[8,32]{1,0} parameter(0)
  ROOT %t = f32[8,32]{1,0} tanh(%x.1)
}

%fused_stack (y: f32[8,32]) -> f32[3,8,32] {
  %y = f32[8,32]{1,0} parameter(0)
  ROOT %u = f32[3,8,32]{2,1,0} broadcast(%y), dimensions={1,2}
}

%fused_save (y.1: f32[3,8,32], v: f32[1,8,32]) -> f32[3,8,32] {
  %y.1 = f32[3,8,32]{2,1,0} parameter(0)
  %v = f32[1,8,32]{2,1,0} parameter(1)
  %w = f32[1,8,32]{2,1,0} add(%v, %v)
  %k = s32[] constant(0)
  ROOT %dus = f32[3,8,32]{2,1,0} dynamic-update-slice(%y.1, %w, %k, %k, %k)
}

%fused_inner_softmax (z: f32[8,100]) -> f32[8,100] {
  %z = f32[8,100]{1,0} parameter(0)
  ROOT %e = f32[8,100]{1,0} exponential(%z)
}

%fused_loss (l: f32[8,100]) -> f32[8] {
  %l = f32[8,100]{1,0} parameter(0)
  %f = f32[8,100]{1,0} fusion(%l), kind=kLoop, calls=%fused_inner_softmax
  %zero.1 = f32[] constant(0)
  ROOT %r.1 = f32[8]{0} reduce(%f, %zero.1), dimensions={1}, to_apply=%add
}

%cond (p: (s32[], f32[8,32])) -> pred[] {
  %p = (s32[], f32[8,32]{1,0}) parameter(0)
  %constant.7 = s32[] constant(3)
  %gte = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%gte, %constant.7), direction=LT
}

%body (p.1: (s32[], f32[8,32])) -> (s32[], f32[8,32]) {
  %p.1 = (s32[], f32[8,32]{1,0}) parameter(0)
  %mm = bf16[8,32]{1,0} fusion(%a0, %b0), kind=kOutput, calls=%fused_dot, backend_config={"estimated_cycles":"100"}
  %ln = f32[8]{0} fusion(%mm), kind=kInput, calls=%fused_norm, backend_config={"estimated_cycles":"40"}
  %ge = f32[8,32]{1,0} fusion(%mm), kind=kLoop, calls=%fused_gelu, backend_config={"estimated_cycles":"30"}
  %cp = f32[8,32]{1,0} copy(%ge), backend_config={"estimated_cycles":"7"}
  %sv = f32[3,8,32]{2,1,0} fusion(%st0, %ge), kind=kLoop, calls=%fused_save, backend_config={"estimated_cycles":"2"}
  ROOT %t.1 = (s32[], f32[8,32]) tuple(%i, %cp)
}

ENTRY %main (a: f32[8,100]) -> f32[8] {
  %a = f32[8,100]{1,0} parameter(0)
  %while.1 = (s32[], f32[8,32]{1,0}) while(%t0), condition=%cond, body=%body
  %st = f32[3,8,32]{2,1,0} fusion(%y0), kind=kLoop, calls=%fused_stack, backend_config={"estimated_cycles":"11"}
  %loss = f32[8]{0} fusion(%a), kind=kInput, calls=%fused_loss, backend_config={"estimated_cycles":"50"}
  ROOT %ar = f32[8]{0} all-reduce(%loss), channel_id=1, to_apply=%add, backend_config={"estimated_cycles":"5"}
}
"""


def test_cycles_by_category_on_a_hand_made_module():
    """Each estimate lands in the category of what its fusion's body runs, times its loop's
    trips (3): a convolution is a matmul, a reduce a reduction, tanh elementwise, a copy or a
    broadcast data movement (an add written into a stacked buffer too), anything on a
    vocabulary-long (100) axis the vocabulary's."""
    by = hlo.estimated_cycles(CATEGORY_MODULE, vocab=100).by_category
    assert by == {"matmul": 300, "reduction": 120, "elementwise": 90, "data movement": 21 + 6 + 11,
                  "vocabulary": 50, "collective": 5}
    assert list(by) == sorted(by, key=by.get, reverse=True)
    # The categories split the compiler's total; without a vocabulary the loss is a reduction.
    assert sum(by.values()) == hlo.estimated_cycles(CATEGORY_MODULE).cycles
    assert hlo.estimated_cycles(CATEGORY_MODULE).by_category["reduction"] == 120 + 50
