"""The text form of a plan report and of a ``--fit`` search (the JSON form is the dict itself)."""

from __future__ import annotations

from diffujax.parallel.topology import GIB


def gib(n) -> str:
    return f"{n / GIB:.2f} GiB"


def _bytes(n) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def format_report(r: dict) -> str:
    t, c, m = r["target"], r["config"], r["model"]
    mesh = " x ".join(f"{k}={v}" for k, v in t["mesh"].items())
    lines = [
        f"plan for {t['topology']} x {t['num_slices']} slice(s): {t['devices']} x {t['device_kind']}"
        f" (libtpu topology {t['libtpu_topology']}), {t['hbm_per_chip_gib']:.1f} GiB HBM per chip",
        f"mesh: {mesh}",
        f"libtpu flags: {' '.join(t.get('libtpu_flags') or []) or 'none'}",
        f"model: {m['family']}, {m['params'] / 1e6:.1f}M parameters ({m['source']}); seq_len"
        f" {c['seq_len']}, global batch {c['global_batch']} = {c['grad_accum_steps']} x"
        f" {c['micro_batch']} (grad_accum_steps x micro-batch), remat {c['remat']}, compute"
        f" {c['dtype']}, master weights {c['param_dtype']}"
        + (", layers unrolled" if c.get("scan_layers") is False else "")
        + (", training dropout" if c.get("dropout") else "")
        + (f", cross-entropy in chunks of {c['loss_chunk']}" if c.get("loss_chunk") else ""),
    ]
    if r.get("lora"):
        a = r["lora"]
        lines.append(f"LoRA: rank {a['rank']} (alpha {a['alpha']:g}) on {', '.join(a['targets'])}:"
                     f" {a['adapter_params'] / 1e6:.2f}M adapter parameters train (\"adapters\";"
                     " the optimizer holds state for them only), the base stays frozen")
    names = {"params": "adapters" if r.get("lora") else "params", "frozen": "frozen base"}
    for p in r["programs"]:
        mem = p["memory"]
        attention = ", ".join(f"{k} -> {v}" for k, v in p["attention"].items())
        kernels = f", {p['kernel_calls']} Pallas kernel calls" if p.get("kernel_calls") else ""
        lines += ["", f"[{p['name']}] {p['description']}: {p['rows']} rows, compiled in"
                      f" {p['compile_seconds']:.1f} s; attention {attention}{kernels}"]
        parts = [f"{names.get(k, k)} {_bytes(mem[k])}"
                 for k in ("params", "frozen", "optimizer", "ema", "batch", "cache", "temporaries")
                 if k in mem]
        verdict = "fits" if mem["fits"] else "DOES NOT FIT"
        lines.append(f"  HBM per chip: {', '.join(parts)}; total {_bytes(mem['total'])} of"
                     f" {gib(mem['hbm'])}: {verdict}")
        if "compiler" in mem:
            lines.append(f"  compiler: {mem['compiler']}")
        if p.get("collectives"):
            lines.append("  collectives (bytes per device; ops in loops counted per trip):")
            comm = p.get("communication", {}).get("by_kind", {})
            for kind, s in p["collectives"].items():
                c = comm.get(kind)
                time = (f"; est. {1e3 * c['seconds']:.2f} ms, {1e3 * c['exposed_seconds']:.2f} ms"
                        " exposed") if c else ""
                lines.append(f"    {kind:<19} {s['ops']:>4} ops, {s['executions']:>6} runs per"
                             f" call, {_bytes(s['bytes_per_step'])} per call{time}")
        if p.get("gathered_whole"):
            lines.append(f"  parameters gathered whole: {', '.join(p['gathered_whole'])}")
        if p.get("all_reduced_whole"):
            lines.append("  weights all-reduced whole (a zero-fill gather or an unsharded gradient"
                         " reduction: about twice FSDP's bytes):"
                         f" {', '.join(p['all_reduced_whole'])}")
        if p.get("decode") and p.get("estimate"):
            lines += _decode_estimate(p, r["target"]["devices"])
        if p.get("decode_step"):
            lines += _decode_step_estimate(p, r.get("estimate") or {}, r["target"]["devices"])
    if "model_flops_per_step" in r:
        lines += ["", f"model FLOPs per step: {r['model_flops_per_step']:.3e} (6N + full"
                      " bidirectional attention)"]
    e = r.get("estimate")
    if e and ("forward_passes" in e or "pass_seconds" in e):
        pass  # the decoders' estimates are printed under each program
    elif e and not e.get("step_seconds"):
        lines.append(f"no estimate: {e['source']}")
    elif e:
        lines.append(f"ESTIMATE ({e['source']}; not a measurement): step {e['step_seconds']:.3f}"
                     f" s, MFU {100 * e['mfu']:.1f}%, {e['tokens_per_second']:,.0f} tokens/s")
        lines.append(f"  = XLA ops {e['xla_seconds']:.3f} s + Pallas kernels"
                     f" {e['kernel_seconds']:.3f} s + exposed communication"
                     f" {e['exposed_communication_seconds']:.3f} s (communication"
                     f" {e['communication_seconds']:.3f} s in all, of which"
                     f" {e['overlapped_communication_seconds']:.3f} s overlapped with compute)")
        if e.get("bound_by"):  # the step's time by category, largest first
            lines.append("  bound by: " + ", ".join(
                f"{p['category']} {p['seconds']:.3f} s ({100 * p['share']:.0f}%)"
                for p in e["bound_by"]))
    lines += ["", "fits" if r["fits"] else "DOES NOT FIT: try `diffujax plan --fit ...`"]
    return "\n".join(lines)


def _decode_estimate(p: dict, chips: int) -> list[str]:
    d, e = p["decode"], p["estimate"]
    if not e.get("step_seconds"):
        return [f"  no estimate: {e['source']}"]
    how = ("the prefill, then one commit pass per token after the first" if d["block_size"] == 1
           else f"the prefill of the prompt's whole blocks, then per block of {d['block_size']}"
           f" its confidence denoising passes ({d['steps_per_block']} allowed) and a commit pass")
    return [
        f"  ESTIMATE ({e['source']}; not a measurement): one decode call {e['step_seconds']:.4f}"
        f" s for {p['rows']} rows x {d['new_tokens']} new tokens: {e['tokens_per_second']:,.0f}"
        f" tokens/s, {e['tokens_per_second_per_chip']:,.0f} tokens/s per chip ({chips} chips)",
        f"    {e['forward_passes']} forward passes ({e['forward_passes_per_token']:.2f} per new"
        f" token): {how}",
        f"    = XLA ops {e['xla_seconds']:.4f} s + Pallas kernels {e['kernel_seconds']:.4f} s +"
        f" exposed communication {e['exposed_communication_seconds']:.4f} s",
    ]


def _decode_step_estimate(p: dict, e: dict, chips: int) -> list[str]:
    d, mem = p["decode_step"], p["memory"]
    lines = [f"  weights {_bytes(mem['params'])} + KV cache {_bytes(mem['cache'])} per chip"
             f" ({d['batch']} rows x {d['cache_length']} positions over {chips} chips)"]
    if not e.get("step_seconds"):
        return lines + [f"  no estimate: {e.get('source', 'none')}"]
    rate, per_row = e["tokens_per_second_per_chip"], e["tokens_per_pass_per_row"]
    n = d["block_size"]
    flops = (f", {e['matmul_flops_per_pass']:.3e} matmul FLOPs (MFU {100 * e['mfu']:.1f}%)"
             if e.get("mfu") is not None else "")
    return lines + [
        f"  ESTIMATE ({e['source']}; not a measurement): one pass {1e3 * e['pass_seconds']:.3f}"
        f" ms{flops}",
        f"    = XLA ops {1e3 * e['xla_seconds']:.3f} ms + Pallas kernels"
        f" {1e3 * e['kernel_seconds']:.3f} ms + exposed communication"
        f" {1e3 * e['exposed_communication_seconds']:.3f} ms",
        f"  tokens/s per chip: {rate['one_token_per_denoising_pass']:,.0f} at one token per"
        f" denoising pass ({per_row['one_token_per_denoising_pass']:.3f} per row per pass), up"
        f" to {rate['whole_block_per_denoising_pass']:,.0f} at a whole block per denoising pass"
        f" ({per_row['whole_block_per_denoising_pass']:.3f}; a block of {n} also takes a"
        " commit pass)" if n > 1 else
        f"  tokens/s per chip: {rate['one_token_per_denoising_pass']:,.0f} (blocks of one"
        " token: one token per pass)",
    ]


def format_fit(r: dict) -> str:
    lines = [f"fit search on {r['topology']} (global batch {r['global_batch']} kept):"]
    for t in r["tried"]:
        est = t.get("step_seconds")
        lines.append(f"  remat={t['remat']:<19} loss_chunk={t['loss_chunk']:<4}"
                     f" grad_accum_steps={t['grad_accum_steps']:<4}"
                     f" HBM {gib(t['total'])}: {'fits' if t['fits'] else 'does not fit'}"
                     + (f"; est. step {est:.3f} s, MFU {100 * t['mfu']:.1f}%" if est else ""))
    best = r.get("best")
    lines.append(f"fastest that fits (estimate): {' '.join(best['overrides'])}" if best else
                 "nothing tried fits: use a larger slice, tensor parallelism (mesh.shape.tensor)"
                 " or a shorter seq_len")
    return "\n".join(lines)

