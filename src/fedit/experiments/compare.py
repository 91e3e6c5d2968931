"""The FedIT paper's comparison: Base, Local models, FedIT and Centralised, matched budgets.

Each contender is the same run config with another `federation.mode`; all are trained by
the simulation engine (resuming, so a re-run only scores; a changed config is refused,
see fedit.engine.run_dir) and scored on the same held-out
records: held-out loss per category always, plus a generation score per category — exact
match for the built-in synthetic skills, ROUGE-L otherwise. Writes into `out_dir`:
`scores.md` (tables), `scores.json`, `metrics.jsonl` (one line per contender) and PNG charts.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path

from peft import PeftModel
from rich.markup import escape

from fedit.client.dpo import preference_scores
from fedit.client.dpo_trainer import pair_logps
from fedit.config import (
    DATA_ATTACKS,
    AttackConfig,
    CompressionConfig,
    ConfigError,
    PrivacyConfig,
    RunConfig,
    SystemConfig,
)
from fedit.data.prepare import load_heldout, prepare_preferences
from fedit.data.records import Record
from fedit.engine.checkpoint import metrics_record
from fedit.engine.federation_data import scoring_examples, tokenize_pairs_for
from fedit.engine.simulation import Simulation, console
from fedit.eval.attack import attack_scores, record_generator
from fedit.eval.exact_match import format_score_table, score_by_category
from fedit.eval.loss import heldout_loss
from fedit.eval.report import save_bar_chart
from fedit.eval.rouge import rouge_l_by_category
from fedit.models.adapters import BASE_RESIDUAL
from fedit.models.inference import load_for_inference
from fedit.models.loading import load_model


@dataclass(frozen=True)
class Contender:
    """A model to compare: 'base', 'fedit', 'centralized', 'local:<client>' or
    'local:<category>+<category>' (records of those categories only)."""

    spec: str

    @property
    def name(self) -> str:
        return self.spec.replace(":", "-").replace("+", "_")

    def config(self, cfg: RunConfig, out_dir: Path) -> RunConfig:
        kind, _, arg = self.spec.partition(":")
        modes = {"fedit": "federated", "centralized": "centralized", "local": "local"}
        if kind not in modes or (kind == "local") != bool(arg):
            raise ConfigError(f"contender {self.spec!r}: expected {Contender.__doc__}")
        federation = replace(cfg.federation, mode=modes[kind])
        if kind == "local" and arg.isdigit():
            federation = replace(federation, local_client=int(arg))
        elif kind == "local":
            federation = replace(federation, local_categories=arg.split("+"))
        # Client-level DP, attacks, compressed uploads, simulated devices and mixed ranks
        # are a federation's: the baselines are clean references, at the global rank.
        if kind != "fedit":
            cfg = replace(
                cfg,
                privacy=PrivacyConfig(),
                attack=AttackConfig(),
                compression=CompressionConfig(),
                system=SystemConfig(),
                lora=replace(cfg.lora, client_ranks=[], rank_tiers=[], tier_shares=[]),
            )
            federation = replace(federation, selection="uniform")
        out = str(out_dir / self.name)
        return replace(cfg, federation=federation, output_dir=out).validate()


def generation_metric(cfg: RunConfig) -> str:
    return "exact_match" if cfg.data.path == "synthetic" else "rouge_l"


def score_model(
    cfg: RunConfig,
    adapter: Path | None,
    heldout: list[Record],
    losses: dict[str, dict] | None = None,
    attack: AttackConfig | None = None,
) -> tuple[dict[str, dict], list[str]]:
    """(scores, answers): held-out loss and the generation score per category for one
    model, the success of `attack` (default: cfg's) when it is a data attack
    (fedit.eval.attack), and its greedy answer to each held-out record.

    `losses` is the run's own held-out evaluation after its last round, when it has one
    (``final_heldout_loss``): the same records and tokens, so it is not computed twice.
    """
    tokenizer, model = load_for_inference(cfg, adapter)
    if losses is None:
        examples = scoring_examples(cfg, tokenizer, heldout, "held-out set")
        losses = heldout_loss(model, examples, tokenizer.pad_token_id, cfg.eval.batch_size)
    loss = {c: v["loss"] for c, v in losses.items() if c != "overall"}
    loss["mean"] = losses["overall"]["loss"]
    scores: dict[str, dict] = {"loss": loss}
    if cfg.data.preference_path:  # before merging: the reference is the adapter switched off
        scores["preference_accuracy"] = preference_accuracy(cfg, model, tokenizer, adapter)
    if isinstance(model, PeftModel):
        # Greedy decoding needs no adapter switching: one matmul per layer instead of three.
        model = model.merge_and_unload()
    generate = record_generator(model, tokenizer, cfg)
    answers = generate(heldout)
    references = [r.response for r in heldout]
    categories = [r.category for r in heldout]
    if generation_metric(cfg) == "exact_match":
        scores[generation_metric(cfg)] = score_by_category(answers, references, categories)
    else:
        scores[generation_metric(cfg)] = rouge_l_by_category(answers, references, categories)
    attack = cfg.attack if attack is None else attack
    if attack.kind in DATA_ATTACKS:
        scores["attack"] = attack_scores(attack, heldout, generate, answers)
    scores["samples"] = [
        {"instruction": r.instruction, "answer": a}
        for r, a in zip(heldout[:3], answers[:3], strict=True)
    ]
    return scores, answers


def final_heldout_loss(run_cfg: RunConfig) -> dict[str, dict] | None:
    """The held-out loss a finished run measured after its last round (that round's
    committed metrics record), or None if it has none there."""
    record = metrics_record(Path(run_cfg.output_dir), run_cfg.federation.rounds)
    return json.loads(record.read_text()).get("heldout") if record.is_file() else None


def preference_accuracy(cfg: RunConfig, model, tokenizer, adapter: Path | None) -> dict[str, float]:
    """Held-out preference accuracy per category: the share of pairs whose implicit reward
    β·(log π − log π_base) is higher for the chosen answer ('mean' is over all pairs).

    π_base is W0, the model before federation, as in the run's own held-out scores: the
    adapter switched off, or, when exact LoRA aggregation folded a residual into `model`'s
    base weights, a plain load of the base model.
    """
    pairs, _ = tokenize_pairs_for(cfg, tokenizer, prepare_preferences(cfg).heldout)
    logps = functools.partial(
        pair_logps, pairs=pairs, pad_id=tokenizer.pad_token_id, batch_size=cfg.eval.batch_size
    )
    policy = logps(model)
    if adapter is not None and (adapter / BASE_RESIDUAL).is_file():
        reference = logps(load_model(cfg.model))
    elif isinstance(model, PeftModel):
        with model.disable_adapter():
            reference = logps(model)
    else:  # the base model is its own reference: every reward is 0
        reference = policy
    categories = [p.category for p in pairs]
    scores = preference_scores(policy, reference, categories, cfg.dpo.beta)
    accuracy = {c: s["accuracy"] for c, s in scores.items() if c != "overall"}
    accuracy["mean"] = scores["overall"]["accuracy"]
    return accuracy


def run_comparison(cfg: RunConfig, contenders: list[str], out_dir: Path) -> dict[str, dict]:
    """Train (or resume) and score every contender spec; write tables and charts."""
    named = {
        Contender(spec).name: None if spec == "base" else Contender(spec).config(cfg, out_dir)
        for spec in contenders
    }
    return compare_configs(cfg, named, out_dir)


def compare_configs(
    cfg: RunConfig, named: dict[str, RunConfig | None], out_dir: Path
) -> dict[str, dict]:
    """Train (or resume) each named run config and score it on `cfg`'s held-out set;
    None stands for the untuned base model."""
    for name, run_cfg in named.items():
        if run_cfg is not None and run_cfg.lora.shared != "all":
            raise ConfigError(
                f"contender {name!r}: lora.shared = {run_cfg.lora.shared!r} keeps each "
                "client's B factors on the client, so its global adapter alone is the base "
                "model; train it with `fedit train` and score it with `fedit personalize`"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    heldout = load_heldout(cfg)
    metrics_file = out_dir / "metrics.jsonl"
    metrics_file.write_text("")  # contenders' own runs keep their metrics; this is the summary
    results: dict[str, dict] = {}
    answers: dict[str, list[str]] = {}
    for name, run_cfg in named.items():
        console.rule(f"[bold]{escape(name)}")
        if run_cfg is None:
            results[name], answers[name] = score_model(cfg, None, heldout)
        else:
            # Every contender is scored against the comparison's attack, also the baselines
            # that trained clean; the run's own final attack scoring would be a second pass.
            adapter = Simulation(run_cfg, score_attack=False).run(resume=True)
            losses = final_heldout_loss(run_cfg)
            scored = score_model(run_cfg, adapter, heldout, losses, cfg.attack)
            results[name], answers[name] = scored
        with metrics_file.open("a") as f:
            f.write(json.dumps({"model": name, **results[name]}) + "\n")
    judged = judge_answers(cfg, heldout, answers, out_dir / "judge") if cfg.eval.judge_model else ""
    write_report(cfg, results, out_dir, judged)
    return results


def judge_answers(
    cfg: RunConfig, heldout: list[Record], answers: dict[str, list[str]], out: Path
) -> str:
    """The LLM judge on the first eval.judge_questions held-out instructions: every
    contender's answers graded 1-10, and eval.judge_against against each other contender
    pairwise (fedit.eval.judge_run, its files under `out`); the summary as markdown."""
    from fedit.eval.judge_run import Endpoint, Question, api_key, run_judge, summary_table

    ev = cfg.eval
    if ev.judge_against not in answers:
        raise ConfigError(
            f"eval.judge_against: {ev.judge_against!r} is not a contender of "
            f"eval.compare ({', '.join(answers)})"
        )
    count = min(ev.judge_questions, len(heldout))
    questions = [
        Question(str(i), judged_question(r), r.category) for i, r in enumerate(heldout[:count])
    ]
    by_text = {name: {q.text: a[int(q.id)] for q in questions} for name, a in answers.items()}
    judge = Endpoint(ev.judge_url, ev.judge_model, api_key(ev.judge_key_env))
    others = [name for name in answers if name != ev.judge_against]
    summary = run_judge(
        questions,
        list(answers),
        lambda name: StoredAnswers(name, by_text[name]),
        judge,
        ["pairwise", "single"],
        out,
        judge_max_tokens=ev.judge_max_tokens,
        pairs=[(ev.judge_against, other) for other in others],
    )
    return f"### LLM judge\n\n{summary_table(summary)}"


def judged_question(record: Record) -> str:
    """What the judge is shown as the user's question: the instruction and its context."""
    return record.instruction + (f"\n\n{record.context}" if record.context.strip() else "")


class StoredAnswers:
    """An answerer that has its answers already: a contender's, by question text."""

    url = "fedit compare"  # no endpoint: the contender's own greedy answers

    def __init__(self, model: str, by_question: dict[str, str]) -> None:
        self.model, self.by_question = model, by_question

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        return self.by_question[messages[-1]["content"]]


def write_report(cfg: RunConfig, results: dict[str, dict], out_dir: Path, judged: str = "") -> str:
    """scores.md / scores.json / charts, and the tables as text for the terminal; `judged`
    (the LLM judge's tables, if any) comes last."""
    metric = generation_metric(cfg)
    categories = sorted({c for r in results.values() for c in r["loss"]} - {"mean"})
    tables = []
    sections = [
        (metric, f"{metric.replace('_', ' ')} (mean over categories)", 2),
        ("loss", "held-out loss (mean: token-weighted over all records)", 3),
        ("preference_accuracy", "held-out preference accuracy (mean: over all pairs)", 2),
    ]
    attack_columns = sorted({k for r in results.values() for k in r.get("attack", {})})
    for key, label, digits in sections:
        rows = {name: r[key] for name, r in results.items() if key in r}
        if not rows:
            continue
        save_bar_chart(rows, categories, out_dir / f"{key}.png", label, title=label)
        extra = attack_columns if key == metric else []
        if extra:  # clean quality and the attack's success side by side
            rows = {name: {**s, **results[name].get("attack", {})} for name, s in rows.items()}
            label += f"; attack {cfg.attack.kind}, target {cfg.attack.target!r}"
        tables.append(f"### {label}\n\n" + format_score_table(rows, categories, digits, extra))
    text = "\n\n".join([*tables, *([judged] if judged else [])]) + "\n"
    (out_dir / "scores.md").write_text(text)
    (out_dir / "scores.json").write_text(json.dumps(results, indent=2))
    return text
