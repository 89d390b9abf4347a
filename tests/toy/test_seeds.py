import json

from vlmerge.toy.seeds import command, run_dir, table


def write_report(folder, rows):
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"rows": rows}))


def test_table_gives_mean_and_spread_per_row_and_merge(tmp_path):
    for seed, (evolved, dfs) in enumerate([(40.0, 10.0), (30.0, 20.0)]):
        write_report(run_dir(tmp_path, "toy_vqa_ja", "ps", seed), [
            {"name": "ja", "kind": "source (text only)", "rougeL_ja": 20.0 + seed, "exact_ja": 4.0},
            {"name": "evolved", "kind": "evolved", "rougeL_ja": evolved, "exact_ja": evolved / 2}])
        write_report(run_dir(tmp_path, "toy_vqa_ja", "dfs", seed), [
            {"name": "ja", "kind": "source (text only)", "rougeL_ja": 99.0},
            {"name": "evolved", "kind": "evolved", "rougeL_ja": dfs}])
    write_report(run_dir(tmp_path, "toy_math_ja", "ps", 0), [{"name": "evolved", "kind": "evolved", "acc_ja": 0.25}])
    text = table(tmp_path, ["toy_vqa_ja", "toy_math_ja"], ["ps", "dfs"], [0, 1])
    vqa, math = text.split("toy_math_ja (")
    rows = [line.split() for line in vqa.splitlines()[1:]]
    assert rows == [  # sources: from the first merge's runs only; a metric a report lacks is left out
        ["ja", "rougeL_ja", "20.5", "(20.0..21.0,", "n=2)", "exact_ja", "4.0", "(4.0..4.0,", "n=2)"],
        ["evolved", "(ps)", "rougeL_ja", "35.0", "(30.0..40.0,", "n=2)", "exact_ja", "17.5", "(15.0..20.0,", "n=2)"],
        ["evolved", "(dfs)", "rougeL_ja", "15.0", "(10.0..20.0,", "n=2)"]]
    assert math.splitlines()[-1].split() == ["evolved", "(ps)", "acc_ja", "25.0", "(-,", "n=1)"]  # in points


def test_commands_are_plain_vlmerge_runs(tmp_path):
    ps = command("toy_vqa_ja", "ps", 2, tmp_path, ["search.budget=8"])
    assert ps[1:] == ["-m", "vlmerge", "experiment=toy_vqa_ja", "seed=2", f"hydra.run.dir={tmp_path}",
                      "merge=ties_dare", "search.budget=8"]  # PS alone, whatever the experiment's default
    assert command("toy_math_ja", "ps_dfs", 0, tmp_path, [])[-1] == "merge=ps_dfs_compact"
    assert command("toy_math_ja", "dfs", 0, tmp_path, [])[-1] == "merge=dfs_compact"
