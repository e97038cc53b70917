"""The merge engine: what a config means and how it becomes files.

* :mod:`.config` — the YAML schema (mergekit-compatible; what mergekit ignores is ignored with a warning);
* :mod:`.plan` — pre-flight checks and the tensor plan (every output tensor, its inputs and parameters), no
  tensor math;
* :mod:`.executor` — the streamed merge: reads each tensor group once, runs the method, writes it straight
  into its place in the output shards;
* :mod:`.card` — the model card;
* :mod:`.vocab` — merged vocabularies, re-indexed embedding rows, chat templates.

Below it: ``io`` (files), ``layers`` and ``device`` (what a tensor is, where math runs), ``stats``, ``routing``
and ``methods``; above it: ``api``, ``tune``, ``bench``, ``analysis`` and ``cli``.
"""
