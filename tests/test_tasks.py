"""Evaluation tasks: each task on tiny models, an oracle that solves it (100 %) and a uniform model at chance,
bad input (unknown task, lengths that are not k·L, a checkpoint of another vocabulary), the runner and the CLI."""

import json
import math

import numpy as np
import pytest
import torch

from freeatten_core import evaluate as E
from freeatten_core import tasks as TK
from freeatten_core import train as T
from freeatten_core.data import ByteTokenizer, TokenData
from freeatten_core.model import GPT, GPTConfig

TOK = ByteTokenizer()
TINY = dict(block_size=16, n_layer=1, n_head=2, n_embd=32)
SYNTHETIC = ("passkey", "recall", "induction")


@pytest.mark.parametrize("name", SYNTHETIC)
def test_oracle_solves_and_uniform_is_at_chance(name):
    task = TK.get_task(name)
    ex = task.make_examples(TOK, 96, 3, seed=0)
    assert ex.tokens.shape == (3, 97) and ex.span.shape == (3, 96) and (ex.span >= 0).any()
    solved = task.score(TK.InductionOracle(256), ex)
    assert solved["accuracy"] == 1.0 and solved["correct"] == solved["answers"]
    chance = task.score(TK.UniformModel(256), ex)
    assert chance["accuracy"] == 0.0  # the argmax of uniform logits is token 0, never an answer
    assert chance["loss"] == pytest.approx(math.log(256), rel=1e-6)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_examples_are_a_function_of_the_seed_and_the_answers_are_where_the_span_says(name):
    task = TK.get_task(name)
    a, b, c = (task.make_examples(TOK, 64, 4, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    text = TOK.decode(a.tokens[0].tolist())
    targets = a.tokens[0, 1:][a.span[0] >= 0]
    answer = TOK.decode(targets.tolist())
    if name == "passkey":
        assert text.endswith("The pass key is " + answer.strip()) and f"The pass key is {answer.strip()}." in text
        assert len(answer.strip()) == 5 and answer.strip().isdigit()
    elif name == "recall":
        assert len(answer) == a.meta["queries"] and answer.isdigit()
        context, queries = text.split(" |")
        for pair in queries.split():
            assert " " + pair in context  # every queried pair appeared in the context
    else:
        half = a.meta["half"]
        second = a.tokens[0, half:]
        assert torch.equal(second, a.tokens[0, :len(second)])


def test_passkey_depth_is_spread_and_reported():
    task = TK.get_task("passkey")
    ex = task.make_examples(TOK, 128, 20, seed=0)
    depth = ex.meta["depth"]
    assert depth.min() >= 0 and depth.max() <= 1 and depth.std() > 0.1
    res = task.score(TK.InductionOracle(256), ex)
    assert len(res["accuracy_by_depth"]) == res["depth_bins"] and all(a in (None, 1.0)
                                                                      for a in res["accuracy_by_depth"])


def test_a_real_model_runs_every_task_and_the_induction_baseline_is_the_first_copy():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, **TINY, attention="lssar"))
    data = TokenData(train=np.zeros(0, np.int64), val=[np.arange(400) % 256], vocab_size=256, tokenizer="byte",
                     corpus="test")
    for name in TK.TASKS:
        res = E.run_task(model, name, 16, (4, 8), 2, tokenizer=TOK, data=data)
        assert set(res) == {"4", "8"} and res["8"]["length"] == 128
        assert np.isfinite(res["8"]["loss_last" if "loss_last" in res["8"] else "loss"])
    ind = E.run_task(model, "induction", 16, (4,), 2, tokenizer=TOK)["4"]
    assert ind["loss_first_copy"] > 4.0  # untrained: about ln 256


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="unknown task 'passkey2'; valid tasks: loss, passkey, recall, induction"):
        TK.get_task("passkey2")
    with pytest.raises(ValueError, match="unknown task"):
        E.EvalConfig(tasks=("loss", "nope"))
    with pytest.raises(ValueError, match="must not repeat"):
        TK.check_tasks(["loss", "loss"])
    data = TokenData(train=np.zeros(0, np.int64), val=[np.arange(400) % 256], vocab_size=256, tokenizer="byte",
                     corpus="test")
    with pytest.raises(ValueError, match="multiple of the training length L = 16"):
        TK.get_task("loss").make_examples(TOK, 40, 2, 0, data=data, block_size=16)
    with pytest.raises(ValueError, match="needs the validation corpus"):
        TK.get_task("loss").make_examples(TOK, 32, 2, 0, block_size=16)
    with pytest.raises(ValueError, match="even length"):
        TK.get_task("induction").make_examples(TOK, 33, 2, 0)
    with pytest.raises(ValueError, match="needs at least"):
        TK.get_task("passkey").make_examples(TOK, 40, 2, 0)
    with pytest.raises(ValueError, match="needs more than 12 tokens"):
        TK.get_task("recall").make_examples(TOK, 12, 2, 0)
    with pytest.raises(ValueError, match="n \\(examples\\) must be an integer >= 1"):
        TK.get_task("recall").make_examples(TOK, 64, 0, 0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    T.train(T.config_from_preset("ci", out_dir=str(out), model=TINY, attention="lssa", max_steps=2, warmup_steps=1,
                                 batch_size=2, progress=False))
    return out


def test_checkpoint_runner_tasks_method_and_backend(run):
    res = E.evaluate_checkpoint(run, method="lssar", backend="reference", tasks=("induction", "passkey"),
                                factors=(4, 8), n_windows=2, batch_size=2, device="cpu", command="test")
    assert "results" not in res and set(res["tasks"]) == {"induction", "passkey"}
    assert res["evaluated"]["method"] == "lssar" and res["evaluated"]["backend"] == "reference"
    assert res["trained"]["method"] == "lssa" and res["data"] is None  # synthetic tasks need no corpus
    assert res["tasks"]["passkey"]["4"]["length"] == 64 and res["factors"] == [4, 8] and res["evaluation"]["tasks"] == ["induction", "passkey"]
    assert res["provenance"]["command"] == "test"


def test_a_checkpoint_of_another_vocabulary_is_refused(run, tmp_path):
    other = TokenData(train=np.zeros(0, np.int64), val=[np.arange(400) % 100], vocab_size=100, tokenizer="x",
                      corpus="x")
    with pytest.raises(ValueError, match="another vocabulary"):
        E.evaluate_checkpoint(run, data=other, factors=(1,), n_windows=1, device="cpu")
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    ckpt["model_config"]["vocab_size"] = 300
    ckpt["model"]["transformer.wte.weight"] = torch.zeros(300, 32)
    ckpt["model"]["lm_head.weight"] = torch.zeros(300, 32)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="another vocabulary"):
        E.evaluate_checkpoint(tmp_path, tasks=("induction",), factors=(1,), n_windows=1, device="cpu")


def test_cli_tasks(run, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert E.main(["--checkpoint", str(run), "--task", "recall", "--factors", "4", "--windows", "1",
                   "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["tasks"]) == ["recall"] and res["tasks"]["recall"]["4"]["answers"] == 4
    assert E.main(["--checkpoint", str(run), "--task", "bogus"]) == 2
    assert "unknown task 'bogus'" in capsys.readouterr().err


def test_run_tasks_over_seeds_and_the_claims_are_not_judged_at_chance(tmp_path):
    from freeatten_core import experiments as X

    res = X.run_tasks("ci", variants=["softmax", "lssar"], seeds=[0, 1], tasks=["induction", "passkey"],
                      out_dir=tmp_path / "runs", results_path=tmp_path / "r.json",
                      overrides=dict(model=TINY, max_steps=2, warmup_steps=1, batch_size=2),
                      evaluation=dict(factors=(4,), windows=2))
    assert [(r["variant"], r["seed"]) for r in res["runs"]] == [("softmax", 0), ("softmax", 1), ("lssar", 0),
                                                                ("lssar", 1)]
    assert json.loads((tmp_path / "r.json").read_text())["provenance"]["command"].startswith("freeatten_core.experiments")
    f, mean, std, values = X.task_curve(res, "induction", "lssar", "loss")
    assert f == [4] and values.shape == (2, 1) and np.isfinite(std).all()
    claims = {c["id"]: c for c in X.task_claims(res)}
    assert claims["lssar_passkey_beyond_L"]["reproduced"] is None  # untrained models: at chance, not testable
    with pytest.raises(ValueError, match="seeds must be distinct"):
        X.run_tasks("ci", seeds=[0, 0], out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="unknown task"):
        X.run_tasks("ci", tasks=["passkee"], out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="overrides cannot set seed"):
        X.run_tasks("ci", overrides={"seed": 3}, out_dir=tmp_path / "x")


@pytest.mark.parametrize("args,msg", [
    (["--tasks", "passkee"], "unknown task 'passkee'"),
    (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
    (["--factors", "0"], "each length factor must be an integer >= 1"),
    (["--variants", "lssr"], "unknown variant"),
])
def test_experiments_tasks_cli_checks_before_work(args, msg, tmp_path, capsys):
    from freeatten_core import experiments as X

    assert X.main(["tasks", *args, "--out", str(tmp_path / "r.json")]) == 2
    assert msg in capsys.readouterr().err
