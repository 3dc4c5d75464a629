"""The paper-reproduction harness behind ``tvbasis bench`` (one layer above ``tvbasis.eval``, whose encoder, tasks,
metrics and fine-tuning it drives): the default bench and its protocols (``bench``, ``seeds``, ``task_filter``),
the storage-accuracy frontier (``frontier``, ``frontier_lora``), the continual experiment (``continual``), the
extra method rows (``stitch_rows``, ``method_rows``), the verdict table and theory check (``claims``, ``theory``,
``spread``) and the benchmark's plots (``plots``). docs/benchmark.md has the protocol."""
