"""The DRiffusion benchmark suite: ``python -m benchmarks`` (``make bench``).

Quality tables (exact Gaussian-mixture oracles, the digits UNet, the time-series model), the latency
table (rounds and wall-clock per executor, extra memory, the scheduler's own overhead against
diffusers), the Picard and distributed studies, a Markdown report and PNG plots under
``benchmarks/results/``. See ``benchmarks/README.md`` for how to read them.

Modules: ``config`` (settings), ``metrics`` (RMSE, sliced Wasserstein, MMD), ``cases`` (the
problems), ``quality``, ``latency``, ``memory``, ``overhead``, ``plots``, ``report``, ``runner``;
``models/`` holds the built-in trained models.
"""
