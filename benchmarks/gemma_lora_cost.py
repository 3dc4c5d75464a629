"""What a LoRA fine-tune and a label-likelihood evaluation of Gemma 3 270M cost here, before planning a run.

Times (wall, on whatever machine runs it; the machine's load average is recorded with each number):
* the model load from the cached HF directory (``--model gemma3-270m``, eval/models.py);
* ``--steps`` LoRA steps (rank 8 on every attention/MLP projection, eval/lm_lora.py) of ``--batch`` examples of
  a real task with the loss on the label tokens only;
* scoring ``--texts`` test texts against every class of the task (eval/causal_lm.py), as ``tvbasis eval`` and an
  accuracy evaluation do;
and extrapolates what ``--tasks`` tasks × ``--train`` examples × 1 epoch and an evaluation of ``--eval-texts``
texts per task at ``--lambdas`` λ values would take at those rates.

    python benchmarks/gemma_lora_cost.py --task mcid --steps 2 --batch 8 --texts 8 --dtypes float32 bfloat16

With several ``--dtypes`` each is timed in turn on the same examples (bfloat16: matrix products under autocast,
the weights float32 — mixed-precision LoRA training and scoring); the extrapolation uses the one that scored fastest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from tvbasis.eval.causal_lm import CausalLMScorer
from tvbasis.eval.finetune import FinetuneSettings
from tvbasis.eval.lm_lora import lm_lora_settings, load_lm, train_lm_lora
from tvbasis.eval.models import resolve_model
from tvbasis.eval.tasks import load_task

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="mcid")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--texts", type=int, default=8)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--tasks", type=int, default=4, help="tasks of the planned run (extrapolation)")
    p.add_argument("--train", type=int, default=500, help="training examples per task of the planned run")
    p.add_argument("--eval-texts", type=int, default=128 + 32, help="test + dev texts per task of the planned run")
    p.add_argument("--lambdas", type=int, default=6, help="λ values evaluated per planned store (extrapolation)")
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32"])
    p.add_argument("--out", default=str(RESULTS / "gemma_lora_cost"))
    a = p.parse_args(argv)
    res: dict[str, object] = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def load() -> float:
        return round(os.getloadavg()[0], 1)

    t0 = time.time()
    model_dir, _ = resolve_model("gemma3-270m")
    res["resolve_seconds"] = round(time.time() - t0, 1)
    task = load_task(a.task, max_train=a.steps * a.batch, max_dev=8, max_test=a.texts, seed=0)
    res["task"], res["classes"] = a.task, task.num_classes
    settings = FinetuneSettings(max_train=a.steps * a.batch, max_length=a.max_length, batch_size=a.batch)
    runs: dict[str, dict[str, object]] = {}
    fastest: tuple[str, float, float] | tuple[()] = ()  # (precision, step s, s per text) of the fastest scoring
    md_rows: list[str] = []
    for name in a.dtypes:
        dtype = getattr(torch, name)
        r: dict[str, object] = {}
        t0 = time.time()
        model, tok = load_lm(model_dir)
        r["load_seconds"] = round(time.time() - t0, 1)
        res["parameters"] = sum(p.numel() for p in model.parameters())
        r["load_before_train"] = load()
        _, stats = train_lm_lora(model, tok, task, settings, lm_lora_settings(8), max_steps=a.steps, dtype=dtype)
        r["train"] = stats
        r["load_after_train"] = load()
        del model
        lm = CausalLMScorer(model_dir, max_length=a.max_length, batch_size=16)
        lm.eval_dtype = dtype
        t0 = time.time()
        scores = lm.scores(task["test"].texts, task.label_texts)
        score_s = time.time() - t0
        r["score_seconds"] = round(score_s, 1)
        r["score_sequences"] = a.texts * task.num_classes
        r["load_after_score"] = load()
        r["accuracy"] = float((scores.argmax(-1) == torch.tensor(task["test"].labels)).float().mean())
        runs[name] = r
        step_of = min(stats["step_seconds"])  # type: ignore[type-var, arg-type]
        per_text_of = score_s / a.texts
        if not fastest or per_text_of < fastest[2]:
            fastest = (name, step_of, per_text_of)
        md_rows += [f"| {name}: load the cached HF directory | {r['load_seconds']} s |",
                    f"| {name}: LoRA step, batch {a.batch}, label-token loss, max length {a.max_length} | "
                    f"{', '.join(str(x) for x in stats['step_seconds'])} s (load avg {r['load_before_train']}–"  # type: ignore[union-attr]
                    f"{r['load_after_train']}) |",
                    f"| {name}: score {a.texts} {a.task} texts × {task.num_classes} classes | {r['score_seconds']} s "
                    f"({per_text_of:.2f} s per text; load avg {r['load_after_score']}; zero-shot accuracy "
                    f"{100 * r['accuracy']:.1f} %) |"]  # type: ignore[operator]
    res["runs"] = runs
    best, step, per_text = fastest  # type: ignore[misc]
    train_h = a.tasks * (a.train / a.batch) * step / 3600
    # per task: its own adapter at λ = 1, plus the stores' additions (all tasks) at `lambdas` values
    eval_h = a.tasks * a.eval_texts * per_text * (1 + a.lambdas) / 3600
    res["extrapolated"] = {"dtype": best, "tasks": a.tasks, "train_examples": a.train,
                           "train_hours": round(train_h, 2), "eval_texts_per_task": a.eval_texts,
                           "lambdas": a.lambdas, "eval_hours_per_store": round(eval_h, 2),
                           "step_seconds_used": step, "score_seconds_per_text": round(per_text, 2)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = [f"# Gemma 3 270M LoRA cost ({res['date']})", "", f"`{res['command']}`", "",
          "| measure | value |", "|---|---|", *md_rows,
          f"| extrapolated ({best}): {a.tasks} tasks × {a.train} examples, 1 epoch | {train_h:.1f} h |",
          f"| extrapolated ({best}): evaluating one store ({a.tasks} tasks × {a.eval_texts} texts × "
          f"{1 + a.lambdas} λ) | {eval_h:.1f} h |"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
