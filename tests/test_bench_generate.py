"""``fusedmoe bench-generate --quick``: a tiny model end to end (the record's
fields, the engines' tokens agree, the table), its DeepSeek-V3 row (the latent
cache's bytes per token against full keys and values), and its bad options."""

from __future__ import annotations

import json

import pytest

from fusedmoe.cli import main

pytestmark = pytest.mark.hf
pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_quick_run_records_every_engine(tmp_path, capsys):
    out = tmp_path / "rows.json"
    model = tmp_path / "model"
    assert main(["bench-generate", "--quick", "--json", str(out), "--dir", str(model)]) == 0
    payload = json.loads(out.read_text())
    assert payload["complete"] is True and payload["environment"]["usable_cpus"] >= 1
    assert payload["options"]["family"] == "qwen3_moe" and payload["options"]["quick"]
    rows = {r["engine"]: r for r in payload["rows"]}
    assert list(rows) == ["fused", "unfused", "transformers"]
    for r in rows.values():
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert len(r["prefill_times_s"]) == len(r["decode_round_s"]) == 1  # --quick: 1 round
        assert r["prefill_s"] == r["prefill_times_s"][0]
        assert r["prefill_tokens_per_s"] == pytest.approx(16 / r["prefill_s"])
        assert r["decode_tokens_per_s"] == pytest.approx(1 / r["decode_step_s"])
        assert set(r["decode_s_at_depth"]) == {"16", "64"}
        assert r["decode_depth_growth"] == pytest.approx(
            r["decode_s_at_depth"]["64"] / r["decode_s_at_depth"]["16"])
        assert r["load_rss_peak_mib"] >= r["load_rss_before_mib"] > 0
        assert 0 < r["decode_weight_bytes"] < r["model_bytes"]  # 2 of 8 experts per layer
        assert len(r["tokens"][0]) == 8
        # grouped-query attention caches keys and values of 2 heads of 16, 2 layers, f32
        assert r["cache_bytes_per_token"] == r["cache_bytes_per_token_full_kv"] == 2 * 2 * 16 * 8
        assert r["model"] == "qwen3_moe"
    for name in ("fused", "unfused"):
        # float32 greedy: the very tokens transformers' generate gives
        assert rows[name]["same_tokens"] is True and rows[name]["first_difference"] is None
        assert rows[name]["decode_speedup"] == pytest.approx(
            rows["transformers"]["decode_step_s"] / rows[name]["decode_step_s"])
        assert rows[name]["implementation"].startswith("backend ")
    assert "transformers" in capsys.readouterr().out
    # the model directory is kept, and a second run reuses it (no transformers build)
    assert (model / "config.json").is_file()
    assert main(["bench-generate", "--quick", "--dir", str(model), "--new-tokens", "2",
                 "--depths", "4", "--depth-steps", "1"]) == 0
    assert "building the model" not in capsys.readouterr().out


def test_deepseek_v3_row_caches_the_latent(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["bench-generate", "--quick", "--model", "deepseek_v3", "--json", str(out),
                 "--new-tokens", "4", "--depths", "4", "--depth-steps", "1"]) == 0
    payload = json.loads(out.read_text())
    assert payload["complete"] is True
    assert (payload["options"]["model"], payload["options"]["family"]) == ("deepseek_v3",) * 2
    assert payload["options"]["fields"]["n_routed_experts"] == 16  # --quick: 16, else 256
    rows = {r["engine"]: r for r in payload["rows"]}
    assert list(rows) == ["fused", "unfused", "transformers"]
    # 3 layers, f32: the latent (32) and the rotated key part (8), against 4 heads'
    # keys (16 + 8) and values (16): what transformers' cache holds
    full_kv = 3 * 4 * (16 + 8 + 16) * 4
    for name in ("fused", "unfused"):
        assert rows[name]["cache_bytes_per_token"] == 3 * (32 + 8) * 4
        assert rows[name]["same_tokens"] is True  # f32 greedy: transformers' tokens
    assert rows["transformers"]["cache_bytes_per_token"] == full_kv
    assert {r["cache_bytes_per_token_full_kv"] for r in rows.values()} == {full_kv}
    printed = capsys.readouterr().out
    assert "bench-generate: deepseek_v3 float32" in printed
    assert "multi-head latent attention" in printed and "1 shared" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "mixtral"], "--model: got 'mixtral', expected one of qwen3_moe, deepseek_v3"),
        (["--dtype", "f16"], "--dtype: got 'f16', expected float32/f32 or bfloat16/bf16"),
        (["--backend", "cuda"], "--backend: got 'cuda', expected one of"),
        (["--new-tokens", "1"], "--new-tokens: got '1', expected an integer >= 2"),
        (["--depths", "64,0"], "--depths: got '0', expected an integer >= 1"),
        (["--prompt-len", "4000", "--new-tokens", "100"],
         "--prompt-len/--new-tokens: 4000 + 100 tokens exceed the model's 4096 positions"),
        (["--depths", "4090", "--depth-steps", "8"], "--depths/--depth-steps: 4090 + 8"),
        (["--dir", "{file}"], "--dir: "),
        (["--dir", "{tmp}"], "holds other files"),
        (["--json", "{tmp}"], "--json: "),
    ],
)
def test_bad_options(argv, message, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{file}", str(tmp_path / "afile"))
            for a in argv]
    assert main(["bench-generate", "--quick", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
