"""The measured/target table of launch/gpu_check.sh, from the files it wrote (standard library only).

    python3 launch/gpu_report.py OUTDIR

Reads OUTDIR/meta.json, test_gpu.xml (pytest's JUnit report), the ``jaxlm.bench`` JSONs
<size>-recipe.json, <size>-dropout0.json and <size>-fp8.json, and hlo/fp8.hlo.txt, and prints one
markdown table: each of issue 25's GPU targets as measured / target, with the same run's torch row
as the denominator of every ratio. A row whose run is missing or failed says so instead of a number.
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# The fp8 GEMMs XLA's GPU backend rewrites quantise -> dequantise -> dot into (cuBLASLt, float8 operands).
F8_GEMM = re.compile(r'custom_call_target="__cublas\$lt\$matmul\$f8"')


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _result(bench: dict | None, regime: str) -> dict | None:
    for r in (bench or {}).get("results", []):
        if r.get("regime") == regime and "error" not in r:
            return r
    return None


def _vs_torch(bench: dict | None, regime: str) -> float | None:
    r, base = _result(bench, regime), (bench or {}).get("baseline")
    return r["tokens_per_s"] / base["tokens_per_s"] if r and base else None


def tests_summary(xml_path: Path) -> str | None:
    """'N passed, F failed, S skipped' from pytest's --junitxml report."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n, fail, err, skip = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return f"{n - fail - err - skip} passed, {fail + err} failed, {skip} skipped"


def f8_gemms(hlo_path: Path) -> tuple[int, int] | None:
    """(cuBLASLt f8 GEMM custom calls, instructions with a float8 array at all): if XLA routed the fp8
    dots elsewhere (a Triton GEMM fusion, or back to bf16), the second number says which."""
    try:
        lines = hlo_path.read_text().splitlines()
    except OSError:
        return None
    return sum(bool(F8_GEMM.search(x)) for x in lines), sum("f8e4m3fn[" in x or "f8e5m2[" in x for x in lines)


def rows(out: Path, size: str = "small") -> list[tuple[str, str, str, str]]:
    """(what, measured, target, met) per target of issue 25 part 3 (gpt2_medium: the ratios to HF only)."""
    recipe, fast, fp8 = (_load(out / f"{size}-{v}.json") for v in ("recipe", "dropout0", "fp8"))
    tok = lambda b, reg: (lambda r: r and r["tokens_per_s"])(_result(b, reg))
    fmt_tok = lambda v: f"{v:,.0f}" if v else "not measured"
    fmt_x = lambda v: f"{v:.2f}x" if v else "not measured"
    met = lambda v, t: "n/a" if v is None else ("yes" if v >= t else "**no**")
    if size != "small":
        return [(f"gpt2_{size} {name}, {regime}, vs HF{extra}", fmt_x(v), "≥ 1.1x", met(v, 1.1))
                for name, bench, regimes, extra in (("recipe", recipe, ("fp16_upcast",), " (same dropout)"),
                                                     ("dropout 0", fast, ("fp16_upcast", "bf16_upcast"), " + torch.compile"))
                for regime in regimes for v in [_vs_torch(bench, regime)]]
    out_rows = []
    v = tok(recipe, "fp16_upcast")
    out_rows.append((f"gpt2_{size} recipe (attn dropout 0.1), fp16_upcast, tokens/s", fmt_tok(v), "≥ 330,000",
                     met(v, 330e3)))
    v = _vs_torch(recipe, "fp16_upcast")
    out_rows.append(("  same, vs HF with the same dropout", fmt_x(v), "≥ 1.2x", met(v, 1.2)))
    for regime in ("fp16_upcast", "bf16_upcast"):
        v = tok(fast, regime)
        out_rows.append((f"gpt2_{size} dropout 0, {regime}, tokens/s", fmt_tok(v), "≥ 480,000", met(v, 480e3)))
        v = _vs_torch(fast, regime)
        out_rows.append(("  same, vs HF + torch.compile", fmt_x(v), "≥ 1.3x", met(v, 1.3)))
    f8 = f8_gemms(out / "hlo" / "fp8.hlo.txt")
    out_rows.append(("fp8: cuBLASLt f8 GEMMs in the compiled step",
                     "not measured" if f8 is None else f"{f8[0]} (float8 arrays in {f8[1]} instructions)", "> 0",
                     "n/a" if f8 is None else ("yes" if f8[0] > 0 else "**no**")))
    a, b, base = tok(fp8, "fp8"), tok(fast, "bf16_upcast"), (fast or {}).get("baseline")
    vs_hf = f"; {a / base['tokens_per_s']:.2f}x HF + torch.compile" if a and base else ""
    out_rows.append(("  fp8 tokens/s beside bf16_upcast (dropout 0)",
                     f"{a:,.0f} vs {b:,.0f} ({a / b:.2f}x){vs_hf}" if a and b else "not measured", "reported",
                     "n/a" if not (a and b) else "reported"))
    compiles = [r["compile_s"] for b in (recipe, fast, fp8) for r in (b or {}).get("results", []) if "compile_s" in r]
    v = max(compiles) if compiles else None
    out_rows.append(("compile, slowest row (s)", f"{v:.1f}" if v else "not measured", "< 60",
                     "n/a" if v is None else ("yes" if v < 60 else "**no**")))
    prof = _result(fast, "fp16_upcast")
    if prof and prof.get("profile"):
        busy, step = prof["profile"]["busy_ms"], prof["step_s"] * 1e3
        out_rows.append(("profile: kernel time / step time (fp16_upcast, dropout 0)",
                         f"{busy:.1f} / {step:.1f} ms ({busy / step:.0%})", "reported", "reported"))
    else:
        out_rows.append(("profile: kernel time / step time (fp16_upcast, dropout 0)", "not measured", "reported", "n/a"))
    return out_rows


def render(out: Path, sizes=("small",)) -> str:
    out = Path(out)
    meta = _load(out / "meta.json") or {}
    device = meta.get("device") or "unknown device"
    lines = [f"## gpu_check: measured / target on {device}"]
    if "H200" in device:
        lines.append("(an H200: the absolute targets were set for an H100; the ratios to torch are the binding ones)")
    if meta.get("cache_entries_at_start"):
        lines.append(f"(the compile cache held {meta['cache_entries_at_start']} entries at the start: "
                     "compile times are cache hits, not cold compiles)")
    lines.append(f"tests/test_gpu.py: {tests_summary(out / 'test_gpu.xml') or 'not run'}")
    lines += ["", "| target | measured | target | met |", "|---|---|---|---|"]
    for size in sizes:
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(out, size)]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python3 launch/gpu_report.py OUTDIR [SIZE ...]")
    print(render(Path(sys.argv[1]), tuple(sys.argv[2:]) or ("small",)))
