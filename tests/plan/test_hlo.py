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
