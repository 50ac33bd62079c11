"""`jaxgen bench attention` on CPU: toy shapes, every implementation and layout timed, forward
and backward, the cache path and a decode step; the table and JSON carry them all."""
import json

from jaxgen import cli


def test_bench_attention_reports_every_impl_layout_and_cache_case(tmp_path, capsys):
    out = tmp_path / "attention.json"
    assert cli.main(["bench", "attention", "--repeats", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["platform"] == "cpu" and r["pallas_mode"] == "interpret"
    assert {(row["layout"], row["impl"]) for row in r["dense"]} == {
        (layout, impl) for layout in ("causal", "block_causal(32)", "dual_stream(32)") for impl in ("xla", "pallas")}
    assert all(row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 for row in r["dense"])
    assert {(row["chunk"], row["impl"]) for row in r["cache"]} == {(c, i) for c in (1, 8, 32) for i in ("xla", "pallas")}
    assert all(row["pct_hbm"] is None for row in r["cache"])  # no published bandwidth for a CPU
    (decode,) = r["decode"]  # CPU: the tiny preset, XLA only
    assert decode["impl"] == "xla" and decode["ms_per_step"] > 0 and decode["pct_of_floor"] is None
    printed = capsys.readouterr().out
    assert "GB/s filled" in printed and "AR decode step" in printed
