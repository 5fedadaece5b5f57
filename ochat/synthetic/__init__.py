"""Synthetic data that ochat writes itself (nothing is downloaded), one module per kind:

- `sharegpt_pages`: saved ShareGPT pages with ChatGPT's HTML and a realistic length mix
  (`ochat data synth --kind pages`; `ochat bench data`).
- `quickstart_corpus`: the quickstart's mixed-quality corpus, an always-right and a systematically
  wrong source, with held-out test questions (`--kind quickstart`; `ochat quickstart`, `ochat bench crlft`).
- `texts`: pipeline-shaped `.text.jsonl` conversations on a few topics (`--kind texts`; `ochat viz map` at scale).
- `token_rows`: ShareGPT-like lengths of random token ids (`ochat bench train`).
"""
