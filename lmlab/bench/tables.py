"""What `lmlab bench` found, as a table for the terminal and as Markdown tables (for docs/performance.md)."""

from __future__ import annotations

from typing import Optional

from .decode import batched_lines
from .floor import floor_lines
from .measure import generation_label
from .records import RECORD_HEADER, record_markdown


def print_table(out: dict) -> None:
    if "record" in out:  # a record attempt: its row, as docs/records.md's table has it
        print("\n".join(RECORD_HEADER + [record_markdown(out["record"])]))
        return
    lines = []
    p = out.get("peak_gflops")
    if p:
        lines.append(f"{'hardware peak':34s} fp32 {p['float32']:7.0f} GFLOP/s   bf16 {p['bfloat16']:7.0f} GFLOP/s")
    for r in out.get("throughput", []):
        lines.append(f"{'train ' + r['preset'] + ' ' + r['dtype'] + (' compiled' if r['compile'] else ''):34s} "
                     f"{r['tokens_per_s']:9,.0f} tok/s  {r['step_ms']:8.1f} ms/step  MFU {r['mfu_vs_float32']:5.1%} "
                     f"(fp32 peak) {r['mfu_vs_bfloat16']:5.1%} (bf16 peak)  first step {r['first_step_s']:.1f}s")
    t = out.get("time_to_target")
    if t:
        reached = f"{t['seconds']:.1f} s" if t["seconds"] is not None else "not reached"
        lines.append(f"{'time to val ' + str(t['target']):34s} {reached}  (run of {t['budget_s']:.0f} s ended at "
                     f"{t['final_val_loss']:.4f})")
    lines += floor_lines(out.get("floor", []))
    for r in out.get("quality", []):
        lines.append(f"{'val loss after %.0f s' % r['budget_s']:34s} {r['val_loss']:.4f}  ({r['steps']} steps)")
    for r in out.get("generation", []):
        lines.append(f"{'generate %d, %s' % (r['new_tokens'], generation_label(r)):34s} {r['tokens_per_s']:9,.0f} tok/s"
                     + (f"  (compiling and warm-up {r['first_s']:.1f} s)" if r.get("compiled") else ""))
    lines += batched_lines(out.get("generation_batched", []))
    c = out.get("chat")
    if c:
        lines.append(f"{'chat answer, %d-token prompt' % c['prompt_tokens']:34s} {c['tokens_per_s']:9,.0f} tok/s  "
                     f"first token {c['first_token_ms']:.1f} ms  ({c['preset']}, context {c['block']})")
    for r in out.get("tokenizers", []):
        lines.append(f"{'tokenize ' + r['tokenizer']:34s} {r['encode_mb_per_s']:9.1f} MB/s")
    if "memory" in out:
        lines.append(f"{'peak RSS, training ' + out['memory']['preset']:34s} {out['memory']['peak_rss_mb']:9.0f} MB")
    lines += _nanogpt_lines(out.get("nanogpt"))
    print("\n".join(lines))


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines, then an empty line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def _nanogpt_lines(ng: Optional[dict]) -> list[str]:
    if not ng:
        return []
    lines = []
    for r in ng["throughput"]:
        lines.append(f"{'vs nanoGPT, train ' + ('compiled' if r['compile'] else 'eager'):34s} {r['ratio_median']:9.2f}x "
                     f"(blocks {r['ratio_min']:.2f}-{r['ratio_max']:.2f})  lmlab {r['lmlab']['step_ms']:.1f} / "
                     f"nanoGPT {r['nanogpt']['step_ms']:.1f} ms/step  MFU {r['lmlab']['mfu_vs_float32']:.0%} / "
                     f"{r['nanogpt']['mfu_vs_float32']:.0%}")
    for r in ng["generation"]:
        label = f"vs nanoGPT, generate {r['new_tokens']}" + (" compiled" if r["compiled"] else "")
        lines.append(f"{label:34s} {r['ratio_median']:9.2f}x (blocks {r['ratio_min']:.2f}-{r['ratio_max']:.2f})  "
                     f"lmlab {r['lmlab']['tokens_per_s']:,.0f} / nanoGPT {r['nanogpt']['tokens_per_s']:,.0f} tok/s")
    if "runs" in ng:
        r = ng["runs"]
        lines.append(f"{'vs nanoGPT, whole runs':34s} {r['ratio_median']:9.2f}x (rounds {r['ratio_min']:.2f}-"
                     f"{r['ratio_max']:.2f})  lmlab {r['lmlab']['step_ms']:.1f} / nanoGPT {r['nanogpt']['step_ms']:.1f} "
                     f"ms/step")
    if "process" in ng:
        lines.append(f"{'nanoGPT peak RSS (its own run)':34s} {ng['process']['peak_rss_mb']:9.0f} MB")
    return lines


def to_markdown(out: dict) -> str:
    """The figures as Markdown tables (for docs/performance.md), section by section."""
    if "record" in out:
        return "\n".join(RECORD_HEADER + [record_markdown(out["record"]), ""])
    md = [f"Measured with torch {out['torch']} on {out['device']}, {out['threads']} threads.", ""]
    for section in (_md_training, _md_quality, _md_generation, _md_data, _md_nanogpt):
        md += section(out)
    return "\n".join(md)


def _md_training(out: dict) -> list[str]:
    md = []
    p = out.get("peak_gflops")
    if p:
        md += ["| hardware peak (matmul) | GFLOP/s |", "|---|---|",
               f"| fp32 | {p['float32']:.0f} |", f"| bf16 | {p['bfloat16']:.0f} |", ""]
    if out.get("throughput"):
        md += markdown_table(["training config", "dtype", "compiled", "tokens/s", "ms/step", "MFU (fp32 peak)",
                              "MFU (bf16 peak)", "first step (s)"],
                             [[f"{r['preset']} ({r['batch']}x{r['block']})", r["dtype"],
                               "yes" if r["compile"] else "no",
                               f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:.1f}", f"{r['mfu_vs_float32']:.1%}",
                               f"{r['mfu_vs_bfloat16']:.1%}", f"{r['first_step_s']:.1f}"] for r in out["throughput"]])
    if out.get("floor"):
        md += ["| floor (eager fp32 step against its own matmuls) | step (ms) | floor (ms) | step/floor | optimizer "
               "matmuls (ms) | profile of the step (ms per kind) |", "|---|---|---|---|---|---|"]
        for r in out["floor"]:
            ops = ", ".join(f"{o['kind']} {o['ms']:.1f}" for o in r["ops"] if o["ms"] > 0)
            md.append(f"| {r['tool']} at {r['shape']} | {r['step_ms']:.1f} | {r['floor_ms']:.1f} | "
                      f"{r['step_over_floor']:.2f} | {r['optimizer_floor_ms']:.1f} | {ops} |")
        md.append("")
    return md


def _md_quality(out: dict) -> list[str]:
    md = []
    t = out.get("time_to_target")
    if t or out.get("quality"):
        md += ["| time to quality (Tiny Shakespeare, char, full validation split) | figure |", "|---|---|"]
        if t:
            reached = f"{t['seconds']:.1f} s" if t["seconds"] is not None else "not reached"
            md.append(f"| seconds of training to val loss {t['target']} (run with a {t['budget_s']:.0f} s budget) "
                      f"| {reached} (final {t['final_val_loss']:.4f}) |")
        for r in out.get("quality", []):
            md.append(f"| val loss after {r['budget_s']:.0f} s of training ({r['steps']} steps, "
                      f"{r['wall_s']:.0f} s wall with evals) | {r['val_loss']:.4f} |")
        md.append("")
    return md


def _md_generation(out: dict) -> list[str]:
    md = []
    if out.get("generation"):
        md += ["| generation, batch 1 (nanogpt-char-cpu shape) | tokens/s | compiling and warm-up (s) |",
               "|---|---|---|"]
        for r in out["generation"]:
            first = f"{r['first_s']:.1f}" if r.get("compiled") else "-"
            md.append(f"| {r['new_tokens']} new tokens, {generation_label(r)} | {r['tokens_per_s']:,.0f} | {first} |")
        md.append("")
    if out.get("generation_batched"):
        md += markdown_table(["batched generation (eager, one-token prompts, no stops)", "tokens/s", "ms/step",
                              "floor ms/step", "floor tokens/s", "floor / speed", "cold floor ms/step",
                              "cold floor / speed"],
                             [[f"{r['shape']}, batch {r['batch']}, {r['new_tokens']} new tokens",
                               f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:.2f}", f"{r['floor_ms_per_step']:.2f}",
                               f"{r['floor_tokens_per_s']:,.0f}", f"{r['floor_over_speed']:.2f}",
                               f"{r['floor_cold_ms_per_step']:.2f}", f"{r['floor_cold_over_speed']:.2f}"]
                              for r in out["generation_batched"]])
    c = out.get("chat")
    if c:
        md += [f"| chat answer, batch 1 ({c['preset']}, random init, char tokenizer) | prompt tokens | time to first "
               "token (ms) | tokens/s |", "|---|---|---|---|",
               f"| {c['new_tokens']} new tokens after a conversation filling 3/4 of the {c['block']}-token context "
               f"| {c['prompt_tokens']} | {c['first_token_ms']:.1f} | {c['tokens_per_s']:,.0f} |", ""]
    return md


def _md_data(out: dict) -> list[str]:
    md = []
    if out.get("tokenizers"):
        md += ["| data | figure |", "|---|---|"]
        for r in out["tokenizers"]:
            md.append(f"| tokenize with {r['tokenizer']} (vocab {r['vocab_size']}) | {r['encode_mb_per_s']:.1f} MB/s "
                      f"(building it: {r['build_s']:.2f} s) |")
        if "memory" in out:
            m = out["memory"]
            md.append(f"| peak RSS of `lmlab train --preset {m['preset']}` | {m['peak_rss_mb']:.0f} MB |")
        md.append("")
    return md


def _md_nanogpt(out: dict) -> list[str]:
    md = []
    ng = out.get("nanogpt")
    if ng:
        md += ["| against nanoGPT (its CPU shape, alternated in one process) | lmlab / nanoGPT (median) | spread "
               "over blocks | lmlab | nanoGPT |", "|---|---|---|---|---|"]
        for r in ng["throughput"]:
            md.append(f"| training, {'compiled' if r['compile'] else 'eager'}, fp32 ({r['blocks']} blocks of "
                      f"{r['steps_per_block']} steps) | {r['ratio_median']:.2f}x | {r['ratio_min']:.2f}-"
                      f"{r['ratio_max']:.2f} | {r['lmlab']['step_ms']:.1f} ms/step, MFU "
                      f"{r['lmlab']['mfu_vs_float32']:.0%} | {r['nanogpt']['step_ms']:.1f} ms/step, MFU "
                      f"{r['nanogpt']['mfu_vs_float32']:.0%} |")
        for r in ng["generation"]:
            label = generation_label({"kv_cache": True, "compiled": r["compiled"]})
            md.append(f"| generation, {r['new_tokens']} tokens, batch 1 ({label}; nanoGPT recomputes its window) "
                      f"| {r['ratio_median']:.2f}x | "
                      f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f} | {r['lmlab']['tokens_per_s']:,.0f} tok/s | "
                      f"{r['nanogpt']['tokens_per_s']:,.0f} tok/s |")
        if "runs" in ng:
            r = ng["runs"]
            md.append(f"| training, whole runs (`lmlab train --preset nanogpt-char-cpu` against its README CPU command, "
                      f"{r['rounds']} rounds of {r['iters']} steps, median ms/step from step {r['steady_from']}) | "
                      f"{r['ratio_median']:.2f}x | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} | "
                      f"{r['lmlab']['step_ms']:.1f} ms/step | {r['nanogpt']['step_ms']:.1f} ms/step |")
        if "process" in ng:
            md.append(f"| peak RSS, nanoGPT's own CPU-config run | | | | {ng['process']['peak_rss_mb']:.0f} MB |")
        md.append("")
    return md
