"""benchmarks/pareto.py, the architecture comparison, at toy sizes: every family joins the
sweep, budgets buy equal FLOPs, the second seed runs at the grid's best learning rate, a rerun
trains nothing, a changed definition is refused, and the card says what the runs say."""

import json
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import pareto  # noqa: E402

import glocal.models as gm  # noqa: E402
from tests.test_data import make_folder  # noqa: E402


def test_every_family_joins_the_sweep_and_budgets_buy_equal_flops(tmp_path):
    table = pareto.entries("small")
    assert set(gm.list_models()) <= set(table)  # a family added later joins through its `small` preset
    assert table["mor"].config == "mor_small_deep" and list(table)[0] == "transformer"
    ns = type("A", (), dict(budgets=[1e13], batch_size=16, seq_len=256, runs_dir=tmp_path))()
    cells = pareto.plan(ns, {k: table[k] for k in ("transformer", "fit", "moe")})
    assert [c["entry"].name for c in cells] == ["transformer", "fit", "moe"]
    for c in cells:
        fpt = pareto.describe(c["entry"], 256)["flops_per_token"]
        spent = c["steps"] * 16 * 256 * fpt
        assert abs(spent - 1e13) <= 16 * 256 * fpt / 2  # equal FLOPs up to one step's rounding
    steps = {c["entry"].name: c["steps"] for c in cells}
    assert steps["fit"] > steps["transformer"]  # FIT's cheaper tokens buy more of them


def test_the_grid_extends_past_an_edge_best(tmp_path):
    def done(lr, bpb):
        (tmp_path / f"lr{lr:g}-s0").mkdir()
        (tmp_path / f"lr{lr:g}-s0" / "result.json").write_text(json.dumps({"lr": lr, "bpb": bpb}))

    assert pareto.grid(tmp_path, [1e-3, 2e-3, 4e-3], 2) == ([1e-3, 2e-3, 4e-3], None)
    done(1e-3, 2.5), done(2e-3, 2.4)
    assert pareto.grid(tmp_path, [1e-3, 2e-3, 4e-3], 2) == ([4e-3], None)
    done(4e-3, 2.3)  # best at the upper edge: one more beyond it
    assert pareto.grid(tmp_path, [1e-3, 2e-3, 4e-3], 2) == ([8e-3], None)
    assert pareto.grid(tmp_path, [1e-3, 2e-3, 4e-3], 0) == ([], 4e-3)  # no extension asked
    done(8e-3, None)  # diverged: the best is inside again
    assert pareto.grid(tmp_path, [1e-3, 2e-3, 4e-3], 2) == ([], 4e-3)


@pytest.mark.slow
def test_sweep_resumes_refuses_changes_and_writes_the_card(tmp_path, monkeypatch, capsys):
    corpus = make_folder(tmp_path / "corpus")
    runs, card = tmp_path / "runs", tmp_path / "card.md"
    argv = ["--preset", "tiny", "--entries", "transformer", "--budgets", "2e9", "--lrs", "1e-3", "1e-2",
            "--extend", "1", "--seeds", "2", "--batch-size", "4", "--seq-len", "32", "--data", str(corpus),
            "--runs-dir", str(runs), "--decode-batch", "2", "--prompt-len", "32", "--decode-new", "8",
            "--card", str(card)]
    pareto.main(argv)
    folder = runs / "transformer" / "2e+09"
    grid = {float(p.parent.name[2:-3]): json.loads(p.read_text()) for p in folder.glob("lr*-s0/result.json")}
    first = min((1e-3, 1e-2), key=lambda lr: grid[lr]["bpb"])
    assert set(grid) == {1e-3, 1e-2, first / 2 if first == 1e-3 else first * 2}  # one value past the edge
    best = min(grid, key=lambda lr: grid[lr]["bpb"])
    seed1 = json.loads((folder / f"lr{best:g}-s1" / "result.json").read_text())
    assert seed1["seed"] == 1 and seed1["lr"] == best and seed1["bpb"] != grid[best]["bpb"]
    assert len(list(folder.iterdir())) == 4
    metrics = [json.loads(line) for line in (folder / f"lr{best:g}-s1" / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("step", 0) for m in metrics) == seed1["steps"]
    decode = json.loads((runs / "decode" / "transformer.json").read_text())
    assert decode["decode_tokens_per_s"] > 0 and 15 < decode["cache_bytes_32768"] / decode["cache_bytes_2048"] <= 16
    text = card.read_text()
    mean = (grid[best]["bpb"] + seed1["bpb"]) / 2
    assert f"**{best:.2g}: {grid[best]['bpb']:.3f}**" in text
    assert f"{mean:.3f} ± {abs(grid[best]['bpb'] - seed1['bpb']) / 2:.3f}" in text
    assert (tmp_path / "card_flops.png").is_file() or "no PNGs" in capsys.readouterr().out

    # A rerun trains nothing and rebuilds the same card.
    monkeypatch.setattr(pareto, "train_run", lambda *a: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(pareto, "measure_decode", lambda *a: json.loads((runs / "decode" / "transformer.json").read_text()))
    card.unlink()
    pareto.main(argv)
    assert re.sub(r"\d+\.\d+ h of", "", card.read_text()) == re.sub(r"\d+\.\d+ h of", "", text)

    # Another definition of the same entry is refused, and nothing is touched.
    with pytest.raises(SystemExit, match="holds runs of a different definition of 'transformer'"):
        pareto.main([*argv, "--seq-len", "64"])  # (argparse: the last one wins)
    assert len(list(folder.iterdir())) == 4
    with pytest.raises(SystemExit, match=r"unknown entries \['nope'\]"):
        pareto.main(["--entries", "nope", "--plan"])


def test_a_run_stopped_by_a_signal_is_not_recorded_as_finished(tmp_path, monkeypatch):
    import glocal.train.trainer as trainer
    monkeypatch.setattr(trainer, "train", lambda *a, **k: {"step": 3, "stopped": True})
    entry = pareto.entries("tiny")["transformer"]
    args = type("A", (), dict(batch_size=4, seq_len=32, data="default"))()
    run = dict(entry=entry, budget=1e9, steps=10, lr=1e-3, seed=0, dir=tmp_path / "lr0.001-s0")
    with pytest.raises(SystemExit, match="stopped at step 3 of 10 .* run the same command to resume"):
        pareto.train_run(run, args)
    assert not (tmp_path / "lr0.001-s0" / "result.json").exists()
