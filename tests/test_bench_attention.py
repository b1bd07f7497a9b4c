"""scripts/bench_attention.py runs both attention forms, and the table says what the rule picks."""

import json
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_attention  # noqa: E402

import dpr_jax.models.bert as bert  # noqa: E402


def test_bench_attention_times_both_forms_and_reports_the_rule(tmp_path, capsys):
    out = tmp_path / "attn.json"
    argv = ["--model", "tiny", "--devices", str(jax.device_count()), "--rows", "1,4",
            "--lengths", "16,64", "--reps", "1", "--json", str(out)]  # fmt: skip
    rule = bert._batched_cpu_attention
    assert bench_attention.main(argv) == 0
    assert bert._batched_cpu_attention is rule  # the module's own rule is back
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 2 * 2  # dtypes x rows x lengths
    for r in rows:
        want = (
            r["dtype"] == "bfloat16"
            and r["rows_per_device"] >= 4
            and (
                r["rows_per_device"] * 4 * r["tokens"] ** 2 * 4 <= bert.BATCHED_CPU_ATTENTION_BYTES
            )
        )
        assert r["rule"] == ("batched" if want else "looped"), r
        assert r["looped_ms"] > 0 and r["batched_ms"] > 0 and r["rule_over_best"] >= 1
        # the same numbers either way (float32 logits of the mixed or float32 forward pass)
        assert r["max_abs_diff"] < 1e-3, r
    table = capsys.readouterr().out
    assert "| bfloat16 | 4 | 16 |" in table and "| float32 | 1 | 64 |" in table
