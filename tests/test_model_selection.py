"""DomainBed's three sweep criteria on a worked example whose numbers make each criterion pick other hparams.

The fake sweep: benchmark "Toy" with domains A, B, C; method ERM; hparams seeds 0, 1, 2; checkpoints at
steps 100 and 200. Held out A, trial 0, the runs' records are (accuracies):

    hparams | step | sources' val (B, C) | A in | A out || B in, run {A,B} | C in, run {A,C}
    0       | 100  | .60 .70  (mean .65) | .50  | .55   || .50             | .50
    0       | 200  | .62 .70  (mean .66) | .52  | .90   || .55             | .55
    1       | 100  | .80 .80  (mean .80) | .40  | .40   || .60             | .60
    1       | 200  | .70 .70  (mean .70) | .45  | .50   || .58             | .60
    2       | 100  | .60 .60  (mean .60) | .70  | .60   || .90             | .80
    2       | 200  | .64 .64  (mean .64) | .75  | .70   || .70             | .70

By hand:
* training-domain validation: best step per setting by mean source val: hp0 step 200 (.66, test .52),
  hp1 step 100 (.80, test .40), hp2 step 200 (.64, test .75) -> hp1, **.40** (early stopping: step 100);
* leave-one-domain-out: val(step) = (B in of {A,B} + C in of {A,C}) / 2: hp0 .50/.55 -> step 200 (.55,
  test .52); hp1 .60/.59 -> step 100 (.60, test .40); hp2 .85/.70 -> step 100 (.85, test .70) -> hp2, **.70**;
* oracle: last step, val = A out: hp0 .90 (test .52), hp1 .50, hp2 .70 -> hp0, **.52**.

Trial 1 repeats trial 0 with every "A in" 0.10 higher: the same choices, tests .50, .80, .62. Over the two
trials: training-domain 45.0 ± 5.0, leave-one-domain-out 75.0 ± 5.0, oracle 57.0 ± 5.0 (sample std / sqrt 2).
"""

import json

import pytest

from dg_lightning.eval import model_selection as ms
from dg_lightning.eval.report import report_main

# (hparams, step) -> (val B, val C, A in, A out, B in of run {A,B}, C in of run {A,C})
TABLE = {
    (0, 100): (.60, .70, .50, .55, .50, .50), (0, 200): (.62, .70, .52, .90, .55, .55),
    (1, 100): (.80, .80, .40, .40, .60, .60), (1, 200): (.70, .70, .45, .50, .58, .60),
    (2, 100): (.60, .60, .70, .60, .90, .80), (2, 200): (.64, .64, .75, .70, .70, .70),
}


def write_run(root, held, trial, h, records, finished=True):
    run = root / "+".join(held) / f"trial{trial}" / f"hp{h}"
    run.mkdir(parents=True)
    (run / "sweep_run.json").write_text(json.dumps({"algorithm": "ERM", "dataset": "Toy", "test_domains": held,
                                                "trial_seed": trial, "hparams_seed": h, "hparams": {"lr": h}}))
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        (run / "results.json").write_text(json.dumps({"selections": {}}))
    return run


def write_sweep(root, trials=(0, 1)):
    for trial in trials:
        shift = 0.1 * trial
        for h in range(3):
            single, ab, ac = [], [], []
            for step in (100, 200):
                vb, vc, a_in, a_out, b_in, c_in = TABLE[(h, step)]
                single.append({"step": step, "val": {"B": vb, "C": vc}, "test_in": {"A": a_in + shift},
                               "test_out": {"A": a_out}})
                # the two-held-out runs: the other held-out domain's "in" split is what LODO reads
                ab.append({"step": step, "val": {"C": 0.5}, "test_in": {"A": 0.3, "B": b_in},
                           "test_out": {"A": 0.3, "B": 0.3}})
                ac.append({"step": step, "val": {"B": 0.5}, "test_in": {"A": 0.3, "C": c_in},
                           "test_out": {"A": 0.3, "C": 0.3}})
            write_run(root, ["A"], trial, h, single)
            write_run(root, ["A", "B"], trial, h, ab)
            write_run(root, ["A", "C"], trial, h, ac)
    return root


def chosen(runs, criterion):
    return {(r["domain"], r["seed"]): (r["hparams_seed"], r["step"], round(r["acc"], 6), round(r["val"], 6))
            for r in ms.select(runs, criterion)}


def test_each_criterion_picks_its_own_hparams(tmp_path):
    runs, warnings = ms.find_sweep_runs([write_sweep(tmp_path / "sweep")])
    assert len(runs) == 18 and not warnings
    assert chosen(runs, ms.TRAINING_DOMAIN) == {("A", 0): (1, 100, 0.40, 0.80), ("A", 1): (1, 100, 0.50, 0.80)}
    assert chosen(runs, ms.LEAVE_ONE_OUT) == {("A", 0): (2, 100, 0.70, 0.85), ("A", 1): (2, 100, 0.80, 0.85)}
    assert chosen(runs, ms.ORACLE) == {("A", 0): (0, 200, 0.52, 0.90), ("A", 1): (0, 200, 0.62, 0.90)}
    # B and C have no single-held-out runs here: no row for them under any criterion
    assert {r["domain"] for r in ms.sweep_rows(runs)} == {"A"}


def test_leave_one_out_needs_every_other_domain_at_the_step(tmp_path):
    root = write_sweep(tmp_path / "sweep", trials=(0,))
    # hp2's {A,C} run lost its step-100 checkpoint: hp2 can be scored at step 200 only (.70, test .75),
    # so hp2 still wins (.70 > hp1's .60) but with its step-200 test accuracy
    path = root / "A+C" / "trial0" / "hp2" / "records.jsonl"
    path.write_text(path.read_text().splitlines()[1] + "\n")
    runs, _ = ms.find_sweep_runs([root])
    assert chosen(runs, ms.LEAVE_ONE_OUT) == {("A", 0): (2, 200, 0.75, 0.70)}
    # without any {A,C} run, no setting can be scored by leave-one-domain-out
    runs = [r for r in runs if r.test_domains != ("A", "C")]
    assert chosen(runs, ms.LEAVE_ONE_OUT) == {}
    assert chosen(runs, ms.ORACLE) == {("A", 0): (0, 200, 0.52, 0.90)}


def test_ties_unfinished_runs_and_resumed_records(tmp_path):
    root = tmp_path / "sweep"
    rec = [{"step": 100, "val": {"B": .5, "C": .5}, "test_in": {"A": .3}, "test_out": {"A": .6}},
           {"step": 200, "val": {"B": .5, "C": .5}, "test_in": {"A": .4}, "test_out": {"A": .6}}]
    write_run(root, ["A"], 0, 3, rec)
    write_run(root, ["A"], 0, 1, rec)
    write_run(root, ["A"], 0, 2, rec, finished=False)
    runs, warnings = ms.find_sweep_runs([root])
    assert [r.hparams_seed for r in runs] == [1, 3] and "hp2: not finished" in warnings[0]
    # equal val: the first checkpoint, the lowest hparams seed
    assert chosen(runs, ms.TRAINING_DOMAIN) == {("A", 0): (1, 100, 0.3, 0.5)}
    # a step written twice (a run resumed after a crash) keeps its last line
    path = root / "A" / "trial0" / "hp1" / "records.jsonl"
    path.write_text(path.read_text() + json.dumps({**rec[0], "test_in": {"A": .9}}) + "\n")
    assert [r["test_in"]["A"] for r in ms.load_sweep_run(path.parent).records] == [.9, .4]


def test_report_tables_name_the_criteria(tmp_path, capsys):
    root = write_sweep(tmp_path / "sweep")
    assert report_main([str(root), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    for criterion, cell in ((ms.TRAINING_DOMAIN, "45.0 ± 5.0"), (ms.LEAVE_ONE_OUT, "75.0 ± 5.0"),
                            (ms.ORACLE, "57.0 ± 5.0")):
        block = md.split(f"model selection: {criterion}\n")[1].split("**Toy**")[0]
        assert f"| ERM | {cell} | {cell} |" in block  # A, then Avg (one domain)
        assert "among 3 setting(s)" in block and "2 trial seed(s) [0, 1]" in block
    choices = json.loads((tmp_path / "rep" / "report.json").read_text())["sweep_choices"]
    assert {(c["selection"], c["seed"], c["hparams_seed"]) for c in choices} == {
        (ms.TRAINING_DOMAIN, 0, 1), (ms.TRAINING_DOMAIN, 1, 1), (ms.LEAVE_ONE_OUT, 0, 2),
        (ms.LEAVE_ONE_OUT, 1, 2), (ms.ORACLE, 0, 0), (ms.ORACLE, 1, 0)}


def test_report_on_a_sweep_without_records_says_so(tmp_path, capsys):
    rec = [{"step": 100, "val": {"B": .5}, "test_in": {"A": .3}, "test_out": {"A": .6}}]
    run = write_run(tmp_path / "sweep", ["A"], 0, 0, rec, finished=False)
    (run / "results.json").write_text(json.dumps({"selections": {}}))
    (run / "records.jsonl").unlink()
    assert report_main([str(tmp_path / "sweep"), "--out", str(tmp_path / "rep")]) == 1
    err = capsys.readouterr().err
    assert "no records.jsonl" in err and "no finished run to tabulate" in err


def test_unknown_criterion():
    with pytest.raises(ValueError, match="unknown criterion"):
        ms.select([], "best test accuracy")
