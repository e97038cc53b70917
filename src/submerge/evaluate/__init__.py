"""Evaluation below bench, tune and analysis: how a merged model is scored on a task's validation data.

* :mod:`.tasks` — the ``eval:`` block (per task: data, scorer, options), checked before any model is read;
* :mod:`.scorers` — classification (the task's own head), ``lm_loss``, ``python:`` scorers, and the batching and
  pooling helpers every scorer shares (the benchmark's too);
* :mod:`.generation` — a chat model scored by what it generates (exact match by one teacher-forced pass, the
  answers' NLL; ``contains``/``regex`` by greedy generation), for tune's ``generation`` scorer and the LLM suite;
* :mod:`.registry` — which scorer a task names;
* :mod:`.worker` — the sweep worker: merges a candidate in memory and scores it on every task;
* :mod:`.backends` — where a sweep runs: in this process, or on Ray actors.
"""
