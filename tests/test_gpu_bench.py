"""analyses.gpu_bench cannot rot: its --small mode (a tiny Llama-3 shape on the CPU) runs every measurement."""

import json
import math

from analyses import gpu_bench


def test_small_mode_runs_every_measurement_and_writes_the_table(tmp_path, capsys):
    results = gpu_bench.main(["--small", "--out", str(tmp_path), "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(results))
    assert json.loads((tmp_path / "gpu_bench.json").read_text()) == json.loads(json.dumps(results))
    rows = results["shapes"]["tiny"]
    for ratio in ("gradient_over_forward", "hooked_over_hf_generate", "controlled_over_plain",
                  "search_iteration_in_generations"):
        assert math.isfinite(rows[ratio]) and rows[ratio] > 0, ratio
    assert rows["search_iterations_run"] == {"1": 1, "3": 3}  # every candidate accepted: a fixed count
    assert [int(b) for b in rows["search_throughput"]] == results["batches"] == [1, 2, 4]
    assert all(t["prompts"] == int(b) and t["prompts_per_s"] > 0 for b, t in rows["search_throughput"].items())
    assert rows["forward_peak_gib"] is None  # no GPU memory to report on the CPU
    table = (tmp_path / "gpu_bench.md").read_text()
    assert "search throughput, batch 4" in table
    assert table.count("\n") == 2 + 4 + 3 + 1  # header, four ratios, three batches, the unit
