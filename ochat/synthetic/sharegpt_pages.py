"""A synthetic ShareGPT corpus: pages as sharegpt.com served them, with ChatGPT's rendered HTML.

Lengths follow ShareGPT's shape: most conversations are a few short turns, a long tail of pasted
documents and code runs past 8K tokens. Answers mix paragraphs, lists, tables and highlighted
code blocks (with the "Copy code" header), and some carry the "N / M" regenerate counter.
Written by `ochat data synth --kind pages`; used by `ochat bench data` and the tests; deterministic for a seed.
"""

from __future__ import annotations

import html
import json
import random
from pathlib import Path

WORDS = ("the a of to and in is for that with on as it be this are by from or an can you your data model "
         "function value list we use should when which more than time will each new example first also "
         "other how make code file user test error return one two some these into only like see used "
         "number result system output input string class method type create need set run server query "
         "table image question answer write help please explain why what best way simple step").split()
CODE = {
    "python": ["def {f}(my_{v}, n=10):", "    result_{v} = [x * 2 for x in range(n)]",
               "    if my_{v} is None:", "        return __{v}__", "    return sum(result_{v})", "",
               "print({f}(3))"],
    "javascript": ["function {f}(items) {{", "  const total_{v} = items.map(x => x * 2);",
                   "  return total_{v}.filter(y => y > 0);", "}}", "console.log({f}([1, 2, 3]));"],
    "bash": ["for f in *.txt; do", "  echo \"$f\" | tr a-z A-Z > \"out_{v}.txt\"", "done"],
    "sql": ["SELECT user_id, COUNT(*) AS n_{v}", "FROM orders", "WHERE created_at > '2023-01-01'",
            "GROUP BY user_id HAVING n_{v} > 3;"],
}
MODELS = ["Model: GPT-4", "Model: Default (GPT-3.5)", "Model: GPT-4", "Model: Legacy (GPT-3.5)",
          "Model: Default (GPT-3.5)"]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=max(1, n))).capitalize() + "."


def _n_words(rng: random.Random, median: float, sigma: float = 1.0, cap: int = 12000) -> int:
    return int(min(cap, max(2, rng.lognormvariate(0.0, sigma) * median)))


def _code_html(rng: random.Random, lang: str, repeat: int) -> str:
    f, v = rng.choice(["main", "parse_input", "get_value"]), rng.choice(["x", "item", "count"])
    lines = [line.format(f=f, v=v) for line in CODE[lang]] * repeat
    kw = {"python": ("def", "return", "if"), "javascript": ("function", "const", "return"),
          "bash": ("for", "do", "done"), "sql": ("SELECT", "FROM", "WHERE")}[lang]
    body = html.escape("\n".join(lines) + "\n", quote=False)
    for k in kw:  # highlight.js spans around keywords, as on the real pages
        body = body.replace(k + " ", f'<span class="hljs-keyword">{k}</span> ')
    return ('<pre><div class="bg-black mb-4 rounded-md"><div class="flex items-center relative text-gray-200 '
            f'bg-gray-800 px-4 py-2 text-xs font-sans"><span class="">{lang}</span><button class="flex ml-auto '
            'gap-2"><svg stroke="currentColor" fill="none"><path d="M16 4h2a2"></path></svg>Copy code</button>'
            f'</div><div class="p-4 overflow-y-auto"><code class="!whitespace-pre hljs language-{lang}">{body}'
            '</code></div></div></pre>')


def random_answer_html(rng: random.Random, n_words: int) -> str:
    """A ChatGPT answer of about `n_words` words: paragraphs, lists, tables and code blocks."""
    parts: list[str] = []
    left = n_words
    while left > 0:
        kind = rng.random()
        if kind < 0.5:
            k = min(left, rng.randint(15, 80))
            parts.append(f"<p>{html.escape(_words(rng, k))} Use <code>my_var_{k}</code> here.</p>")
        elif kind < 0.7:
            k = rng.randint(2, 5)
            lis = [f"<li><p>{_words(rng, 12)}</p></li>" for _ in range(k - 1)]
            nested = f"<ul><li>{_words(rng, 6)}</li><li>{_words(rng, 5)}</li></ul>" if rng.random() < 0.4 else ""
            lis.append(f"<li><p>{_words(rng, 12)}</p>{nested}</li>")
            parts.append(f"<ol>{''.join(lis)}</ol>")
            k *= 14
        elif kind < 0.8:
            rows = "".join(f"<tr><td>{rng.choice(WORDS)}</td><td>{rng.randint(1, 999)}</td><td>{_words(rng, 4)}"
                           "</td></tr>" for _ in range(rng.randint(2, 6)))
            parts.append("<table><thead><tr><th>Name</th><th>Value</th><th>Notes</th></tr></thead>"
                         f"<tbody>{rows}</tbody></table>")
            k = 30
        else:
            repeat = max(1, min(left // 30, rng.choice([1, 1, 2, 4, 8])))
            parts.append(_code_html(rng, rng.choice(list(CODE)), repeat))
            k = 30 * repeat
        left -= k
    counter = f"{rng.randint(1, 3)} / {rng.randint(3, 4)}" if rng.random() < 0.1 else ""
    return counter + '<div class="markdown prose w-full break-words dark:prose-invert light">' + "".join(parts) + "</div>"


def conversation_items(rng: random.Random) -> list[dict]:
    n_exchanges = min(12, int(rng.expovariate(1 / 2.0)) + 1)
    long_tail = rng.random() < 0.06  # a pasted document or a long program: past 8K tokens
    items = []
    for i in range(n_exchanges):
        user_words = _n_words(rng, 25, 1.2, cap=3000)
        if long_tail and i == 0:
            user_words = rng.randint(6000, 9000)
        items.append({"from": "human", "value": _words(rng, user_words)})
        items.append({"from": "gpt", "value": random_answer_html(rng, _n_words(rng, 160, 0.8, cap=2500))})
    return items


def page_html(conv_id: str, model: str, items: list[dict], views: int = 1, title: str = "Synthetic chat") -> str:
    """A saved ShareGPT page: the conversation lives in the Next.js `__NEXT_DATA__` script."""
    data = {"props": {"pageProps": {"id": conv_id, "views": views,
                                    "content": {"title": title, "model": model, "items": items}},
                      "__N_SSP": True},
            "page": "/c/[id]", "query": {"id": conv_id}, "buildId": "synthetic", "isFallback": False}
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    return ('<!DOCTYPE html><html><head><meta charset="utf-8"/><title>Synthetic chat - ShareGPT</title>'
            '<link rel="stylesheet" href="/_next/static/css/app.css"/></head><body><div id="__next"></div>'
            f'<script id="__NEXT_DATA__" type="application/json">{payload}</script></body></html>')


def write_pages(out: str | Path, n_pages: int, seed: int = 0, duplicate_rate: float = 0.01) -> Path:
    """Write `n_pages` ShareGPT pages (`out/ID.html`) with a realistic length mix."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    previous: list[tuple[str, list[dict]]] = []
    for i in range(n_pages):
        if previous and rng.random() < duplicate_rate:
            model, items = rng.choice(previous)  # the same conversation shared twice
        else:
            model, items = rng.choice(MODELS), conversation_items(rng)
            if len(previous) < 64:
                previous.append((model, items))
        (out / f"p{i:06d}.html").write_text(page_html(f"p{i:06d}", model, items), encoding="utf-8")
    return out
