"""Evaluation: model answers, GPT-4-as-judge (Vicuna review, MT-bench single and pairwise), reports, few-shot benchmarks.

Files follow FastChat's llm_judge layout so that both tools read each other's output:
`BENCH/model_answer/MODEL.jsonl` (answers) and `BENCH/model_judgment/JUDGE_MODE.jsonl` (judgments).
"""
