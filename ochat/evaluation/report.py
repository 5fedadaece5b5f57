"""`ochat eval report DIR`: score tables (terminal, Markdown) and a self-contained HTML report with charts.

The HTML page has no script at all and a Content-Security-Policy that forbids scripts and outside
requests; answers are Markdown rendered with raw HTML disabled, so a model's answer cannot run code
in the reader's browser. Charts are matplotlib PNGs, saved next to the page and embedded in it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ochat.errors import OchatError
from ochat.evaluation.files import load_answer_dir, load_questions, read_jsonl, sort_key
from ochat.evaluation.scores import (is_failed, pairwise_scores, record_mode, single_scores, vicuna_scores)
from ochat.utils.atomic import atomic_path, atomic_write_text


class Section:
    """The scores of one judgment file."""

    def __init__(self, path: Path):
        self.path, self.name = path, path.stem
        self.records = read_jsonl(path, tolerate_torn_tail=True)
        modes = {record_mode(r) for r in self.records}
        if len(modes) != 1 or "unknown" in modes:
            raise OchatError(f"{path}: not a judgment file of one mode (found {sorted(modes) or 'nothing'})")
        self.mode = modes.pop()
        self.baseline = None
        if self.mode == "vicuna":
            self.scores = vicuna_scores(self.records)
            self.baseline = next(iter({r["baseline"] for r in self.records}), None)
        elif self.mode == "single":
            self.scores = single_scores(self.records)
        else:
            self.baseline = pairwise_baseline(self.records)
            self.scores = pairwise_scores(self.records, self.baseline)
        self.failed = sum(is_failed(r) for r in self.records)

    @property
    def title(self) -> str:
        what = {"vicuna": f"relative score vs {self.baseline} (% of its score)", "single": "MT-bench score (1-10)",
                "pairwise": f"win rate vs {self.baseline}" if self.baseline else "win rate vs all other models"}
        return f"{self.name}: {what[self.mode]}"

    def header(self) -> list[str]:
        if self.mode == "vicuna":
            return ["model", "score %", "± SE", "model mean", "baseline mean", "n", "failed"]
        if self.mode == "single":
            turns = sorted({t for s in self.scores.values() for t in s["turns"]})
            return ["model", "score", "± SE", *turns, "n", "failed"]
        return ["model", "win %", "loss %", "ties", "(win+tie/2) %", "± SE", "n", "failed"]

    def rows(self) -> list[list[str]]:
        rows = []
        order = sorted(self.scores, key=lambda m: -_num(self.scores[m]["overall"]["score"]))
        for m in order:
            s, o = self.scores[m], self.scores[m]["overall"]
            if self.mode == "vicuna":
                rows.append([m, _f(o["score"], 1), _f(o["se"], 1), _f(o.get("model_mean"), 2),
                             _f(o.get("baseline_mean"), 2), str(o["n"]), str(s["failed"])])
            elif self.mode == "single":
                turns = self.header()[3:-2]
                rows.append([m, _f(o["score"], 2), _f(o["se"], 2),
                             *(_f(s["turns"].get(t, {}).get("score"), 2) for t in turns), str(o["n"]), str(s["failed"])])
            else:
                rows.append([m, _f(100 * o["win_rate"], 1), _f(100 * o["loss_rate"], 1), str(o["tie"]),
                             _f(100 * o["score"], 1), _f(100 * o["se"], 1), str(o["total"]), str(s["failed"])])
        return rows

    def bars(self) -> tuple[list[str], list[float], list[float], str]:
        scale = 100 if self.mode == "pairwise" else 1
        models = sorted(self.scores, key=lambda m: -_num(self.scores[m]["overall"]["score"]))
        return (models, [scale * _num(self.scores[m]["overall"]["score"]) for m in models],
                [scale * _num(self.scores[m]["overall"]["se"], 0.0) for m in models],
                {"vicuna": "% of baseline score", "single": "score (1-10)", "pairwise": "(win + tie/2) %"}[self.mode])

    def category_table(self) -> tuple[list[str], list[list[str]]]:
        """Per category "score ± SE (n)" for each model."""
        scale, digits = (100, 1) if self.mode in ("pairwise", "vicuna") else (1, 2)
        scale = 1 if self.mode == "vicuna" else scale  # vicuna scores are percentages already
        cats = sorted({c for s in self.scores.values() for c in s["categories"]})
        rows = []
        for m in sorted(self.scores, key=lambda m: -_num(self.scores[m]["overall"]["score"])):
            row = [m]
            for c in cats:
                v = self.scores[m]["categories"].get(c)
                n = v and (v.get("n") or v.get("total"))
                row.append("-" if not v else f"{_f(scale * _num(v['score']), digits)} ± {_f(scale * _num(v['se']), digits)} ({n})")
            rows.append(row)
        return ["model", *cats], rows

    def category_scores(self) -> dict[str, dict[str, float]]:
        scale = 100 if self.mode == "pairwise" else 1
        return {m: {c: scale * _num(v["score"]) for c, v in s["categories"].items()} for m, s in self.scores.items()}


def pairwise_baseline(records: list[dict]) -> str | None:
    """The baseline of a pairwise-baseline file (ours record it; in FastChat's it is in every game)."""
    named = {r.get("baseline") for r in records}
    if len(named) == 1 and None not in named:
        return named.pop()
    models = {m for r in records for m in (r["model_1"], r["model_2"])}
    common = set.intersection(*({r["model_1"], r["model_2"]} for r in records)) if records else set()
    return common.pop() if len(common) == 1 and len(models) > 2 else None


def _num(x: Any, default: float = math.nan) -> float:
    return default if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _f(x: Any, digits: int) -> str:
    x = _num(x)
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def find_judgment_files(d: Path) -> list[Path]:
    if d.is_file():
        return [d]
    for cand in (d / "model_judgment", d):
        files = sorted(cand.glob("*.jsonl")) if cand.is_dir() else []
        if files:
            return files
    raise OchatError(f"{d}: no judgment files (expected DIR/model_judgment/*.jsonl or DIR/*.jsonl) and no few-shot scores (DIR/fewshot/*.json)")


def print_summary(path: str | os.PathLike, console: Console | None = None) -> None:
    console = console or Console()
    for section in (Section(p) for p in find_judgment_files(Path(path))):
        table = Table(title=section.title)
        for h in section.header():
            table.add_column(h, justify="left" if h == "model" else "right")
        for row in section.rows():
            table.add_row(*row)
        console.print(table)
        head, rows = section.category_table()
        table = Table(title=f"{section.name}: per category (score ± SE (n))")
        for h in head:
            table.add_column(h, justify="left" if h == "model" else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def _has_judgments(d: Path) -> bool:
    try:
        return bool(find_judgment_files(d))
    except OchatError:
        return False


def _print_table(title: str, head: list[str], rows: list[list[str]], console: Console) -> None:
    table = Table(title=title)
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i < 3 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_table(section: Section) -> str:
    return (f"### {section.title}\n\n" + _md_table(section.header(), section.rows()) +
            "\nPer category (score ± SE (n)):\n\n" + _md_table(*section.category_table()))


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" + "".join(
        "<tr>" + f"<td>{esc(r[0])}</td>" + "".join(f"<td class='num'>{esc(c)}</td>" for c in r[1:]) + "</tr>"
        for r in rows) + "</table>")


# --- charts -----------------------------------------------------------------------------------

def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def score_chart(section: Section) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, values, errs, label = section.bars()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(models) + 2), 3.6))
    ax.bar(models, values, yerr=errs, capsize=6, color="#4C72B0")
    if section.mode == "vicuna":
        ax.axhline(100, color="gray", linestyle="--", linewidth=1)
    ax.set_ylabel(label)
    ax.set_title(section.title, fontsize=10)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    png = _figure_png(fig)
    plt.close(fig)
    return png


def category_chart(section: Section) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = section.category_scores()
    cats = sorted({c for v in per.values() for c in v})
    models = sorted(per)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(cats) * max(1, len(models)) ** 0.5 + 2), 3.6))
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(cats))]
        ax.bar(xs, [per[m].get(c, math.nan) for c in cats], width=width, label=m)
    ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
    ax.set_ylabel(section.bars()[3])
    ax.set_title(f"{section.name}: per category", fontsize=10)
    ax.legend(fontsize=8)
    png = _figure_png(fig)
    plt.close(fig)
    return png


# --- HTML -------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1400px;padding:0 1rem;color:#222}
h1{font-size:1.6rem} h2{margin-top:2.5rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1rem 0} th,td{border:1px solid #ddd;padding:.35rem .6rem;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.qa td{max-width:34rem;font-size:.9rem} .qa td.q{max-width:22rem;background:#fafafa}
.answer{max-height:24rem;overflow:auto} .answer pre{background:#f6f8fa;padding:.5rem;overflow:auto}
.verdict{font-weight:600;margin:.3rem 0} .explain{white-space:pre-wrap;font-size:.85rem;color:#444}
.failed{color:#b00} img{max-width:100%} .charts{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
.charts img{max-width:48%} details summary{cursor:pointer;color:#0550ae}
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _md():
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")  # raw HTML is shown as text

    def image_as_text(self, tokens, idx, options, env):  # no remote loads from a report (tracking pixels)
        t = tokens[idx]
        return f"<span class='img'>[image: {html.escape(t.content)}] {html.escape(t.attrGet('src') or '')}</span>"

    md.add_render_rule("image", image_as_text)
    return md


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _verdicts(section: Section) -> dict[tuple, list[tuple[str, str, bool]]]:
    """(question_id, model) -> [(verdict line, judge explanation, failed)] from this section's records."""
    out: dict[tuple, list] = defaultdict(list)
    for r in section.records:
        failed, turn = is_failed(r), r.get("turn", 1)
        err = f" (failed: {r.get('error') or 'unparseable'})" if failed else ""
        if section.mode == "vicuna":
            line = (f"{r['model_score']:.1f} vs {r['baseline']} {r['baseline_score']:.1f} (orders: "
                    f"{r['g1_scores']} / {r['g2_scores']} as shown)" if not failed else "not scored")
            text = f"[order 1: model first]\n{r.get('g1_judgment') or ''}\n\n[order 2: baseline first]\n{r.get('g2_judgment') or ''}"
            out[(r["question_id"], r["model"])].append((line + err, text, failed))
        elif section.mode == "single":
            line = f"turn {turn}: " + (f"{float(r['score']):g}/10" if not failed else "not scored")
            out[(r["question_id"], r["model"])].append((line + err, r.get("judgment") or "", failed))
        else:
            winner = r.get("winner") or (r["g1_winner"] if r["g1_winner"] == r["g2_winner"] else "tie")
            text = f"[order 1: {r['model_1']} as A]\n{r.get('g1_judgment') or ''}\n\n[order 2: {r['model_2']} as A]\n{r.get('g2_judgment') or ''}"
            for me, other, side in ((r["model_1"], r["model_2"], "model_1"), (r["model_2"], r["model_1"], "model_2")):
                res = "not scored" if failed else ("tie" if winner == "tie" else ("win" if winner == side else "loss"))
                out[(r["question_id"], me)].append((f"turn {turn} vs {other}: {res}{err}", text, failed))
    return out


def html_report(sections: list[Section], charts: dict[str, tuple[bytes, bytes]], markdown: str,
                questions: dict[Any, Any], answers: dict[str, dict],
                fewshot: tuple[list[str], list[list[str]]] | None = None) -> str:
    md = _md()
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='Content-Security-Policy' content=\"{CSP}\">",
             f"<title>ochat evaluation report</title><style>{CSS}</style></head><body><h1>ochat evaluation report</h1>"]
    for s in sections:
        score_png, cat_png = charts[s.name]
        parts.append(f"<h2>{esc(s.title)}</h2>" + _html_table(s.header(), s.rows()))
        parts.append("<details><summary>per category (score ± SE (n))</summary>" + _html_table(*s.category_table()) + "</details>")
        if s.failed:
            parts.append(f"<p class='failed'>{s.failed} judgment(s) failed and are not scored.</p>")
        parts.append(f"<div class='charts'>{_img(score_png, s.title)}{_img(cat_png, s.name + ' per category')}</div>")
    if fewshot:
        parts.append("<h2>few-shot scores (lm-eval), % ± SE (n)</h2>" + _html_table(*fewshot))
    parts.append("<h2>Questions and answers</h2>")
    verdicts = [(s, _verdicts(s)) for s in sections]
    models = sorted(set(answers) | {k[1] for _, v in verdicts for k in v})
    qids = sorted(set(questions) | {k[0] for _, v in verdicts for k in v} | {q for a in answers.values() for q in a},
                  key=sort_key)
    parts.append("<table class='qa'><tr><th>question</th>" + "".join(f"<th>{esc(m)}</th>" for m in models) + "</tr>")
    for qid in qids:
        q = questions.get(qid)
        qcell = f"<b>#{esc(str(qid))}</b>" + (f" <i>{esc(q.category)}</i>" + "".join(
            f"<div class='answer'>{md.render(t)}</div>" for t in q.turns) if q else "")
        cells = []
        for m in models:
            cell = []
            rec = answers.get(m, {}).get(qid)
            if rec:
                for i, t in enumerate(rec["choices"][0]["turns"]):
                    label = f"<div class='verdict'>turn {i + 1}</div>" if len(rec["choices"][0]["turns"]) > 1 else ""
                    cell.append(f"{label}<div class='answer'>{md.render(t)}</div>")
            for s, v in verdicts:
                for line, text, failed in v.get((qid, m), []):
                    cls = "verdict failed" if failed else "verdict"
                    cell.append(f"<div class='{cls}'>{esc(s.name)}: {esc(line)}</div>"
                                f"<details><summary>judge's explanation</summary><div class='explain'>{esc(text)}</div></details>")
            cells.append("<td>" + "".join(cell) + "</td>")
        parts.append(f"<tr><td class='q'>{qcell}</td>{''.join(cells)}</tr>")
    parts.append("</table><h2>Markdown</h2><pre>" + esc(markdown) + "</pre></body></html>")
    return "".join(parts)


def fewshot_table(root: Path) -> tuple[list[str], list[list[str]]] | None:
    """`ochat eval fewshot --out ROOT/fewshot/MODEL.json` scores: one row per task metric, a column per model."""
    from ochat.evaluation.fewshot import FewshotResult

    files = sorted((root / "fewshot").glob("*.json")) if (root / "fewshot").is_dir() else []
    if not files:
        return None
    results = []
    for f in files:
        try:
            results.append(FewshotResult.from_json(json.loads(f.read_text(encoding="utf-8"))))
        except (ValueError, KeyError, TypeError) as e:
            raise OchatError(f"{f}: not an `ochat eval fewshot` result ({e})") from None
    cells: dict[tuple[str, str, str], dict[str, str]] = defaultdict(dict)
    for r in results:
        for sc in r.scores:
            se = "" if sc.stderr is None else f" ± {_f(100 * sc.stderr, 1)}"
            cells[(sc.task, sc.metric, sc.filter)][r.model] = f"{_f(100 * sc.value, 1)}{se} ({sc.n})"
    models = [r.model for r in results]
    return (["task", "metric", "filter", *models],
            [[*key, *(row.get(m, "-") for m in models)] for key, row in sorted(cells.items())])


def make_report(d: str | os.PathLike, out: str | os.PathLike | None = None, bench: str | None = None,
                console: Console | None = None) -> list[Path]:
    d = Path(d)
    if not d.exists():
        raise OchatError(f"{d}: no such directory")
    root = d.parent if d.name == "model_judgment" else d
    fewshot = fewshot_table(root) if root.is_dir() else None
    sections = [Section(p) for p in find_judgment_files(d)] if not fewshot or _has_judgments(d) else []
    out_dir = Path(out) if out else (root if root.is_dir() else root.parent) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    bench_file = Path(bench) if bench else next((p for p in (root / "question.jsonl",) if p.is_file()), None)
    questions = {q.question_id: q for q in load_questions(bench_file)} if bench_file else {}
    answers = load_answer_dir(root / "model_answer") if (root / "model_answer").is_dir() else {}

    if sections:
        print_summary(d, console)
    markdown = "\n".join(markdown_table(s) for s in sections)
    if fewshot:
        _print_table("few-shot scores (lm-eval), % ± SE (n)", *fewshot, console or Console())
        markdown += "\n## few-shot scores (lm-eval), % ± SE (n)\n\n" + _md_table(*fewshot)
    written = []
    charts = {}
    for s in sections:
        charts[s.name] = (score_chart(s), category_chart(s))
        for kind, png in zip(("scores", "categories"), charts[s.name]):
            p = out_dir / f"{s.name}.{kind}.png"
            with atomic_path(p) as tmp:
                tmp.write_bytes(png)
            written.append(p)
    atomic_write_text(out_dir / "report.md", "# ochat evaluation report\n\n" + markdown)
    atomic_write_text(out_dir / "report.html", html_report(sections, charts, markdown, questions, answers, fewshot))
    return [out_dir / "report.html", out_dir / "report.md", *written]
