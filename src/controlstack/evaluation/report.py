"""The fidelity report (``benchmarks/fidelity.py --json``) as the Markdown table the README and the
bundle's model card show, with each number next to the target the project sets for the bundle
(:data:`TARGETS`; ControlNet paper Sec. 4.3 for condition fidelity, docs/method.md §4)."""

from __future__ import annotations

#: Condition-fidelity targets: (min F1, min ratio to the no-control baseline).
TARGETS = {"canny": (0.5, 3.0)}
DEFAULT_TARGET = (0.0, 2.0)  # depth, seg, pose (structure F1): >= 2x the baseline
PROMPT_FIDELITY_TARGET = 0.70


def _mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def fidelity_table(report: dict) -> list[str]:
    """Markdown lines: one row per condition (F1 with / without control, ratio, FID, target met),
    then the prompt-fidelity and VAE round-trip lines."""
    fid = report.get("fid", {})
    mode = report.get("mode", "balanced")
    if "layer_weights" in report:
        mode += f", layer_weights={report['layer_weights']}"
    lines = [f"Held-out world scenes: {report.get('scenes', '?')}, {report.get('steps', '?')} UniPC steps, "
             f"CFG {report.get('cfg', '?')}, fixed seeds, control mode `{mode}` (the `balanced` column: the same "
             f"control on both CFG halves, diffusers' default, on the first {report.get('balanced_scenes', '?')} "
             "scenes).", "",
             "| condition | F1 with control | F1 no control | ratio | F1 balanced | FID | target | met |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    if "no control" in fid:
        lines.append(f"| (none: base model) | | | | | {fid['no control']:.3f} | | |")
    for name, f1 in report.get("f1", {}).items():
        ratio = f1["control"] / max(f1["no_control"], 1e-9)
        lo, times = TARGETS.get(name, DEFAULT_TARGET)
        target = (f"F1 >= {lo:g} and >= {times:g}x" if lo else f">= {times:g}x")
        ok = f1["control"] >= lo and round(ratio, 2) >= times  # the verdict agrees with the printed ratio
        fid_s = f"{fid[name]:.3f}" if name in fid else ""
        balanced = f"{f1['balanced']:.3f}" if "balanced" in f1 else ""
        lines.append(f"| {name} | {f1['control']:.3f} | {f1['no_control']:.3f} | {ratio:.2f}x | {balanced} | {fid_s} | "
                     f"{target} | {_mark(ok)} |")
    pf = report.get("prompt_fidelity", {})
    if pf:
        parts = [f"{k.upper()}: {v:.1%}" for k, v in pf.items()]
        best = max(pf.values())
        n = f" of {report['prompt_fidelity_objects']} objects" if "prompt_fidelity_objects" in report else ""
        real = (f"; the real renders score {report['prompt_fidelity_real']:.1%} (the metric's ceiling)"
                if "prompt_fidelity_real" in report else "")
        if "prompt_fidelity_vae" in report:  # what any generator decoding through this VAE can reach
            real += f", their VAE round trips {report['prompt_fidelity_vae']:.1%} (the ceiling through the VAE)"
        lines += ["", f"Prompt fidelity (seg control; object colour named by the caption){n}: {', '.join(parts)} "
                      f"(target >= {PROMPT_FIDELITY_TARGET:.0%}: {_mark(best >= PROMPT_FIDELITY_TARGET)}){real}."]
    if "vae_roundtrip_f1" in report:
        lines += ["", f"Ceiling: canny F1 of a real image against its own VAE round trip = "
                      f"{report['vae_roundtrip_f1']:.3f}."]
    if "chance_f1" in report:
        lines += ["", f"Chance: canny F1 of a real image against another scene's = {report['chance_f1']:.3f} "
                      "(the world's shared layout)."]
    return lines
