"""vitq's benchmark suite: ``python -m bench NAME [args]`` (``python -m bench --list``).

Each benchmark is a module ``bench/NAME.py`` with ``main(argv) -> int`` that prints a table and writes its result
with :func:`bench.common.write_result` to ``bench/results/NAME.json`` (committed). ``python -m bench report``
regenerates ``docs/results.md`` from those files.
"""
